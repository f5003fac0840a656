"""Does a segmenter's mask keep the fracture? Lucent-voxel recall and the statistics' AUC with its masks.

On the two sets of ``benchmarks/bench_classifier.py`` (``OUT/cache/train``: 200 studies, seed 2101;
``OUT/cache/test``: 100 studies, seed 2102; ``bench_classifier.py --out OUT --runs`` makes them), each study is
segmented with ``--model`` (default: the shipped segmenter) and the lucency statistics of every vertebra are counted
in these masks:

- ``model``: the model's masks, as ``cspine segment`` writes them (with ``--diagnose``: the ``raw`` masks through
  segment's clean-up, ``finish_labels``, so that the network runs once);
- ``raw`` (with ``--diagnose``): the same without post-processing's one-piece-per-vertebra step, to see whether the
  network or the clean-up leaves a fracture's gap or fragment out;
- ``oracle_lucent`` (with ``--diagnose``): the model's masks plus every voxel of a true vertebra darker than 150 HU
  that they left out (on the generator's studies, only fractures are that dark inside a vertebra): what a
  segmenter that kept every fracture line, and changed nothing else, would give;
- ``oracle_all`` (with ``--diagnose``): the model's masks plus every true vertebra voxel they left out;
- ``truth``: the generator's masks (the ceiling).

For each, the regression train-cls fits on the statistics (``bench_cls_parts.statistics_logits``) is fitted on the
training set's statistics with the same kind of mask and scored on the test set (mean vertebra AUC), and the test
set's lucent voxels (true vertebra, < 150 HU) that the masks keep are counted. Per-study results are cached under
``OUT/mask-fracture/NAME`` (rerun to resume).

    .venv/bin/python benchmarks/bench_mask_fracture.py --out /tmp/bench-cls --diagnose
    .venv/bin/python benchmarks/bench_mask_fracture.py --out /tmp/bench-cls --model DIR --name mine

Results: OUT/mask-fracture/NAME/results.json; the figures are in benchmarks/cls_results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the cspine CLI does, before torch loads OpenMP

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cls_parts import labels, statistics_logits
from cspine.cls.crops import _extents, _vertebra_stats
from cspine.data.cache import load_prepared, prepared_studies
from cspine.features.lucency import N_LUCENCY
from cspine.labels import CERVICAL, LABEL_VALUES
from cspine.metrics import auc
from cspine.seg.config import PostprocessConfig
from cspine.seg.infer import InferConfig, finish_labels, load_model, segment_volume
from cspine.seg.shipped import SHIPPED_DIR

LUCENT_HU = 150.0
SETS = ("train", "test")


def masks_of(study_dir: Path, model: object, diagnose: bool) -> tuple[object, dict[str, np.ndarray], dict[str, int]]:
    """(volume, mask per kind, lucent voxels each mask keeps) of one study."""
    st = load_prepared(study_dir)
    vol, truth = st.volume, st.mask
    assert truth is not None
    if diagnose:  # segment once without the one-piece step; segment's own clean-up then gives the model's mask
        raw = segment_volume(vol, model, InferConfig(postprocess=PostprocessConfig(keep_largest=False))).mask
        raw = np.where(raw <= len(CERVICAL), raw, 0).astype(np.uint8)
        mask = finish_labels(raw, vol).mask
    else:
        mask = segment_volume(vol, model).mask
    mask = np.where(mask <= len(CERVICAL), mask, 0).astype(np.uint8)
    cervical = (truth > 0) & (truth <= len(CERVICAL))
    lucent = cervical & (vol.array < LUCENT_HU)
    masks = {"model": mask, "truth": truth}
    if diagnose:
        masks["raw"] = raw
        for name, add in (("oracle_lucent", lucent & (mask == 0)), ("oracle_all", cervical & (mask == 0))):
            m = mask.copy()
            m[add] = truth[add]
            masks[name] = m
    counts = {name: int((lucent & (m == truth)).sum()) for name, m in masks.items()}
    return vol, masks, counts


def study_stats(vol: object, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(7, N_LUCENCY) statistics and (7,) presence of one mask, as the crop cache counts them."""
    ext = _extents(mask)
    stats = [
        _vertebra_stats(vol, mask, LABEL_VALUES[v], ext[v]) if v in ext else np.zeros(N_LUCENCY, np.float32)
        for v in CERVICAL
    ]
    return np.stack(stats), np.array([v in ext for v in CERVICAL])


def run_set(out: Path, split: str, model: object, dest: Path, diagnose: bool) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for study_dir in prepared_studies(out / "cache" / split, "train"):
        path = dest / f"{study_dir.name}.npz"
        if path.exists():
            continue
        vol, masks, counts = masks_of(study_dir, model, diagnose)
        arrays: dict[str, np.ndarray] = {}
        for name, m in masks.items():
            arrays[name], arrays[name + "_present"] = study_stats(vol, m)
            arrays[name + "_kept"] = np.array(counts[name])
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)


def load_set(out: Path, split: str, dest: Path) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    """The cached studies of one set and their (n, 7) labels."""
    files = sorted(dest.glob("*.npz"))
    return [dict(np.load(f)) for f in files], labels(out, split, np.array([f.stem for f in files]))


def kind_of(zs: list[dict[str, np.ndarray]], kind: str) -> dict[str, np.ndarray]:
    """One mask kind's statistics and presence, as bench_cls_parts reads a set."""
    return {"stats": np.stack([z[kind] for z in zs]), "present": np.stack([z[kind + "_present"] for z in zs])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="bench_classifier.py's OUT (with cache/train, cache/test)")
    ap.add_argument("--model", type=Path, default=SHIPPED_DIR, help="segmentation model directory (default: shipped)")
    ap.add_argument("--name", default="shipped", help="where under OUT/mask-fracture the results go")
    ap.add_argument("--diagnose", action="store_true", help="also the raw and oracle masks (see the docstring)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, "cpu")
    base = args.out / "mask-fracture" / args.name
    t0 = time.perf_counter()
    for split in SETS:
        run_set(args.out, split, model, base / split, args.diagnose)
    (tr, ytr), (te, yte) = (load_set(args.out, s, base / s) for s in SETS)
    kinds = [k for k in tr[0] if not k.endswith(("_present", "_kept"))]
    results: dict[str, object] = {
        "model": str(args.model),
        "test_lucent_voxels_kept": {k: int(sum(z[k + "_kept"] for z in te)) for k in kinds},  # truth: all of them
        "seconds": round(time.perf_counter() - t0, 1),
        "statistics_mean_vertebra_auc": {},
    }
    for kind in kinds:
        logits = statistics_logits(kind_of(tr, kind), ytr, kind_of(te, kind))
        per = {v: auc(yte[:, j], logits[:, j]) for j, v in enumerate(CERVICAL)}
        known = [a for a in per.values() if a is not None]
        results["statistics_mean_vertebra_auc"][kind] = {  # type: ignore[index]
            "mean": round(float(np.mean(known)), 3),
            **{v: None if a is None else round(a, 3) for v, a in per.items()},
        }
    (base / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
