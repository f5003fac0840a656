"""The linear model on the lucency statistics, fitted outside the network and saved beside its weights.

:class:`LucencyModel` standardises the statistics with the training fold's mean and std (fractions as logs,
clipped) and, for ``feature_fit="logistic"``, holds an L2 logistic regression fitted on them (scikit-learn) before
the network trains. Its logits are added to the network's vertebra logits in one step (``offset`` of
``SequenceNet.forward``), at training and at inference alike, so the network learns only what the statistics miss.
For ``feature_fit="joint"`` it only standardises, and the network's own linear layer reads the standardised values.

Why a convex fit outside the network: trained jointly with a CNN that memorises the training positives, the same
linear layer stopped short of the logistic regression's optimum (benchmarks/cls_results.md).

Saved as ``fold{k}.features.json`` with :data:`cspine.features.config.FEATURES`; loading refuses a file whose
feature config or version differs from this cspine's (the statistics it was fitted on would mean something else).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cspine.features.config import FEATURES
from cspine.features.lucency import FRACTION_FLOOR, N_FRACTIONS, N_LUCENCY
from cspine.labels import CERVICAL

NV = len(CERVICAL)
#: Standardised lucency inputs are clipped here (FEATURES.lucency.clip).
STATS_CLIP = FEATURES.lucency.clip


def lucency_inputs(stats: torch.Tensor) -> torch.Tensor:
    """What the models read of the lucency statistics: the fractions as log(fraction + floor), the rest as is.
    Raw fractions are heavy-tailed (benchmarks/cls_results.md: raw fractions scored worse than the prevalence)."""
    frac = torch.log(stats[..., :N_FRACTIONS].clamp(min=0.0) + FRACTION_FLOOR)
    return torch.cat([frac, stats[..., N_FRACTIONS:]], dim=-1)


def relative_to_study(per_vertebra: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(B*7, F) per-vertebra features -> (B*7, 2F): each one, and its difference from the median of the study's
    present vertebrae. Bone density varies between patients (age) far more than between the vertebrae of one
    neck, so "more lucent than its neighbours" separates fractures where the absolute value is confounded. The
    median, not the mean: a fractured vertebra must not pull its own reference.
    """
    b, nv = present.shape
    h = per_vertebra.reshape(b, nv, -1)
    m = present.reshape(b, nv, 1)
    ref = torch.nanmedian(h.masked_fill(~m.bool(), float("nan")), dim=1, keepdim=True).values
    rel = torch.nan_to_num(h - ref) * m.float()
    return torch.cat([h, rel], dim=-1).reshape(b * nv, -1)


