"""Out-of-fold predictions -> temperature calibration -> evaluation -> ``metrics.json`` (both recipes).

The recipes write their held-out probabilities as wide CSVs (one per fold for ``sequence``); :func:`finish`
assembles them, fits the calibration on them, runs ``cspine evaluate`` and writes the model directory's summary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cspine.cls.calibrate import Calibration, fit_temperature, sigmoid
from cspine.cls.config import TrainConfig
from cspine.cls.dataset import StudyStore
from cspine.cls.evaluate import EvaluateConfig, evaluate, write_wide
from cspine.cls.recipes import noisy_or, sequence_probs
from cspine.engine.model_dir import read_history
from cspine.labels import CERVICAL, PREDICTION_TYPES
from cspine.metrics import auc, competition_loss
from cspine.runtime import write_json

#: The two parts of a vertebra logit: the network's (CNN + GRU) and the hand-made statistics' (the fitted lucency
#: regression, or the joint linear layer over the statistics and the density histogram). Their sum is the model's
#: logit ("both").
PATHS = ("network", "statistics")


def write_oof(path: Path, uids: list[str], pred: dict[str, np.ndarray], fold: int, patient_from: str) -> None:
    """One fold's held-out probabilities of the sequence recipe, with both patient_overall variants beside them,
    and each vertebra logit split into its network and statistics parts (empty where the mask lacks the vertebra)."""
    p = sequence_probs(pred["patient"], pred["vertebra"], pred["present"], patient_from)
    head = sigmoid(pred["patient"])
    nor = noisy_or(p[:, 1:])
    parts = {"network": pred["vertebra"] - pred["features"], "statistics": pred["features"]}
    split = {
        f"{path_name}_{v}": [f"{x:.9g}" if ok else "" for x, ok in zip(logit[:, j], pred["present"][:, j], strict=True)]
        for path_name, logit in parts.items()
        for j, v in enumerate(CERVICAL)
    }
    write_wide(
        path,
        uids,
        p,
        {
            "fold": [str(fold)] * len(uids),
            "patient_head": [f"{v:.9g}" for v in head],
            "patient_noisy_or": [f"{v:.9g}" for v in nor],
            **split,
        },
    )


def path_aucs(y: np.ndarray, parts: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Vertebra AUCs of the network part, the statistics part and both (their sum) of the out-of-fold logits.

    ``y`` (n, 7) labels; ``parts`` (n, 7) logits per path, NaN where the mask lacks the vertebra (not scored).
    A path that is absent from the model (all zeros, e.g. ``--no-lucency``'s statistics) is reported as None, so
    a reader sees which part ranks and which part is not there.
    """
    both = sum(parts[k] for k in PATHS)
    out: dict[str, dict[str, Any]] = {}
    for name, logit in {**parts, "both": both}.items():
        seen = ~np.isnan(logit)
        if not np.any(logit[seen]):
            out[name] = {"mean_vertebra_auc": None, "auc": {}}
            continue
        per = {v: auc(y[seen[:, j], j], logit[seen[:, j], j]) for j, v in enumerate(CERVICAL)}
        known = [a for a in per.values() if a is not None]
        out[name] = {"mean_vertebra_auc": float(np.mean(known)) if known else None, "auc": per}
    return out


def read_wide(paths: list[Path]) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """Studies, (n, 8) probabilities and the extra columns (patient heads, each path's vertebra logits; NaN where
    empty) of per-fold out-of-fold files, in file order."""
    import csv

    uids: list[str] = []
    probs: list[list[float]] = []
    extra: dict[str, list[float]] = {}
    for p in paths:
        with open(p, newline="") as f:
            for r in csv.DictReader(f):
                uids.append(r["StudyInstanceUID"])
                probs.append([float(r[t]) for t in PREDICTION_TYPES])
                for k in ("patient_head", "patient_noisy_or", *(f"{n}_{v}" for n in PATHS for v in CERVICAL)):
                    if k in r:
                        extra.setdefault(k, []).append(float(r[k]) if r[k] else np.nan)
    return uids, np.array(probs), {k: np.array(v) for k, v in extra.items()}


def paths_line(paths: dict[str, dict[str, Any]]) -> str:
    """"network alone 0.612, statistics alone 0.741, both 0.755" (n/a for a path the model lacks)."""
    names = {"network": "network alone", "statistics": "statistics alone", "both": "both"}
    parts = []
    for key, label in names.items():
        a = paths.get(key, {}).get("mean_vertebra_auc")
        parts.append(f"{label} {'n/a' if a is None else f'{a:.3f}'}")
    return ", ".join(parts)


