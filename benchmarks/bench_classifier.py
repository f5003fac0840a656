"""The fixed classifier benchmark: does the network learn what a fracture looks like, apart from the statistics?

Two seeded generated sets with ground-truth masks (so the masks are not what is measured): ``--train-studies``
(default 200, seed 2101) to train on and ``--test-studies`` (default 100, seed 2102) that no run sees until the
end. Two ``cspine train-cls`` runs on the training set, same recipe and seeds:

- ``both``: the default sequence recipe (CNN + GRU, plus the fitted lucency-statistics regression);
- ``network``: the same with ``--no-lucency --density-bins 0`` (the network alone: no statistics, no density
  histogram, nothing hand-made).

On the test set it reports, for each run, the competition loss beside the test set's own per-column prevalence
and the RSNA prevalence, and the mean vertebra AUC of each part of the logit (``network``, ``statistics``,
``both``; cspine.cls.oof.path_aucs), the out-of-fold figures of training, and the wall time of every stage.
Every stage is a CLI call a user would make, skipped when its output exists (rerun to resume).

Usage::

    .venv/bin/python benchmarks/bench_classifier.py --out /tmp/bench-cls                    # the benchmark
    .venv/bin/python benchmarks/bench_classifier.py --out /tmp/b --train-studies 20 --test-studies 10 --epochs 1
    .venv/bin/python benchmarks/bench_classifier.py --out /tmp/b --device cuda --threads 8 \
        --cls-args "--encoder efficientnet-lite0 --size 96 --stem-stride 1 --batch-size 8"   # a GPU run
    .venv/bin/python benchmarks/bench_classifier.py --out /tmp/bench-cls --runs network --threads 2 --tag lite0-f0 \
        --epochs 16 --cls-args "--encoder efficientnet-lite0 --pretrained LITE0.pth --size 64 --stem-stride 2 \
        --lr 3e-4 --patience 16 --fold 0"   # CPU: ImageNet lite0 fine-tuned on one fold (160 studies), ~30 min

``--seg-masks`` trains and tests on the shipped segmenter's masks instead (``cspine pseudo-label --all`` of both
sets into OUT/segmasks; ``--seg-model`` for another segmenter): what a user's masks give, where the generator's
masks hand the statistics every fracture voxel (benchmarks/cls_results.md, session 9).

``--fold K`` trains one fold of five (its 40 validation studies give the out-of-fold figures); the test set is
scored by whatever folds the run has. ``--tag`` names the model folders (OUT/models/RUN-TAG) so that runs with
other flags do not resume one another.

Results: OUT/results.json; the figures go to benchmarks/cls_results.md with the command that made them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the cspine CLI does, before torch loads OpenMP

#: train-cls flags of each run; the network alone reads neither the lucency statistics nor the density histogram
RUNS = {"both": [], "network": ["--no-lucency", "--density-bins", "0"]}


def _cspine(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cspine.cli", *args], check=True)


def _generate(out: Path, name: str, studies: int, seed: int, workers: int) -> Path:
    """``cspine synth`` (every study with its mask) + ``cspine prepare``; the cache folder."""
    data, cache = out / "data" / name, out / "cache" / name
    if not (data / "synth.json").exists():
        _cspine("synth", "--out", str(data), "--studies", str(studies), "--test-studies", "0", "--segmented", "1",
                "--seed", str(seed), "--workers", str(workers), "--no-progress")  # fmt: skip
    _cspine("prepare", "--data", str(data), "--out", str(cache), "--workers", str(workers), "--no-progress")
    return cache


def _segment(cache: Path, seg_model: Path, out: Path, device: str, workers: int) -> Path:
    """``cspine pseudo-label --all``: the segmenter's mask of every study of a set (resumable); the masks folder."""
    _cspine("pseudo-label", "--data", str(cache), "--model", str(seg_model), "--out", str(out), "--all",
            "--device", device, "--workers", str(workers), "--no-progress")  # fmt: skip
    return out


