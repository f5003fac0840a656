"""``cspine evaluate``: score predictions against labels the way the host did, and explain the score.

Writes ``metrics.json`` (machine-readable) and ``report.md`` (for people) with the competition weighted log loss
(exact host formula, :func:`cspine.metrics.competition_loss`), per-target AUC, sensitivity/specificity at 0.5 and
at an operating point chosen for a target sensitivity, scikit-learn's classification report per target, and the
seed's pictures: a confusion matrix per vertebra, ROC curves and, when a training history is given, loss and
accuracy curves. Predictions may be a Kaggle submission (row_id, fractured) or wide (StudyInstanceUID,
patient_overall, C1..C7); labels are train.csv.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cspine.errors import CspineInputError
from cspine.labels import CERVICAL, PATIENT, PREDICTION_TYPES, PREVALENCE, split_row_id
from cspine.metrics import as_matrix, auc, competition_loss, sens_spec, threshold_for_sensitivity
from cspine.runtime import write_json

log = logging.getLogger(__name__)

WIDE_ID = "StudyInstanceUID"


@dataclass(frozen=True)
class EvaluateConfig:
    """What ``cspine evaluate`` reads and writes.

    Attributes:
        pred: predictions CSV (Kaggle or wide format).
        labels: train.csv-style labels.
        out: output folder.
        history: optional training history JSON (list of epoch rows) for the loss/accuracy curves.
        sensitivity: target sensitivity of the operating point.
        train_labels: the labels the model was trained on (train.csv): adds the no-skill baseline fitted on the
            same data, each column's training prevalence, beside the RSNA prevalence (which knows the population).
    """

    pred: Path
    labels: Path
    out: Path
    history: Path | None = None
    sensitivity: float = 0.9
    train_labels: Path | None = None


def read_predictions(path: Path) -> dict[str, dict[str, float]]:
    """{uid: {target: probability}} from a Kaggle submission or a wide CSV (extra columns are ignored)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: prediction file not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        rows = list(reader)
    out: dict[str, dict[str, float]] = {}
    if "row_id" in cols and "fractured" in cols:
        for r in rows:
            uid, ptype = split_row_id(r["row_id"])
            out.setdefault(uid, {})[ptype] = _prob(r["fractured"], path)
    elif WIDE_ID in cols and all(t in cols for t in PREDICTION_TYPES):
        for r in rows:
            out[r[WIDE_ID]] = {t: _prob(r[t], path) for t in PREDICTION_TYPES}
    else:
        raise CspineInputError(
            f"{path}: expected columns row_id,fractured (Kaggle) or {WIDE_ID},{','.join(PREDICTION_TYPES)} "
            f"(wide); found {','.join(cols)}"
        )
    incomplete = [u for u, d in out.items() if len(d) != len(PREDICTION_TYPES)]
    if incomplete:
        raise CspineInputError(f"{path}: {len(incomplete)} studies lack some prediction types, e.g. {incomplete[0]}")
    return out


def _prob(text: str, path: Path) -> float:
    try:
        v = float(text)
    except ValueError as exc:
        raise CspineInputError(f"{path}: {text!r} is not a probability") from exc
    if not 0.0 <= v <= 1.0 or np.isnan(v):
        raise CspineInputError(f"{path}: probability {v} outside [0, 1]")
    return v


def read_labels(path: Path) -> dict[str, dict[str, int]]:
    """train.csv as {uid: {target: 0/1}}."""
    from cspine.data.rsna import read_train_labels

    return read_train_labels(Path(path))


def write_wide(path: Path, uids: list[str], probs: np.ndarray, extra: dict[str, list[Any]] | None = None) -> Path:
    """Write (n, 8) probabilities as a wide CSV (StudyInstanceUID, patient_overall, C1..C7, extra columns...)."""
    from cspine.data.rsna import write_csv_atomic

    extra = extra or {}
    header = [WIDE_ID, *PREDICTION_TYPES, *extra]
    rows = [[u, *(f"{float(v):.9g}" for v in probs[i]), *(extra[k][i] for k in extra)] for i, u in enumerate(uids)]
    write_csv_atomic(Path(path), header, rows)
    return Path(path)


