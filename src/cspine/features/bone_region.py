"""Which voxels are bone of which vertebra, read from the image, with a coarse mask only naming the vertebra.

Why: the lucency statistics count dark voxels inside a vertebra. Inside a ground-truth mask those are fracture
gaps; inside a coarse predicted mask they are mostly soft tissue the mask spilled into, and the fracture signal
drowns. Here bone is what the image says is bone: voxels above BONE_HU, closed in-plane by CLOSE_MM so that a
fracture gap through the bone is inside (a 3D closing would bridge the discs), and holes up to HOLE_MM2 filled
(gaps enclosed by cortex; filling every hole would take in the spinal canal and the foramina and reverse the
signal). Each such voxel within REACH_MM of the coarse mask takes the label of the nearest masked vertebra (of any
level, so that T1's bone is not C7's). With ground-truth masks use the mask itself (``stats_region="mask"``): this
region reaches into the neighbours. What it scores: benchmarks/cls_results.md (lucency statistics and regions).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cspine.features.config import FEATURES
from cspine.labels import CERVICAL_VALUES

_C = FEATURES.bone
BONE_HU, CLOSE_MM, HOLE_MM2, REACH_MM, REGION_MM = _C.bone_hu, _C.close_mm, _C.hole_mm2, _C.reach_mm, _C.region_mm


def bone_envelope(hu: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """(z, y, x) bool: bone closed in-plane by CLOSE_MM, small enclosed holes filled, slice by slice."""
    from scipy import ndimage

    ry, rx = (int(np.floor(CLOSE_MM / s)) for s in spacing[1:])
    yy, xx = np.ogrid[-ry : ry + 1, -rx : rx + 1]
    disc = ((yy * spacing[1]) ** 2 + (xx * spacing[2]) ** 2 <= CLOSE_MM**2)[None]
    bone = hu > BONE_HU
    pad = ((0, 0), (ry, ry), (rx, rx))  # padded so that bone at the box's edge is not eroded away by the closing
    closed = ndimage.binary_closing(np.pad(bone, pad), disc)[:, ry : ry + hu.shape[1], rx : rx + hu.shape[2]]
    max_hole = HOLE_MM2 / (spacing[1] * spacing[2])
    for z in range(closed.shape[0]):
        holes = ndimage.binary_fill_holes(closed[z]) & ~closed[z]
        if holes.any():
            lab, n = ndimage.label(holes)
            small = np.bincount(lab.ravel(), minlength=n + 1) <= max_hole
            small[0] = False
            closed[z] |= small[lab]
    return closed


def bone_labels(hu: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """uint8 labels on the volume's grid: bone voxels labelled with the nearest cervical vertebra of ``mask``
    (when within REACH_MM of it), 0 elsewhere. Only the box around the cervical mask is computed."""
    from scipy import ndimage

    cervical = np.isin(mask, CERVICAL_VALUES)
    out = np.zeros(mask.shape, np.uint8)
    if not cervical.any():
        return out
    reach = [int(np.ceil(REACH_MM / s)) + 1 for s in spacing]
    found = ndimage.find_objects(cervical.astype(np.uint8))[0]
    box = tuple(
        slice(max(0, s.start - r), min(n, s.stop + r)) for s, r, n in zip(found, reach, mask.shape, strict=True)
    )
    f = (1, *(max(1, int(REGION_MM / sp + 1e-6)) for sp in spacing[1:]))
    hu_c, mask_c = _coarsen(hu[box].astype(np.float32), f, np.mean), _coarsen(mask[box], f, None)
    grid = tuple(sp * k for sp, k in zip(spacing, f, strict=True))
    # every label, so that bone nearer to T1 than to C7 is not claimed by C7
    dist, idx = ndimage.distance_transform_edt(mask_c == 0, sampling=grid, return_indices=True)
    nearest = mask_c[tuple(idx)]
    keep = bone_envelope(hu_c, grid) & (dist <= REACH_MM) & np.isin(nearest, CERVICAL_VALUES)
    labels = np.where(keep, nearest, 0).astype(np.uint8)
    for axis, k in enumerate(f):
        labels = np.repeat(labels, k, axis=axis)
    out[box] = labels[tuple(slice(0, s.stop - s.start) for s in box)]
    return out


def _coarsen(a: np.ndarray, f: tuple[int, ...], reduce: Callable[..., np.ndarray] | None) -> np.ndarray:
    """Blocks of ``f`` voxels -> one (edges padded by repetition): ``reduce`` over each block (HU), or the block's
    centre voxel when None (labels)."""
    if f == (1,) * a.ndim:
        return a
    a = np.pad(a, [(0, -n % k) for n, k in zip(a.shape, f, strict=True)], mode="edge")
    if reduce is None:
        return a[tuple(slice(k // 2, None, k) for k in f)]
    blocks = a.reshape([x for n, k in zip(a.shape, f, strict=True) for x in (n // k, k)])
    return reduce(blocks, axis=tuple(range(1, 2 * a.ndim, 2))).astype(a.dtype)
