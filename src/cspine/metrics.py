"""Scores: the RSNA 2022 competition metric exactly as the host defined it, AUC, sensitivity/specificity, Dice.

The competition metric is a weighted multi-label log loss normalised per study:
for study i and target j (patient_overall, C1..C7) with weights 14/7 (patient, positive/negative)
and 2/1 (vertebrae), L_i = sum_j w_ij * BCE_ij / sum_j w_ij, and the score is the mean of L_i.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from cspine.labels import METRIC_WEIGHTS, PREDICTION_TYPES

EPS = 1e-15


def competition_loss(y_true: np.ndarray, y_pred: np.ndarray, targets: Sequence[str] = PREDICTION_TYPES) -> float:
    """RSNA 2022 weighted log loss.

    Args:
        y_true: (n_studies, n_targets) 0/1 labels, columns in ``targets`` order.
        y_pred: (n_studies, n_targets) probabilities; clipped to [1e-15, 1 - 1e-15].
        targets: column names (default patient_overall, C1..C7).

    Example:
        >>> round(competition_loss(np.zeros((1, 8)), np.full((1, 8), 0.5)), 4)
        0.6931
    """
    y = np.asarray(y_true, dtype=np.float64)
    p = np.clip(np.asarray(y_pred, dtype=np.float64), EPS, 1 - EPS)
    if y.shape != p.shape or y.ndim != 2 or y.shape[1] != len(targets):
        raise ValueError(f"labels {y.shape} and predictions {p.shape} must both be (n, {len(targets)})")
    neg = np.array([METRIC_WEIGHTS[t][0] for t in targets])
    pos = np.array([METRIC_WEIGHTS[t][1] for t in targets])
    w = np.where(y > 0.5, pos, neg)
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    per_study = (w * bce).sum(axis=1) / w.sum(axis=1)
    return float(per_study.mean())


def as_matrix(
    rows: Mapping[str, Mapping[str, float]], uids: Sequence[str], targets: Sequence[str] = PREDICTION_TYPES
) -> np.ndarray:
    """{uid: {target: value}} -> (len(uids), len(targets)) array in the given order."""
    missing = [u for u in uids if u not in rows]
    if missing:
        raise ValueError(f"{len(missing)} studies have no values, e.g. {missing[0]}")
    return np.array([[float(rows[u][t]) for t in targets] for u in uids], dtype=np.float64)


def auc(y_true: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC, or None when only one class is present (undefined, not 0.5)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true)
    if len(np.unique(y)) < 2:
        return None
    return float(roc_auc_score(y, score))


def sens_spec(y_true: np.ndarray, score: np.ndarray, threshold: float = 0.5) -> tuple[float | None, float | None]:
    """Sensitivity and specificity at a threshold (None where a class is absent)."""
    y = np.asarray(y_true) > 0.5
    hit = np.asarray(score) >= threshold
    sens = float((hit & y).sum() / y.sum()) if y.any() else None
    spec = float((~hit & ~y).sum() / (~y).sum()) if (~y).any() else None
    return sens, spec


def threshold_for_sensitivity(y_true: np.ndarray, score: np.ndarray, target: float = 0.9) -> float:
    """The highest threshold that reaches ``target`` sensitivity (an operating point for triage)."""
    y = np.asarray(y_true) > 0.5
    if not y.any():
        return 0.5
    pos = np.sort(np.asarray(score)[y])[::-1]
    k = int(np.ceil(target * len(pos))) - 1
    return float(pos[max(0, min(k, len(pos) - 1))])


def dice(pred: np.ndarray, truth: np.ndarray, label: int) -> float | None:
    """Dice of one label; None when the label is absent from both (undefined)."""
    a = pred == label
    b = truth == label
    denom = int(a.sum()) + int(b.sum())
    if denom == 0:
        return None
    return 2.0 * int((a & b).sum()) / denom