def _test_study(job: tuple[Path, Path | None, Any]) -> tuple[np.ndarray, Any, np.ndarray, Any]:
    """One test study's labels, volume, mask (ground truth or, with masks, the segmenter's) and crops (a worker)."""
    from cspine.cls.infer import study_arrays
    from cspine.data.cache import load_prepared
    from cspine.io import load_segmentation
    from cspine.labels import PREDICTION_TYPES

    d, masks, crop = job
    st = load_prepared(d)
    assert st.mask is not None and st.labels is not None, f"{d}: generated with its mask and labels"
    mask = st.mask if masks is None else load_segmentation(masks / f"{st.uid}.nii.gz", st.volume)
    y = np.array([st.labels[t] for t in PREDICTION_TYPES], np.float64)
    return y, st.volume, mask, study_arrays(st.volume, mask, crop)


def _test_logits(
    model: Path, cache: Path, device: str, masks: Path | None = None, workers: int = 1
) -> dict[str, np.ndarray]:
    """Labels (n, 8), calibrated probabilities (n, 8) and the network / statistics parts of the vertebra logits
    (n, 7; NaN where the mask lacks the vertebra) of every test study, with its ground-truth mask or, with
    ``masks``, the segmenter's (``masks/<uid>.nii.gz``). The studies are read and cropped in ``workers`` processes
    (spawned: the parent holds torch's threads and maybe CUDA), the networks run here."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from cspine.cls.infer import load_classifier
    from cspine.data.cache import prepared_studies
    from cspine.labels import PREDICTION_TYPES

    clf = load_classifier(model, device)
    acc: dict[str, list[np.ndarray]] = {"y": [], "p": [], "network": [], "statistics": []}
    jobs = [(d, masks, clf.config.crop) for d in prepared_studies(cache, "train")]
    with ProcessPoolExecutor(max(1, workers), mp_context=mp.get_context("spawn")) as pool:
        for y, volume, mask, arrays in pool.map(_test_study, jobs):
            pred = clf.predict(volume, mask, arrays=arrays)
            parts = clf.logit_parts(volume, mask, arrays=arrays)
            assert parts is not None, "the sequence recipe splits its logits"
            acc["y"].append(y)
            acc["p"].append(np.array([pred.probabilities[t] for t in PREDICTION_TYPES]))
            acc["network"].append(parts["network"])
            acc["statistics"].append(parts["statistics"])
    return {k: np.stack(v) for k, v in acc.items()}


def _fold_oof(model: Path, train_csv: Path) -> dict[str, Any]:
    """Out-of-fold figures of a run that trained only some folds: the paths' AUCs over their validation studies."""
    from cspine.cls.evaluate import read_labels
    from cspine.cls.oof import path_aucs, path_logits, read_wide
    from cspine.labels import CERVICAL
    from cspine.metrics import as_matrix

    uids, _, columns = read_wide(sorted(model.glob("oof_fold*.csv")))
    y = as_matrix(read_labels(train_csv), uids, CERVICAL)
    return {"paths": path_aucs(y, path_logits(columns)), "studies": len(uids)}


def _score(t: dict[str, np.ndarray]) -> dict[str, Any]:
    from cspine.cls.evaluate import compute_metrics
    from cspine.cls.oof import path_aucs
    from cspine.metrics import competition_loss

    y, p = t["y"], t["p"]
    m = compute_metrics(y, p)
    return {
        "competition_loss": m["competition_loss"],
        "test_prevalence_loss": competition_loss(y, np.tile(y.mean(axis=0), (len(y), 1))),
        "rsna_prevalence_loss": m["baselines"]["rsna_prevalence"],
        "mean_vertebra_auc": m["mean_vertebra_auc"],
        "patient_auc": m["patient_auc"],
        "paths": path_aucs(y[:, 1:], {"network": t["network"], "statistics": t["statistics"]}),
        "positives": {"patients": int(y[:, 0].sum()), "vertebrae": int(y[:, 1:].sum())},
    }


