"""Is the bony ring around the spinal canal closed? Three numbers per vertebra, from its bone on axial slices.

Why: a fracture of the neural arch (lamina, pedicle, C1's anterior or posterior arch) opens the ring of bone that
encloses the canal. The lucency fractions barely see it: the gap is a small part of the vertebra, and a predicted
mask leaves it (and often the displaced fragment) out, so what the mask holds looks like an intact vertebra
(benchmarks/cls_results.md, session 10). The ring is read from the image, not the mask: bone near the mask that no
other label claims, so a gap the mask skipped still breaks it.

Features (in this order):
    ring_closed      fraction of the vertebra's axial slices where its bone encloses a hole >= ring_min_mm2
    log_ring_mm2     log(1 + the largest enclosed hole of any slice, mm^2): the canal where the ring is whole
    ring_height_mm   how many mm of slices have such a hole

All three are NaN where the ring cannot be measured (:func:`ring_measurable`); the models read NaN as an average
vertebra (cspine.features.linear).
"""

from __future__ import annotations

import numpy as np

from cspine.features.config import FEATURES

_C = FEATURES.lucency
RING_FEATURES: tuple[str, ...] = _C.ring


def ring_measurable(spacing: tuple[float, float, float], cut_off: bool) -> bool:
    """Whether the scan's in-plane pixels are fine enough to see an arch whole, and the vertebra is not cut off at
    the top or bottom of the field of view."""
    return not cut_off and max(spacing[1], spacing[2]) <= _C.ring_max_pixel_mm


def ring_features(
    hu: np.ndarray, inside: np.ndarray, others: np.ndarray, spacing: tuple[float, float, float]
) -> np.ndarray:
    """(3,) float32: the canal ring of one vertebra.

    Args:
        hu: (z, y, x) HU of a box around the vertebra.
        inside: bool mask of the vertebra on the box.
        others: bool mask of every other labelled structure on the box (their bone is not this vertebra's).
        spacing: (dz, dy, dx) of the box in mm.
    """
    from scipy import ndimage

    zs = np.nonzero(inside.any(axis=(1, 2)))[0]
    if zs.size == 0:
        return np.zeros(len(RING_FEATURES), np.float32)
    near = ndimage.distance_transform_edt(~inside, sampling=spacing) <= _C.ring_reach_mm
    bone = near & ~others & (hu >= _C.ring_hu)
    pixel_mm2 = float(spacing[1] * spacing[2])
    largest = np.zeros(len(zs))
    for i, z in enumerate(zs):
        holes = ndimage.binary_fill_holes(bone[z]) & ~bone[z]
        if holes.any():
            lab, _ = ndimage.label(holes)
            largest[i] = np.bincount(lab.ravel())[1:].max() * pixel_mm2
    closed = largest >= _C.ring_min_mm2
    return np.asarray([closed.mean(), np.log1p(largest.max()), closed.sum() * float(spacing[0])], np.float32)
