"""The scan resolution a classifier learned from, and its refusal to judge fractures outside it.

A network that learned fracture appearance from crops of 1-2 mm voxels has never seen a vertebra four pixels wide:
on the coarse real necks of shared (3.2 and 4.6 mm pixels) the shipped network called fractures in both
(benchmarks/cls_results.md, session 14), and the lucency statistics alone, which were then used in its place, read
0.64-0.84 on the same necks (sessions 15-16): their partial volume is as new to the statistics as to the network.
So the training studies' coarsest spacing is recorded beside the weights, and a scan coarser than that (by more
than ``TOLERANCE``) gets no fracture probabilities at all: the prediction says why, and a submission writes the
prevalence for it.

``MODEL_DIR/network_domain.json``::

    {"max_spacing_zyx": [slice, row, column] mm, "studies": N}

(directories of sessions 15-16 also hold ``neutral_logit`` and ``calibration``, which are no longer read)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cspine.runtime import write_json

DOMAIN_FILE = "network_domain.json"
#: How much coarser than its coarsest training study a scan may be for fractures to be assessed.
TOLERANCE = 1.25


@dataclass(frozen=True)
class NetworkDomain:
    """Attributes:
    max_spacing_zyx: the largest slice spacing and pixel spacing (mm) among the studies the network learned from.
    studies: how many studies the spacing was taken from.
    """

    max_spacing_zyx: tuple[float, float, float]
    studies: int = 0

    def refusal(self, spacing_zyx: Sequence[float]) -> str | None:
        """Why fractures are not assessed on a scan of this spacing; None when they are."""
        (dz, dy, dx), (mz, my, mx) = spacing_zyx, self.max_spacing_zyx
        pixel, max_pixel = max(dy, dx), max(my, mx)
        learned = "coarser than any study the classifier learned from"
        if pixel > TOLERANCE * max_pixel:
            return f"pixel spacing {pixel:.2f} mm, {learned} ({max_pixel:.2f} mm)"
        if dz > TOLERANCE * mz:
            return f"slice spacing {dz:.2f} mm, {learned} ({mz:.2f} mm)"
        return None

    def save(self, model_dir: Path) -> None:
        doc = {"max_spacing_zyx": list(self.max_spacing_zyx), "studies": self.studies}
        write_json(Path(model_dir) / DOMAIN_FILE, doc)

    @classmethod
    def load(cls, model_dir: Path) -> NetworkDomain | None:
        """The domain of a model directory; None for one trained before it was recorded (always applied)."""
        path = Path(model_dir) / DOMAIN_FILE
        if not path.exists():
            return None
        d = json.loads(path.read_text())
        return cls(tuple(float(s) for s in d["max_spacing_zyx"]), int(d.get("studies", 0)))  # type: ignore[arg-type]


def spacing_domain(spacings: Iterable[Sequence[float]], start: NetworkDomain | None = None) -> NetworkDomain | None:
    """The coarsest spacing of these training studies (and of ``start``, the domain of an --init network that
    learned from other studies first); None when there are neither."""
    own = [tuple(float(s) for s in sp) for sp in spacings]
    rows = own if start is None else [*own, start.max_spacing_zyx]
    if not rows:
        return None
    top = np.max(np.array(rows), axis=0)
    n = len(own) + (start.studies if start is not None else 0)
    return NetworkDomain((float(top[0]), float(top[1]), float(top[2])), n)


def cache_spacings(cache: Path, uids: Iterable[str]) -> list[list[float]]:
    """The (slice, row, column) spacing of these prepared training studies, from their meta.json (no volume read);
    studies missing from the cache are left out."""
    from cspine.data.cache import META_FILE

    metas = [Path(cache) / "train" / u / META_FILE for u in uids]
    return [json.loads(m.read_text())["spacing_zyx"] for m in metas if m.exists()]


__all__ = ["DOMAIN_FILE", "TOLERANCE", "NetworkDomain", "cache_spacings", "spacing_domain"]