def compute_metrics(y: np.ndarray, p: np.ndarray, sensitivity: float = 0.9) -> dict[str, Any]:
    """All numbers of the report for (n, 8) labels and probabilities in PREDICTION_TYPES order."""
    from sklearn.metrics import classification_report, confusion_matrix

    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    prevalence = np.tile([PREVALENCE[t] for t in PREDICTION_TYPES], (len(y), 1))
    per: dict[str, Any] = {}
    for j, t in enumerate(PREDICTION_TYPES):
        yt, pt = y[:, j], p[:, j]
        s05, c05 = sens_spec(yt, pt, 0.5)
        thr = threshold_for_sensitivity(yt, pt, sensitivity)
        s_op, c_op = sens_spec(yt, pt, thr)
        q = np.clip(pt, 1e-15, 1 - 1e-15)
        per[t] = {
            "positives": int(yt.sum()),
            "auc": auc(yt, pt),
            "log_loss": float(-(yt * np.log(q) + (1 - yt) * np.log(1 - q)).mean()),
            "at_0.5": {"sensitivity": s05, "specificity": c05},
            "operating_point": {"threshold": thr, "sensitivity": s_op, "specificity": c_op},
            "confusion_0.5": confusion_matrix(yt > 0.5, pt >= 0.5, labels=[False, True]).tolist(),
            "classification_report": classification_report(
                yt > 0.5,
                pt >= 0.5,
                labels=[False, True],
                target_names=["not fractured", "fractured"],
                output_dict=True,
                zero_division=0,
            ),
        }
    vert_aucs = [per[v]["auc"] for v in CERVICAL if per[v]["auc"] is not None]
    return {
        "n_studies": len(y),
        "competition_loss": competition_loss(y, p),
        "baselines": {
            "constant_0.5": competition_loss(y, np.full_like(p, 0.5)),
            "rsna_prevalence": competition_loss(y, prevalence),
        },
        "mean_vertebra_auc": float(np.mean(vert_aucs)) if vert_aucs else None,
        "patient_auc": per[PATIENT]["auc"],
        "operating_sensitivity": sensitivity,
        "targets": per,
    }


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Score ``cfg.pred`` against ``cfg.labels``; write metrics.json, report.md and PNGs to ``cfg.out``."""
    from cspine.cls import plots

    preds = read_predictions(cfg.pred)
    labels = read_labels(cfg.labels)
    missing = [u for u in preds if u not in labels]
    if missing:
        raise CspineInputError(f"{cfg.labels}: no labels for {len(missing)} predicted studies, e.g. {missing[0]}")
    if not preds:
        raise CspineInputError(f"{cfg.pred}: no predictions")
    uids = sorted(preds)
    y = as_matrix(labels, uids)
    p = as_matrix(preds, uids)
    m = compute_metrics(y, p, cfg.sensitivity)
    if cfg.train_labels is not None:
        train = read_labels(cfg.train_labels)
        rates = as_matrix(train, sorted(train)).mean(axis=0)
        m["baselines"]["train_prevalence"] = competition_loss(y, np.tile(rates, (len(y), 1)))
    m["pred"] = str(cfg.pred)
    m["labels"] = str(cfg.labels)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "confusion": plots.confusion_matrices(
            {t: np.array(m["targets"][t]["confusion_0.5"]) for t in PREDICTION_TYPES}, out / "confusion.png", 0.5
        ).name,
        "roc": plots.roc_curves(y, p, PREDICTION_TYPES, out / "roc.png").name,
    }
    history = _history(cfg)
    if history:
        files["curves"] = plots.training_curves(history, out / "curves.png").name
    m["files"] = files
    write_json(out / "metrics.json", m)
    (out / "report.md").write_text(report_markdown(m))
    return m


def _history(cfg: EvaluateConfig) -> list[dict[str, Any]]:
    path = cfg.history
    if path is None:
        guess = Path(cfg.pred).parent / "history.json"
        path = guess if guess.exists() else None
    if path is None:
        return []
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: history file not found")
    rows = json.loads(Path(path).read_text())
    return rows if isinstance(rows, list) else rows.get("epochs", [])


def _f(v: float | None, nd: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def report_markdown(m: dict[str, Any]) -> str:
    """The human-readable report of :func:`compute_metrics` output."""
    lines = [
        "# Fracture classification: evaluation",
        "",
        f"Predictions `{m.get('pred', '')}` against labels `{m.get('labels', '')}`: {m['n_studies']} studies.",
        "",
        f"**Competition weighted log loss: {m['competition_loss']:.4f}** (lower is better; "
        f"constant 0.5 gives {m['baselines']['constant_0.5']:.4f}, the RSNA prevalence "
        f"{m['baselines']['rsna_prevalence']:.4f}"
        + (
            f", the training labels' prevalence {m['baselines']['train_prevalence']:.4f}"
            if "train_prevalence" in m["baselines"]
            else ""
        )
        + ").",
        "",
        f"Mean vertebra AUC: {_f(m['mean_vertebra_auc'])}; patient AUC: {_f(m['patient_auc'])}.",
        "",
        f"| target | positives | AUC | log loss | sens@0.5 | spec@0.5 | threshold for sens "
        f"{m['operating_sensitivity']:.2f} | sens | spec |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t, d in m["targets"].items():
        op = d["operating_point"]
        lines.append(
            f"| {t} | {d['positives']} | {_f(d['auc'])} | {_f(d['log_loss'])} | {_f(d['at_0.5']['sensitivity'])} | "
            f"{_f(d['at_0.5']['specificity'])} | {_f(op['threshold'], 4)} | {_f(op['sensitivity'])} | "
            f"{_f(op['specificity'])} |"
        )
    lines += [
        "",
        "The operating point is chosen on these same predictions (optimistic); fix it on validation data before use.",
        "",
        "## Classification report per target (threshold 0.5)",
        "",
    ]
    for t, d in m["targets"].items():
        cr = d["classification_report"]
        lines += [f"### {t}", "", "| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
        for cls in ("not fractured", "fractured", "macro avg", "weighted avg"):
            r = cr[cls]
            lines.append(
                f"| {cls} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1-score']:.3f} | {int(r['support'])} |"
            )
        lines.append(f"| accuracy | | | {cr['accuracy']:.3f} | |")
        lines.append("")
    files = m.get("files", {})
    if files:
        lines += ["## Pictures", ""] + [f"![{k}]({v})" for k, v in files.items()] + [""]
    return "\n".join(lines)
