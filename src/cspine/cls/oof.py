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
from cspine.labels import PREDICTION_TYPES
from cspine.metrics import competition_loss
from cspine.runtime import write_json


def write_oof(path: Path, uids: list[str], pred: dict[str, np.ndarray], fold: int, patient_from: str) -> None:
    """One fold's held-out probabilities of the sequence recipe, with both patient_overall variants beside them."""
    p = sequence_probs(pred["patient"], pred["vertebra"], pred["present"], patient_from)
    head = sigmoid(pred["patient"])
    nor = noisy_or(p[:, 1:])
    write_wide(
        path,
        uids,
        p,
        {
            "fold": [str(fold)] * len(uids),
            "patient_head": [f"{v:.9g}" for v in head],
            "patient_noisy_or": [f"{v:.9g}" for v in nor],
        },
    )


def _read_wide(paths: list[Path]) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    import csv

    uids: list[str] = []
    probs: list[list[float]] = []
    extra: dict[str, list[float]] = {}
    for p in paths:
        with open(p, newline="") as f:
            for r in csv.DictReader(f):
                uids.append(r["StudyInstanceUID"])
                probs.append([float(r[t]) for t in PREDICTION_TYPES])
                for k in ("patient_head", "patient_noisy_or"):
                    if k in r:
                        extra.setdefault(k, []).append(float(r[k]))
    return uids, np.array(probs), {k: np.array(v) for k, v in extra.items()}


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
    uids, p, alt = _read_wide(oof_parts)
    order = np.argsort(uids)
    uids = [uids[i] for i in order]
    p = p[order]
    alt = {k: v[order] for k, v in alt.items()}
    row_of = {u: i for i, u in enumerate(store.uids)}
    y = store.labels()[[row_of[u] for u in uids]]
    folds = json.loads((out / "folds.json").read_text())
    fold_col = [str(folds.get(u, "test")) for u in uids]
    if len(oof_parts) > 1 or oof_parts[0].name != "oof.csv":
        write_wide(out / "oof.csv", uids, p, {"fold": fold_col, **{k: [f"{x:.9g}" for x in v] for k, v in alt.items()}})
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


__all__ = ["finish", "write_oof"]