@dataclass
class LucencyModel:
    """Standardisation of the statistics and, when fitted, the logistic regression on them (float32 tensors).

    Attributes:
        mean, std: (N_LUCENCY,) of the training vertebrae's inputs (:func:`lucency_inputs`).
        weight: (2 * N_LUCENCY,) on the standardised inputs and their difference from the study's median; None
            when only standardising (the joint path).
        bias: (7,) per-vertebra intercept (zeros with no fit).
    """

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @classmethod
    def identity(cls) -> LucencyModel:
        """No standardisation (mean 0, std 1) and no regression."""
        return cls(torch.zeros(N_LUCENCY), torch.ones(N_LUCENCY))

    @classmethod
    def fit(
        cls, stats: torch.Tensor, present: torch.Tensor, labels: np.ndarray | None = None, c: float = 0.3
    ) -> LucencyModel:
        """Standardise on ``stats`` (n, 7, N_LUCENCY) raw of the ``present`` (n, 7) vertebrae; with ``labels``
        (n, 7) also fit the L2 logistic regression (C = ``c``; rows weighted as the metric weighs them, positives
        2x; a fold with one class leaves it at zero)."""
        model = cls.identity()
        x = lucency_inputs(stats[present].float())
        n = (~torch.isnan(x)).sum(0)
        if len(x) >= 2:  # NaN: not measured on that vertebra (the ring, cspine.features.ring); left out
            mean = torch.nanmean(x, 0)
            var = torch.nansum((x - mean) ** 2, 0) / (n - 1).clamp(min=1)
            model.mean = torch.where(n > 0, mean, torch.zeros_like(mean))
            model.std = torch.where(n > 1, var.sqrt(), torch.ones_like(var)).clamp(min=1e-6)
        if labels is None:
            return model
        from sklearn.linear_model import LogisticRegression

        n = len(stats)
        x = relative_to_study(model.standardise(stats, present), present).numpy().astype(np.float64)
        keep = present.reshape(-1).numpy()
        onehot = np.tile(np.eye(NV), (n, 1))
        y = np.asarray(labels, np.float64).reshape(-1)[keep]
        mu, sd = x[keep].mean(0), x[keep].std(0) + 1e-6  # the relative half is on a smaller scale: L2 needs both at 1
        weight, bias = np.zeros(x.shape[1]), np.zeros(NV)
        if len(np.unique(y)) == 2:
            lr = LogisticRegression(C=c, max_iter=5000)
            lr.fit(np.hstack([(x[keep] - mu) / sd, onehot[keep]]), y, sample_weight=1.0 + y)
            coef = lr.coef_[0]
            weight = coef[: x.shape[1]] / sd
            bias = lr.intercept_[0] + coef[x.shape[1] :] - float(weight @ mu)
        model.weight = torch.as_tensor(weight, dtype=torch.float32)
        model.bias = torch.as_tensor(bias, dtype=torch.float32)
        return model

    def standardise(self, stats: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(B, 7, N_LUCENCY) raw -> (B*7, N_LUCENCY): fractions as logs, standardised, clipped, zero where the
        vertebra is absent or the feature was not measured (NaN: the training vertebrae's mean)."""
        mean, std = self.mean.to(stats.device), self.std.to(stats.device)
        z = (lucency_inputs(stats.reshape(-1, stats.shape[-1]).float()) - mean) / std
        return torch.nan_to_num(z, nan=0.0).clamp(-STATS_CLIP, STATS_CLIP) * present.reshape(-1, 1).float()

    def logits(self, stats: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(B, 7) logits of the fitted regression (what is added to the network's vertebra logits)."""
        if self.weight is None or self.bias is None:
            raise ValueError("this LucencyModel only standardises: no regression was fitted")
        b = present.shape[0]
        x = relative_to_study(self.standardise(stats, present), present)
        w, bias = self.weight.to(x.device), self.bias.to(x.device)
        return ((x @ w).reshape(b, NV) + bias[None, :]).float()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the feature config and version it was fitted on."""
        out: dict[str, Any] = {"features": FEATURES.to_dict(), "mean": self.mean.tolist(), "std": self.std.tolist()}
        if self.weight is not None and self.bias is not None:
            out.update(weight=self.weight.tolist(), bias=self.bias.tolist())
        return out

    def save(self, path: Path) -> None:
        from cspine.runtime import write_json

        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> LucencyModel:
        """Read ``fold{k}.features.json``; a file fitted on other feature definitions is refused (BundleError)."""
        from cspine.bundle import BundleError

        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BundleError(f"{path}: unreadable lucency model ({exc})") from exc
        saved = d.get("features", {})
        if saved != FEATURES.to_dict():
            raise BundleError(
                f"{path}: fitted on lucency features version {saved.get('version', '?')} with other constants than "
                f"this cspine's {FEATURES.version}; retrain the classifier with `cspine train-cls`"
            )
        t = lambda k: torch.tensor(d[k], dtype=torch.float32) if k in d else None  # noqa: E731
        return cls(t("mean"), t("std"), t("weight"), t("bias"))


__all__ = ["STATS_CLIP", "LucencyModel", "lucency_inputs", "relative_to_study"]
