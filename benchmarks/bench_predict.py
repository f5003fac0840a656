"""Study -> result speed and memory: one full-size generated study through `cspine predict`.

Writes a 512x512x400 synthetic study (JPEG Lossless SV1 when GDCM is installed, else uncompressed),
loads a model bundle once, then runs predict_study twice (the first run warms caches and CUDA kernels)
and prints the second run's split: decode / segment / crop / classify / write, the wall time, and the
peak resident memory of this process and its decode workers.

    .venv/bin/cspine demo --out cspine-demo          # makes a bundle in cspine-demo/model
    .venv/bin/python benchmarks/bench_predict.py --model cspine-demo/model [--device cuda]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the cspine CLI does, before torch loads OpenMP

from cspine.bundle import load_bundle
from cspine.io.volume import resample
from cspine.predict import PredictConfig, predict_study
from cspine.synth import generate_study
from cspine.synth.writer import write_series


def make_study(folder: Path, slices: int) -> str:
    """A full-size synthetic study with at least ``slices`` slices, cut to that many; returns its syntax."""
    try:
        import gdcm  # noqa: F401

        syntax = "1.2.840.10008.1.2.4.70"
    except ImportError:
        syntax = "1.2.840.10008.1.2.1"
    study = generate_study(0, size="full")
    vol = study.volume
    n = vol.shape[0]
    # Exactly ``slices`` slices over the same extent (the generator picks 200-600).
    dz = vol.spacing[0] * (n - 1) / (slices - 1)
    new = resample(vol, (dz, *vol.spacing[1:]), order=1)
    mask = resample(vol.with_array(study.mask), (dz, *vol.spacing[1:]), order=0).array
    instances = np.arange(slices, 0, -1) if study.top_first else np.arange(1, slices + 1)
    new = dataclasses.replace(new, instance_numbers=instances)
    study = dataclasses.replace(study, volume=new, mask=mask, transfer_syntax=syntax)
    write_series(study, folder, patient_number=0)
    return syntax


def peak_rss_mb() -> tuple[float, float]:
    """Peak resident set of this process and of its (largest) finished child, in MB (Linux reports kB)."""
    scale = 1 / 1024 if sys.platform.startswith("linux") else 1 / 2**20
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    return own, child


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="model bundle (e.g. cspine-demo/model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--slices", type=int, default=400)
    ap.add_argument("--keep", type=Path, default=None, help="write/reuse the study here")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        study = args.keep or Path(tmp) / "study"
        syntax = "existing"
        if not study.exists():
            t = time.perf_counter()
            syntax = make_study(study, args.slices)
            print(f"generated {args.slices} slices ({syntax}) in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        bundle = load_bundle(args.model, device=args.device)
        load_s = time.perf_counter() - t
        runs = []
        for _ in range(2):
            cfg = PredictConfig(study=study, model=args.model, out=Path(tmp) / "out", device=args.device)
            t = time.perf_counter()
            result = predict_study(cfg, bundle=bundle)
            runs.append((time.perf_counter() - t, result["timings_s"]))
        wall, split = runs[-1]
        own, child = peak_rss_mb()
        model_s = sum(split.get(k, 0.0) for k in ("segment", "crop", "classify"))
        figures = {
            "device": args.device,
            "shape": [args.slices, 512, 512],
            "bundle_load_s": round(load_s, 2),
            "first_run_wall_s": round(runs[0][0], 2),
            "wall_s": round(wall, 2),
            "split_s": split,
            "model_s_excluding_disk": round(model_s, 3),
            "peak_rss_mb": round(own),
            "peak_rss_decode_worker_mb": round(child),
        }
        print(json.dumps(figures, indent=2))
        print(
            f"study -> result {wall:.2f} s (target <= 20 s on 2 CPU cores, <= 1 s excluding disk on a GPU); "
            f"segment+crop+classify {model_s:.2f} s; peak RSS {own:.0f} MB (target <= 3 GB)"
        )
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