def _install(out: Path, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """The run's fold 0 into the package, with what made it: command, seconds, figures and the studies it saw."""
    from cspine.cls.shipped import install
    from cspine.runtime import versions

    if len(args.runs) != 1:
        raise SystemExit("--install takes one run (--runs both or --runs network)")
    name = args.runs[0]
    model = out / "models" / (f"{name}-{args.tag}" if args.tag else name)
    record = {
        "command": "python benchmarks/bench_classifier.py " + shlex.join(sys.argv[1:]),
        "seconds": results["seconds"],
        "figures": results["runs"][name],
        # training and validation studies of the fold (seed 2101 by default), for anyone checking a figure's studies
        "train_uids": sorted(json.loads((model / "folds.json").read_text())),
        "versions": versions(),
        "machine": {"cpus": os.cpu_count()},
    }
    print(f"installed: {install(model, record, out / 'cache' / 'train')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--train-studies", type=int, default=200)
    ap.add_argument("--train-seed", type=int, default=2101)
    ap.add_argument("--test-studies", type=int, default=100)
    ap.add_argument("--test-seed", type=int, default=2102)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2, help="synth / prepare / pseudo-label / test-crop processes")
    ap.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS), help="none: the two sets only")
    ap.add_argument("--cls-args", default="", help="extra train-cls flags for every run (one quoted string)")
    ap.add_argument("--tag", default="", help="model folders are OUT/models/RUN-TAG (default: OUT/models/RUN)")
    ap.add_argument("--seg-masks", action="store_true",
                    help="train and test on the segmenter's masks (what a user has) instead of the generator's")
    ap.add_argument("--seg-model", type=Path, default=None, help="with --seg-masks (default: the shipped segmenter)")
    ap.add_argument("--install", action="store_true",
                    help="copy fold 0 of the (one) run into the package as the shipped classifier (cspine.cls.shipped)")
    args = ap.parse_args()
    out: Path = args.out
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    train = _generate(out, "train", args.train_studies, args.train_seed, args.workers)
    test = _generate(out, "test", args.test_studies, args.test_seed, args.workers)
    seconds["generate_and_prepare"] = round(time.perf_counter() - t, 1)
    masks: dict[str, Path | None] = {"train": None, "test": None}
    mask_args: list[str] = []
    if args.seg_masks:
        from cspine.seg.shipped import shipped_model

        seg_model = args.seg_model or shipped_model()
        t = time.perf_counter()
        masks = {name: _segment(out / "cache" / name, seg_model, out / "segmasks" / name, args.device, args.workers)
                 for name in ("train", "test")}  # fmt: skip
        mask_args = ["--masks", str(masks["train"]), "--masks-first"]
        seconds["segment"] = round(time.perf_counter() - t, 1)
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "seconds": seconds, "runs": {}}
    for name in args.runs:
        model = out / "models" / (f"{name}-{args.tag}" if args.tag else name)
        t = time.perf_counter()
        _cspine("train-cls", "--data", str(train), "--out", str(model), "--epochs", str(args.epochs),
                "--device", args.device, "--threads", str(args.threads), "--no-progress",
                *RUNS[name], *mask_args, *shlex.split(args.cls_args))  # fmt: skip
        seconds[f"train_{name}"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        scored = _score(_test_logits(model, test, args.device, masks["test"], args.workers))
        seconds[f"test_{name}"] = round(time.perf_counter() - t, 1)
        metrics = model / "metrics.json"  # written when every fold is done; a one-fold run has its fold's OOF
        train_csv = out / "data" / "train" / "train.csv"
        oof = json.loads(metrics.read_text()) if metrics.exists() else _fold_oof(model, train_csv)
        speed = oof.get("speed", {})
        results["runs"][name] = {"test": scored, "oof": {k: oof.get(k) for k in ("competition_loss", "paths")},
                                 "speed": speed}  # fmt: skip
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps(results, indent=2, default=str))
    if args.install:
        _install(out, args, results)
    for name, r in results["runs"].items():
        s, paths = r["test"], r["test"]["paths"]
        aucs = " / ".join("-" if paths[k]["mean_vertebra_auc"] is None else f"{paths[k]['mean_vertebra_auc']:.3f}"
                          for k in ("network", "statistics", "both"))  # fmt: skip
        print(f"| {name} | {s['competition_loss']:.4f} | {s['test_prevalence_loss']:.4f} | {aucs} | "
              f"{seconds[f'train_{name}']:.0f} s |")  # fmt: skip


if __name__ == "__main__":
    main()
