"""A model bundle on many independent generated studies: is it better than the prevalence, beyond the draw?

The demo holds out 64 test studies; on so few the held-out loss is set as much by the draw's base rates as by
the model (a 64-study draw moves the difference to the prevalence by ~0.02). This script generates ``--studies``
fresh studies in memory (a seed the demo does not use; no disk), predicts each with the bundle, and prints the
competition loss beside the RSNA prevalence (and the training labels' prevalence with ``--train-labels``),
the AUCs, and how often a random draw of ``--draw`` of these studies would show the model ahead.

``--seg-cache DIR`` keeps each study's segmentation (DIR/<segmenter digest>/<split>-<seed>-<i>.npz), so bundles
that share a segmenter (every demo keeps the shipped one) are compared on the same sets in a third of the time;
a bundle with another segmenter gets its own folder. ``--save FILE.npz`` writes the per-study labels,
probabilities and logit parts, for analyses that need more than the printed figures.

    .venv/bin/cspine demo --out cspine-demo
    .venv/bin/python benchmarks/bench_heldout.py --model cspine-demo/model --train-labels cspine-demo/data/train.csv
    .venv/bin/python benchmarks/bench_heldout.py --model cspine-demo/model --studies 200 --seed 11 \
        --seg-cache /tmp/heldout-seg --save /tmp/heldout-11.npz
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the cspine CLI does, before torch loads OpenMP

from cspine.bundle import load_bundle
from cspine.cls.evaluate import as_matrix, compute_metrics, read_labels
from cspine.cls.oof import path_aucs
from cspine.labels import PREDICTION_TYPES, PREVALENCE
from cspine.metrics import competition_loss
from cspine.seg.infer import SegResult
from cspine.synth import generate_study


def segmenter_digest(model: Path) -> str:
    """First 12 hex digits of the SHA-256 over the bundle's segmenter files (names and bytes)."""
    h = hashlib.sha256()
    seg = model / "seg"
    for f in sorted(p for p in seg.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(seg)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def cached_segment(bundle: Any, volume: Any, path: Path | None) -> SegResult:
    """The bundle's segmentation of ``volume``, read from ``path`` when it is there, else computed (and written
    there atomically when ``path`` is given)."""
    if path is not None and path.exists():
        with np.load(path) as z:
            report = json.loads(str(z["report"]))
            return SegResult(z["mask"], report["vertebrae"], report["warnings"], {}, report["cleanup"],
                             report["cervical_spine"])  # fmt: skip
    seg = bundle.segment(volume)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez_compressed(tmp, mask=seg.mask, report=json.dumps(seg.to_json()))
        tmp.replace(path)
    return seg


def heldout(
    model: Path,
    studies: int = 160,
    seed: int = 11,
    draw: int = 64,
    train_labels: Path | None = None,
    device: str = "cpu",
    split: str = "test",
    seg_cache: Path | None = None,
    save: Path | None = None,
) -> dict[str, Any]:
    """The bundle's figures on ``studies`` fresh generated studies of ``seed`` (see the module docstring)."""
    bundle = load_bundle(model, device=device)
    cache = seg_cache / segmenter_digest(model) if seg_cache else None
    y, p = [], []
    parts: dict[str, list[np.ndarray]] = {"network": [], "statistics": []}
    not_in_view = 0
    t0 = time.perf_counter()
    for i in range(studies):
        study = generate_study(seed, "small", i, split)  # type: ignore[arg-type]
        seg = cached_segment(bundle, study.volume, cache / f"{split}-{seed}-{i}.npz" if cache else None)
        pred = bundle.classify(study.volume, seg)
        probs = pred.probabilities
        split_logits = bundle.classifier.logit_parts(study.volume, pred.mask) if pred.mask.any() else None
        for k in parts:  # which part of the classifier ranks (NaN: the vertebra was not found)
            parts[k].append(np.full(7, np.nan) if split_logits is None else split_logits[k])
        y.append([study.labels[t] for t in PREDICTION_TYPES])
        # a vertebra the model did not find gets the RSNA prevalence, as submit writes it
        p.append([PREVALENCE[t] if probs[t] is None else probs[t] for t in PREDICTION_TYPES])
        not_in_view += sum(probs[t] is None for t in PREDICTION_TYPES)
    seconds = time.perf_counter() - t0
    y_arr, p_arr = np.asarray(y, np.float64), np.asarray(p, np.float64)
    n = len(y_arr)
    m = compute_metrics(y_arr, p_arr)  # loss, RSNA-prevalence baseline and AUCs as `cspine evaluate` reports them
    baselines = {
        "rsna_prevalence": m["baselines"]["rsna_prevalence"],
        # the issue's yardstick: these studies' own per-column prevalence (a constant that knows the answer's rates)
        "own_prevalence": competition_loss(y_arr, np.tile(y_arr.mean(axis=0), (len(y_arr), 1))),
    }
    if train_labels:
        train = read_labels(Path(train_labels))
        rates = as_matrix(train, sorted(train)).mean(axis=0)
        baselines["train_prevalence"] = competition_loss(y_arr, np.tile(rates, (n, 1)))
    rng = np.random.default_rng(0)
    draws = [rng.choice(n, min(draw, n), replace=False) for _ in range(2000)]
    rsna = np.array([PREVALENCE[t] for t in PREDICTION_TYPES])
    diff = np.array(
        [competition_loss(y_arr[d], p_arr[d]) - competition_loss(y_arr[d], np.tile(rsna, (len(d), 1))) for d in draws]
    )
    by_path = path_aucs(y_arr[:, 1:], {k: np.stack(v) for k, v in parts.items()})
    if save is not None:
        np.savez(save, labels=y_arr, probabilities=p_arr, **{k: np.stack(v) for k, v in parts.items()})
    return {
        "studies": n,
        "seed": seed,
        "competition_loss": m["competition_loss"],
        "baselines": baselines,
        "mean_vertebra_auc": m["mean_vertebra_auc"],
        "patient_auc": m["patient_auc"],
        "auc": {t: a for t in PREDICTION_TYPES if (a := m["targets"][t]["auc"]) is not None},
        f"draws_of_{draw}_model_ahead_of_rsna_prevalence": float((diff < 0).mean()),
        "draw_difference_mean_sd": [float(diff.mean()), float(diff.std())],
        "mean_vertebra_auc_by_path": {k: v["mean_vertebra_auc"] for k, v in by_path.items()},
        "rows_not_in_view": not_in_view,
        "seconds_per_study": seconds / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model bundle (cspine demo leaves one in OUT/model)")
    ap.add_argument("--studies", type=int, default=160)
    ap.add_argument("--seed", type=int, default=11, help="generator seed (the demo uses 0)")
    ap.add_argument("--draw", type=int, default=64, help="size of the random draws for the win rate")
    ap.add_argument("--train-labels", default=None, help="train.csv the model was trained on")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--split", default="test", choices=("train", "test"), help="generator stream")
    ap.add_argument("--seg-cache", type=Path, default=None, help="folder that keeps the studies' segmentations")
    ap.add_argument("--save", type=Path, default=None, help="per-study labels, probabilities, logit parts (.npz)")
    args = ap.parse_args()
    result = heldout(Path(args.model), args.studies, args.seed, args.draw,
                     Path(args.train_labels) if args.train_labels else None, args.device, args.split,
                     args.seg_cache, args.save)  # fmt: skip
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