def path_logits(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """(n, 7) vertebra logits of each path that :func:`read_wide`'s extra columns hold (``network_C1`` ...)."""
    return {n: np.stack([columns[f"{n}_{v}"] for v in CERVICAL], axis=1) for n in PATHS if f"{n}_C1" in columns}


def finish(
    cfg: TrainConfig,
    store: StudyStore,
    oof_parts: list[Path],
    timings: dict[str, float],
    extra: dict[str, Any] | None = None,
    calibrate: bool = True,
) -> dict[str, Any]:
    """Assemble OOF predictions, fit calibration, evaluate, write metrics.json; returns the summary."""
    from cspine.data.rsna import write_csv_atomic

    out = cfg.out
    uids, p, extra_cols = read_wide(oof_parts)
    order = np.argsort(uids)
    uids = [uids[i] for i in order]
    p = p[order]
    extra_cols = {k: v[order] for k, v in extra_cols.items()}
    alt = {k: v for k, v in extra_cols.items() if k.startswith("patient_")}
    split = path_logits(extra_cols)
    row_of = {u: i for i, u in enumerate(store.uids)}
    y = store.labels()[[row_of[u] for u in uids]]
    folds = json.loads((out / "folds.json").read_text())
    fold_col = [str(folds.get(u, "test")) for u in uids]
    if len(oof_parts) > 1 or oof_parts[0].name != "oof.csv":
        columns = {k: ["" if np.isnan(x) else f"{x:.9g}" for x in v] for k, v in extra_cols.items()}
        write_wide(out / "oof.csv", uids, p, {"fold": fold_col, **columns})
    write_csv_atomic(
        out / "labels.csv",
        ["StudyInstanceUID", *PREDICTION_TYPES],
        [[u, *(int(store.studies[row_of[u]].labels[t]) for t in PREDICTION_TYPES)] for u in uids],
    )
    cal = fit_temperature(y, p) if calibrate else Calibration()
    cal.save(out)
    pc = cal.apply(p)
    write_wide(out / "oof_calibrated.csv", uids, pc, {"fold": fold_col})
    history = []
    for hp in sorted(out.glob("*.history.json")):
        history += read_history(hp)["epochs"]
    write_json(out / "history.json", history)
    ev = evaluate(
        EvaluateConfig(
            pred=out / "oof_calibrated.csv",
            labels=out / "labels.csv",
            out=out / "eval",
            history=out / "history.json",
            sensitivity=cfg.operating_sensitivity,
        )
    )
    train_imgs = sum(r["train_images_per_s"] * r["train_seconds"] for r in history)
    train_secs = sum(r["train_seconds"] for r in history)
    summary = {
        "recipe": cfg.recipe,
        "split": cfg.split,
        "studies": len(uids),
        "competition_loss": ev["competition_loss"],
        "competition_loss_uncalibrated": competition_loss(y, p),
        "mean_vertebra_auc": ev["mean_vertebra_auc"],
        "patient_auc": ev["patient_auc"],
        "auc": {t: ev["targets"][t]["auc"] for t in PREDICTION_TYPES},
        "calibration": {"temperatures": cal.temperatures, "before": cal.before, "after": cal.after},
        # which part of the model ranks: the network alone, the statistics alone, both (out of fold)
        "paths": path_aucs(y[:, 1:], split) if len(split) == len(PATHS) else None,
        "speed": {
            "train_images_per_s": train_imgs / train_secs if train_secs else None,
            "infer_images_per_s": timings["infer_images"] / timings["infer_seconds"]
            if timings.get("infer_seconds")
            else None,
        },
        "runs": {
            hp.name.split(".")[0]: {k: v for k, v in read_history(hp).items() if k != "epochs"}
            for hp in sorted(out.glob("*.history.json"))
        },
    }
    for k, v in alt.items():  # the two patient_overall variants, side by side
        q = p.copy()
        q[:, 0] = v
        summary[f"competition_loss_{k}"] = competition_loss(y, q)
    summary.update(extra or {})
    write_json(out / "metrics.json", summary)
    return summary


__all__ = ["PATHS", "finish", "path_aucs", "path_logits", "paths_line", "read_wide", "write_oof"]
