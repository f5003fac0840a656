"""Benchmark: vertebra segmentation of a full-size study (512 x 512 x 400) on CPU.

Targets (issue 13): total (preprocessing + both networks + resampling back + post-processing, anatomical checks
and report) <= 5 s, peak RSS <= 2 GB on 2 CPU cores, masks unchanged. The run uses ``OMP_WAIT_POLICY=PASSIVE``
(as the cspine CLI does) unless the environment says otherwise: on cores shared with another job, spinning
OpenMP threads made the refinement stage's many small sliding-window convolutions ~8x slower.

The study is a full-size generated one (``generate_study(seed, size="full")``: real 512x512 in-plane detail and
noise), resampled along z to exactly 400 slices when the generator chose another count. Building it takes
memory, so it is written to a .npz (``--study`` keeps it for later runs) and the segmentation runs in a fresh
process whose peak RSS (``resource.getrusage``, read before the reference run) is the cost of segmenting one
study. In that process the same study then goes through the reference steps (benchmarks/seg_reference.py: the
straightforward implementations the optimised ones replaced); the per-step ratio between the two is what to
read on a busy machine, the absolute seconds only when it is quiet. ``masks_identical`` compares the two masks;
``masks_identical_same_windows`` the masks when the reference runs the refinement windows as they run now (the
one deliberate change of output: the windows no longer cover padding, see seg_reference.segment_volume_ref).

Usage::

    .venv/bin/python benchmarks/bench_seg.py --model src/cspine/weights/segmenter     # the shipped segmenter
    .venv/bin/python benchmarks/bench_seg.py                                           # untrained default network
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build_study(seed: int, slices: int, path: Path) -> dict[str, object]:
    """Generate a full-size study, resample it to ``slices`` slices, save volume + mask + geometry to ``path``."""
    from cspine.io.volume import Volume, resample
    from cspine.synth import generate_study

    t = time.perf_counter()
    s = generate_study(seed, "full", 0)
    vol, mask = s.volume, s.mask
    if vol.shape[0] != slices:
        dz = vol.spacing[0] * (vol.shape[0] - 1) / (slices - 1)
        spacing = (dz, vol.spacing[1], vol.spacing[2])
        mask = resample(vol.with_array(mask), spacing, order=0).array
        vol = resample(vol, spacing, order=1)
        vol = Volume(vol.array, vol.spacing, vol.affine, np.arange(1, slices + 1), vol.meta)
    np.savez(path, array=vol.array, mask=mask, affine=vol.affine, spacing=np.array(vol.spacing))
    return {"shape_zyx": list(vol.shape), "spacing_zyx": [round(v, 4) for v in vol.spacing],
            "generate_s": round(time.perf_counter() - t, 1)}  # fmt: skip


def worker(study: Path, model_dir: str | None, threads: int, reference: bool) -> dict[str, object]:
    """Segment the saved study once (after a warm-up on a small volume), then with the reference steps; report
    timings per step, their ratio, peak RSS and whether the masks agree."""
    import torch

    from cspine.io.volume import Volume
    from cspine.metrics import dice
    from cspine.seg.config import CLASSES, PreprocessConfig
    from cspine.seg.infer import InferConfig, SegModel, load_model, segment_volume
    from cspine.seg.models import DEFAULT_MODEL, create_model

    torch.set_num_threads(threads)
    if model_dir:
        model = load_model(model_dir, "cpu")
    else:
        net = create_model(DEFAULT_MODEL, 1, len(CLASSES)).eval()
        model = SegModel(net, DEFAULT_MODEL, PreprocessConfig(), torch.device("cpu"))
    data = np.load(study)
    vol = Volume(data["array"], tuple(float(v) for v in data["spacing"]), data["affine"], np.arange(len(data["array"])))
    truth = data["mask"]
    warm = Volume(np.full((48, 64, 64), -1000, np.int16), (1.5, 1.5, 1.5), np.diag([1.5, 1.5, 1.5, 1.0]))
    segment_volume(warm, model, InferConfig(device="cpu"))  # first-call overheads (allocator, kernels) excluded
    t = time.perf_counter()
    res = segment_volume(vol, model, InferConfig(device="cpu"))
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    tm = res.timings
    out: dict[str, object] = {
        "model": model_dir or f"{DEFAULT_MODEL} (untrained)",
        "threads": torch.get_num_threads(),
        "model_s": round(tm["model"] + tm.get("refine", 0.0), 2),  # both networks (refine: crop, resample, run)
        "total_s": round(wall, 2),
        "steps_s": {k: round(v, 2) for k, v in tm.items() if k != "total"},
        "peak_rss_gb": round(peak, 2),
        "found": [k for k, v in res.vertebrae.items() if v["present"]],
    }
    if model_dir:
        scores = [dice(res.mask, truth, v) for v in range(1, 8) if (truth == v).any()]
        out["mean_dice_vs_generated_mask"] = round(float(np.mean([s for s in scores if s is not None])), 4)
    if reference:
        from seg_reference import segment_volume_ref

        t = time.perf_counter()
        ref = segment_volume_ref(vol, model, InferConfig(device="cpu"))
        ref_wall = time.perf_counter() - t
        out["reference_total_s"] = round(ref_wall, 2)
        out["reference_steps_s"] = {k: round(v, 2) for k, v in ref.timings.items() if k != "total"}
        out["speedup_total"] = round(ref_wall / wall, 2)
        out["speedup_steps"] = {k: round(v / tm[k], 1) for k, v in ref.timings.items() if k != "total" and tm.get(k)}
        out["masks_identical"] = bool(np.array_equal(res.mask, ref.mask))
        if not out["masks_identical"]:  # the refinement windows moved: how much that changed, per vertebra
            out["voxels_differing"] = int((res.mask != ref.mask).sum())
            out["dice_vs_reference"] = {f"C{v}": dice(res.mask, ref.mask, v) for v in range(1, 8)}
            if model_dir:
                scores = [dice(ref.mask, truth, v) for v in range(1, 8) if (truth == v).any()]
                out["reference_mean_dice_vs_generated_mask"] = round(float(np.mean([s for s in scores if s])), 4)
        same = segment_volume_ref(vol, model, InferConfig(device="cpu"), old_windows=False)
        out["masks_identical_same_windows"] = bool(np.array_equal(res.mask, same.mask))
        out["reports_identical_same_windows"] = (res.vertebrae, res.warnings, res.cleanup) == (
            same.vertebrae,
            same.warnings,
            same.cleanup,
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="segmentation model directory (default: untrained 'unet')")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slices", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--study", type=Path, default=None, help="keep the built study here (.npz); reused when present")
    ap.add_argument("--no-reference", action="store_true", help="skip the run with the reference steps")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(Path(args.worker), args.model, args.threads, not args.no_reference)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = args.study or Path(tmp) / "study.npz"
        if path.exists():
            info: dict[str, object] = {"study": str(path)}
        else:
            info = build_study(args.seed, args.slices, path)
        cmd = [sys.executable, __file__, "--worker", str(path), "--threads", str(args.threads)]
        if args.model:
            cmd += ["--model", args.model]
        if args.no_reference:
            cmd += ["--no-reference"]
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env={"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "OMP_NUM_THREADS": str(args.threads)},
        )
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    res = {**info, **res}
    print(json.dumps(res, indent=2))
    ok = res["total_s"] <= 5 and res["peak_rss_gb"] <= 2 and res.get("masks_identical_same_windows", True)
    steps = ", ".join(f"{k} {v}" for k, v in res["steps_s"].items())
    print(f"steps (s): {steps}")
    if "reference_total_s" in res:
        print(
            f"reference steps, same process: total {res['reference_total_s']} s ({res['speedup_total']}x the time), "
            f"masks identical: {res['masks_identical']} (with the same refinement windows: "
            f"{res['masks_identical_same_windows']})"
        )
    print(
        f"total {res['total_s']} s (target <= 5), peak RSS {res['peak_rss_gb']} GB (<= 2) "
        f"-> {'OK' if ok else 'OVER TARGET'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
