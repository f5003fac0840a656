"""The scan resolution a classifier's network learned from, and what the classifier does outside it.

A network that learned fracture appearance from crops of 1-2 mm voxels has never seen a vertebra four pixels wide:
on the coarse real necks of shared (3.2 and 4.6 mm pixels) the shipped network called fractures in both
(benchmarks/cls_results.md, session 14). Its training studies' coarsest spacing is recorded beside the weights;
a scan coarser than that (by more than ``TOLERANCE``) gets the network's part of every vertebra logit replaced by
its mean over the out-of-fold predictions, so the lucency statistics alone rank it, calibrated by their own
temperatures (fitted on the same out-of-fold predictions without the network), and the prediction says so.

``MODEL_DIR/network_domain.json``::

    {"max_spacing_zyx": [slice, row, column] mm, "neutral_logit": {"C1": ..., ...} | null, "studies": N,
     "calibration": {...} | null}
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cspine.cls.calibrate import Calibration
from cspine.labels import CERVICAL
from cspine.runtime import write_json

DOMAIN_FILE = "network_domain.json"
#: How much coarser than its coarsest training study a scan may be for the network to be applied.
TOLERANCE = 1.25


@dataclass(frozen=True)
class NetworkDomain:
    """Attributes:
    max_spacing_zyx: the largest slice spacing and pixel spacing (mm) among the studies the network learned from.
    neutral_logit: per vertebra, the network part's mean over the out-of-fold predictions (what replaces it out
        of domain); None for a network that was never cross-validated (the shipped one, used as --init).
    studies: how many studies the spacing was taken from.
    calibration: the temperatures of the statistics-only predictions (None: the model's own are used).
    """

    max_spacing_zyx: tuple[float, float, float]
    neutral_logit: tuple[float, ...] | None = None
    studies: int = 0
    calibration: Calibration | None = None

    def refusal(self, spacing_zyx: Sequence[float]) -> str | None:
        """Why the network is not applied to a scan of this spacing; None when it is."""
        (dz, dy, dx), (mz, my, mx) = spacing_zyx, self.max_spacing_zyx
        pixel, max_pixel = max(dy, dx), max(my, mx)
        if pixel > TOLERANCE * max_pixel:
            return f"pixel spacing {pixel:.2f} mm, coarser than any study it learned from ({max_pixel:.2f} mm)"
        if dz > TOLERANCE * mz:
            return f"slice spacing {dz:.2f} mm, coarser than any study it learned from ({mz:.2f} mm)"
        return None

    def to_json(self) -> dict[str, Any]:
        neutral = None if self.neutral_logit is None else dict(zip(CERVICAL, self.neutral_logit, strict=True))
        cal = None if self.calibration is None else asdict(self.calibration)
        return {"max_spacing_zyx": list(self.max_spacing_zyx), "neutral_logit": neutral, "studies": self.studies,
                "calibration": cal}  # fmt: skip

    def save(self, model_dir: Path) -> None:
        write_json(Path(model_dir) / DOMAIN_FILE, self.to_json())

    @classmethod
    def load(cls, model_dir: Path) -> NetworkDomain | None:
        """The domain of a model directory; None for one trained before it was recorded (always applied)."""
        path = Path(model_dir) / DOMAIN_FILE
        if not path.exists():
            return None
        d = json.loads(path.read_text())
        neutral, cal = d.get("neutral_logit"), d.get("calibration")
        return cls(
            tuple(float(s) for s in d["max_spacing_zyx"]),  # type: ignore[arg-type]
            None if neutral is None else tuple(float(neutral[v]) for v in CERVICAL),
            int(d.get("studies", 0)),
            None if cal is None else Calibration.from_dict(cal, str(path)),
        )


def spacing_domain(spacings: Iterable[Sequence[float]], start: NetworkDomain | None = None) -> NetworkDomain | None:
    """The coarsest spacing of these training studies (and of ``start``, the domain of an --init network that
    learned from other studies first); None when there are neither."""
    own = [tuple(float(s) for s in sp) for sp in spacings]
    rows = own if start is None else [*own, start.max_spacing_zyx]
    if not rows:
        return None
    top = np.max(np.array(rows), axis=0)
    n = len(own) + (start.studies if start is not None else 0)
    return NetworkDomain((float(top[0]), float(top[1]), float(top[2])), None, n)


def cache_spacings(cache: Path, uids: Iterable[str]) -> list[list[float]]:
    """The (slice, row, column) spacing of these prepared training studies, from their meta.json (no volume read);
    studies missing from the cache are left out."""
    from cspine.data.cache import META_FILE

    metas = [Path(cache) / "train" / u / META_FILE for u in uids]
    return [json.loads(m.read_text())["spacing_zyx"] for m in metas if m.exists()]


def neutral_logits(network_parts: np.ndarray) -> tuple[float, ...]:
    """Per vertebra, the mean of the out-of-fold network parts (n, 7), NaN where the mask lacked the vertebra
    (0 for a vertebra never seen)."""
    means = [float(np.nanmean(col)) if np.any(~np.isnan(col)) else 0.0 for col in network_parts.T]
    return tuple(means)


__all__ = ["DOMAIN_FILE", "TOLERANCE", "NetworkDomain", "cache_spacings", "neutral_logits", "spacing_domain"]
