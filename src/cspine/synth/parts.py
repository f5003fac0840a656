"""What an anatomy is made of: rigid parts (bones, discs), slice-wise tubes (soft tissues) and tissue classes.

Plain data, shared by :mod:`cspine.synth.anatomy` (which builds them), :mod:`cspine.synth.wide` (the wide profile's
extra structures) and :mod:`cspine.synth.render` (which draws them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cspine.synth.fractures import Fracture
from cspine.synth.shapes import Frame, Primitive

#: Tissue classes of the phantom (the ``tissue`` map of a rendered study): ground truth for HU checks.
TISSUES: dict[str, int] = {
    "air": 0,
    "fat": 1,
    "soft": 2,
    "airway": 3,
    "canal": 4,
    "vessel": 5,
    "disc": 6,
    "cortical": 7,
    "cancellous": 8,
    "fracture": 9,
    "lung": 10,  # wide profile only
}


@dataclass
class Part:
    """A rigid bony (or disc) structure: union of primitives minus holes, in one frame.

    ``label`` is the mask value written where the part is (0 = not written: skull, mandible, ribs, discs).
    Material: cortical shell ``cortical_mm`` thick at ``cortical_hu`` over ``cancellous_hu``.
    """

    name: str
    frame: Frame
    prims: list[Primitive]
    holes: list[Primitive] = field(default_factory=list)
    label: int = 0
    cortical_hu: float = 1200.0
    cancellous_hu: float = 300.0
    cortical_mm: float = 1.2
    fractures: list[Fracture] = field(default_factory=list)
    tissue: int = -1  # -1: bone (cortical / cancellous); otherwise one class for the whole part (discs)


@dataclass
class Tube:
    """A structure drawn slice by slice: an ellipse whose centre and radii are interpolated along z.

    ``ry_front``/``ry_back`` are the anterior/posterior semi-axes (an egg shape for the neck outline).
    ``inner`` optionally gives (shrink_mm, hu): a second layer (e.g. muscle inside the subcutaneous fat).
    """

    name: str
    z: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    rx: np.ndarray
    ry_front: np.ndarray
    ry_back: np.ndarray
    hu: float
    inner: tuple[float, float] | None = None
    z_range: tuple[float, float] = (-1e9, 1e9)
    tissue: int = TISSUES["soft"]
    inner_tissue: int = TISSUES["soft"]


@dataclass
class Anatomy:
    """Everything needed to render one study on any grid."""

    tubes: list[Tube]
    parts: list[Part]
    air_hu: float
    z_top: float  # suggested scan range (LPS z, mm)
    z_bottom: float
    centre_xy: tuple[float, float]
    params: dict[str, float]
    #: LPS z (mm) of landmarks the wide profile frames its field of view by (vertex, foramen_magnum, C1_top, ...)
    landmarks: dict[str, float] = field(default_factory=dict)
    #: LPS points (x, y, z) of dental metal, sources of streak artefacts
    metal: list[tuple[float, float, float]] = field(default_factory=list)
