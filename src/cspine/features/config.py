"""The constants of the lucency statistics, in one frozen, versioned config. Torch-free.

Why: a classifier's fitted regression reads these statistics; if their definition changed under it, it would
silently read other numbers. Every classifier saves :data:`FEATURES` (with :data:`FEATURES_VERSION`) beside its
regression, and loading refuses a model whose saved config differs from the code's (cspine.features.linear).
Change a value here -> bump :data:`FEATURES_VERSION` (major when a statistic changes meaning).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: major.minor of the statistics' definition; crop caches and classifiers are keyed by it.
FEATURES_VERSION = "2.1"


@dataclass(frozen=True)
class LucencyConfig:
    """How the per-vertebra lucency statistics are counted (cspine.features.lucency).

    Attributes:
        spacing: finest grid (dz, dy, dx) mm the statistics are computed on: finer scans are averaged down to it,
            coarser ones used as they are (interpolating them finer adds no information and blurs 1-pixel lines).
        median_mm: local median window in mm: larger than a fracture line, smaller than a vertebral body.
        core_depth_mm: the core is deeper than this from the mask's surface (no partial volume).
        lt_hu, core_lt_hu: HU thresholds of the "darker than" fractions (whole vertebra, core).
        res_lt_hu, res_gt_hu: HU below / above the local median counted as a line or band.
        fraction_floor: models read fractions as log(fraction + floor) (they are heavy-tailed).
        clip: standardised inputs are clipped at +-clip, so a vertebra unlike any in training (a mask of soft
            tissue) cannot dominate the logit.
        ring_hu: bone of the canal ring is above this (cspine.features.ring; thin real laminae read low).
        ring_reach_mm: the ring's bone lies within this of the vertebra's mask (a gap or a fragment it left out).
        ring_min_mm2: an enclosed hole at least this large is the canal (the transverse foramina are smaller).
        ring_max_pixel_mm: on coarser in-plane pixels the ring is not measured (NaN, which the models read as an
            average vertebra): an arch 2-4 mm thick is a pixel or less there and reads as broken on a healthy
            real neck; nor is it for a vertebra the field of view cuts at its top or bottom (its arch may be out).
    """

    spacing: tuple[float, float, float] = (2.0, 1.0, 1.0)
    median_mm: tuple[float, float, float] = (6.0, 11.0, 11.0)
    core_depth_mm: float = 2.0
    lt_hu: tuple[int, ...] = (60, 100, 140, 180, 220)
    core_lt_hu: tuple[int, ...] = (100, 140, 180)
    res_lt_hu: tuple[int, ...] = (40, 80, 120)
    res_gt_hu: tuple[int, ...] = (40, 80)
    fraction_floor: float = 1e-3
    clip: float = 6.0
    ring_hu: float = 150.0
    ring_reach_mm: float = 3.0
    ring_min_mm2: float = 60.0
    ring_max_pixel_mm: float = 2.0

    @property
    def fractions(self) -> tuple[str, ...]:
        """Names of the fraction features (heavy-tailed: models read them as logs)."""
        return (
            *(f"lt{t}" for t in self.lt_hu),
            *(f"core_lt{t}" for t in self.core_lt_hu),
            *(f"res_lt{t}" for t in self.res_lt_hu),
            *(f"res_gt{t}" for t in self.res_gt_hu),
        )

    @property
    def ring(self) -> tuple[str, ...]:
        """Names of the canal ring's features (cspine.features.ring)."""
        return ("ring_closed", "log_ring_mm2", "ring_height_mm")

    @property
    def names(self) -> tuple[str, ...]:
        """Feature names in order: the fractions first, then the vertebra's size and its canal ring."""
        return (*self.fractions, "log_volume", "height_mm", *self.ring)


@dataclass(frozen=True)
class BoneRegionConfig:
    """Where bone is read from the image for a coarse mask (cspine.features.bone_region).

    Attributes:
        bone_hu: bone is above this (osteoporotic cancellous bone reaches ~127 HU).
        close_mm: in-plane closing radius, so a fracture gap through bone (2.5-4.5 mm) counts as inside.
        hole_mm2: enclosed holes up to this area are filled (not the spinal canal or the foramina).
        reach_mm: bone farther than this from the coarse mask belongs to no vertebra.
        region_mm: in-plane grid the region is computed on (finer scans are block-averaged to it first).
    """

    bone_hu: float = 120.0
    close_mm: float = 3.0
    hole_mm2: float = 30.0
    reach_mm: float = 7.0
    region_mm: float = 1.0


@dataclass(frozen=True)
class FeatureConfig:
    """Everything that defines the statistics, saved with every classifier."""

    version: str = FEATURES_VERSION
    lucency: LucencyConfig = field(default_factory=LucencyConfig)
    bone: BoneRegionConfig = field(default_factory=BoneRegionConfig)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples as lists), as saved in a model directory."""
        d = asdict(self)
        return {k: ({n: list(v) if isinstance(v, tuple) else v for n, v in d[k].items()} if isinstance(d[k], dict)
                    else d[k]) for k in d}  # fmt: skip


#: The statistics this cspine computes.
FEATURES = FeatureConfig()
