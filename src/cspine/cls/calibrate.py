"""Temperature scaling fitted on out-of-fold predictions, saved with the model as ``calibration.json``.

Why temperature only: with ~60-2,000 studies and rare vertebra labels, anything with more parameters than one
scale per group overfits the out-of-fold set it is fitted on. Two temperatures are fitted, one for patient_overall
and one shared by C1..C7, by minimising the competition metric itself (the metric weights positives 2:1, so its
optimum is not the plain log-loss optimum; fitting the metric is what the submission is judged on). Both the
competition loss and the plain mean binary log loss are reported before and after.

The temperature divides the logit's distance from the column's base rate (its frequency in the labels the
calibration is fitted on, smoothed towards the RSNA prevalence), not from 0: a large temperature then shrinks a
weak model towards the base rate, near the best constant, instead of towards 0.5, which for a vertebra fractured in
5 % of studies is far worse than either.
Files without ``centres`` (older models) centre at logit 0.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cspine.errors import ConfigError
from cspine.labels import CERVICAL, PATIENT, PREDICTION_TYPES, PREVALENCE
from cspine.metrics import EPS, competition_loss
from cspine.runtime import write_json

CALIBRATION_JSON = "calibration.json"
#: weight of the RSNA prevalence in the calibration's base rates, in studies (negligible at RSNA's 2,019)
PRIOR_STUDIES = 20.0


def logit(p: np.ndarray) -> np.ndarray:
    """Inverse sigmoid with the metric's clipping (so 0 and 1 stay finite)."""
    q = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(q) - np.log1p(-q)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function without overflow warnings for large negative logits."""
    from scipy.special import expit

    return expit(np.asarray(z, dtype=np.float64))


def mean_log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Plain (unweighted) binary log loss over every study and target."""
    q = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    y = np.asarray(y, dtype=np.float64)
    return float(-(y * np.log(q) + (1 - y) * np.log(1 - q)).mean())


@dataclass(frozen=True)
class Calibration:
    """Temperatures and centres per target: prob = sigmoid(c + (logit - c) / T); T = 1 is the identity."""

    temperatures: dict[str, float] = field(default_factory=lambda: {t: 1.0 for t in PREDICTION_TYPES})
    centres: dict[str, float] = field(default_factory=dict)
    fitted: bool = False
    n_studies: int = 0
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)

    def apply(self, probs: np.ndarray, targets: tuple[str, ...] = PREDICTION_TYPES) -> np.ndarray:
        """Calibrate an (n, len(targets)) probability matrix."""
        t = np.array([self.temperatures.get(name, 1.0) for name in targets])
        c = np.array([self.centres.get(name, 0.0) for name in targets])
        return sigmoid(c[None, :] + (logit(probs) - c[None, :]) / t[None, :])

    def save(self, model_dir: Path) -> Path:
        write_json(model_dir / CALIBRATION_JSON, asdict(self))
        return model_dir / CALIBRATION_JSON

    @staticmethod
    def load(model_dir: Path) -> Calibration:
        """The directory's calibration, or the identity when it has none (e.g. a fold still training)."""
        path = Path(model_dir) / CALIBRATION_JSON
        if not path.exists():
            return Calibration()
        return Calibration.from_dict(json.loads(path.read_text()), str(path))

    @staticmethod
    def from_dict(d: Any, where: str) -> Calibration:
        """A calibration as :meth:`save` writes it; ``where`` names the file in the error of a broken one."""
        try:
            cal = Calibration(
                temperatures={k: float(v) for k, v in d["temperatures"].items()},
                centres={k: float(v) for k, v in d.get("centres", {}).items()},
                fitted=bool(d.get("fitted", True)),
                n_studies=int(d.get("n_studies", 0)),
                before=d.get("before", {}),
                after=d.get("after", {}),
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:  # null, text, missing or misshapen
            raise ConfigError(f"{where}: broken calibration file ({type(exc).__name__}: {exc})") from None
        bad = {k: v for k, v in (cal.temperatures | cal.centres).items() if not np.isfinite(v)}
        if bad or any(v <= 0 for v in cal.temperatures.values()):
            raise ConfigError(f"{where}: temperatures must be finite and > 0, centres finite; got {d['temperatures']}")
        return cal


def fit_temperature(y: np.ndarray, probs: np.ndarray, bounds: tuple[float, float] = (0.25, 64.0)) -> Calibration:
    """Fit the patient and the shared vertebra temperature on (n, 8) labels and probabilities (PREDICTION_TYPES).

    The two groups are fitted one after the other by a bounded scalar search on log T (the metric couples them only
    through each study's weight normaliser, so one pass is within noise of the joint optimum).
    """
    from scipy.optimize import minimize_scalar

    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 2 or y.shape[1] != len(PREDICTION_TYPES):
        raise ValueError(f"labels {y.shape} and predictions {p.shape} must both be (n, {len(PREDICTION_TYPES)})")
    # base rates, smoothed towards the RSNA prevalence by PRIOR_STUDIES pseudo-studies: with a few dozen
    # studies a column's own rate is noise (2 of 26 for a vertebra fractured in 14 % of RSNA patients)
    prior = np.array([PREVALENCE[t] for t in PREDICTION_TYPES])
    c = logit((y.sum(axis=0) + PRIOR_STUDIES * prior) / (len(y) + PRIOR_STUDIES))
    z = logit(p) - c[None, :]
    temps = np.ones(len(PREDICTION_TYPES))
    groups = [[0], list(range(1, len(PREDICTION_TYPES)))]
    for cols in groups:

        def objective(log_t: float, cols: list[int] = cols) -> float:
            t = temps.copy()
            t[cols] = np.exp(log_t)
            return competition_loss(y, sigmoid(c[None, :] + z / t[None, :]))

        res = minimize_scalar(objective, bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded")
        if res.fun < objective(0.0):
            temps[cols] = float(np.exp(res.x))
    cal_p = sigmoid(c[None, :] + z / temps[None, :])
    return Calibration(
        temperatures={PATIENT: float(temps[0]), **{v: float(temps[1 + i]) for i, v in enumerate(CERVICAL)}},
        centres={name: float(c[i]) for i, name in enumerate(PREDICTION_TYPES)},
        fitted=True,
        n_studies=len(y),
        before={"competition_loss": competition_loss(y, p), "mean_log_loss": mean_log_loss(y, p)},
        after={"competition_loss": competition_loss(y, cal_p), "mean_log_loss": mean_log_loss(y, cal_p)},
    )
