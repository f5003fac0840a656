"""Per-vertebra lucency statistics: how much of the bone the mask claims is darker than bone should be.

Why: a fracture is a lucent line or gap through bone (blood, soft tissue, air where the mask says bone), a dense
impaction band, or lost height. These numbers say so directly, from the full 3D vertebra on a fixed grid,
so the classifier does not have to discover them from the few dozen fractured vertebrae a small dataset holds
(what they score: benchmarks/cls_results.md). Thin slices are averaged down to the grid first, so the numbers mean
the same on a 0.5 mm scan as on a 2 mm one.

Features (in this order):
    lt60 .. lt220     fraction of the vertebra's voxels below 60, 100, 140, 180, 220 HU
    core_lt100 ..     the same inside its core (deeper than 2 mm from the mask's surface: no partial volume)
    res_lt40 ..       fraction of the eroded vertebra darker (lt) / brighter (gt) than its local median by 40-120 HU
                      (a line or band in bone, whatever the patient's bone density)
    log_volume        log of the vertebra's volume in mm^3
    height_mm         its extent along z
    ring_closed ..    whether its bone closes the ring around the canal (cspine.features.ring)

The constants are cspine.features.config.LucencyConfig: changing one means bumping FEATURES_VERSION (crop caches
and classifiers are keyed by it).
"""

from __future__ import annotations

import numpy as np

from cspine.features.config import FEATURES

_C = FEATURES.lucency
LUCENCY_SPACING = _C.spacing
MEDIAN_MM = _C.median_mm
CORE_DEPTH_MM = _C.core_depth_mm
LT_HU, CORE_LT_HU, RES_LT_HU, RES_GT_HU = _C.lt_hu, _C.core_lt_hu, _C.res_lt_hu, _C.res_gt_hu
LUCENCY_FEATURES: tuple[str, ...] = _C.names
N_LUCENCY = len(LUCENCY_FEATURES)
#: The first N_FRACTIONS features are fractions: heavy-tailed (a fractured or osteoporotic vertebra can sit 10-17
#: standard deviations out), so models read them as log(fraction + FRACTION_FLOOR).
N_FRACTIONS = len(_C.fractions)
FRACTION_FLOOR = _C.fraction_floor


def lucency_features(
    hu: np.ndarray,
    inside: np.ndarray,
    spacing: tuple[float, float, float],
    others: np.ndarray | None = None,
    cut_off: bool = False,
) -> np.ndarray:
    """(N_LUCENCY,) float32 statistics of one vertebra (the ring's NaN where it cannot be measured).

    Args:
        hu: (z, y, x) HU of a box around the vertebra (a few voxels of margin keep the local median honest).
        inside: bool mask of the vertebra on the same box.
        spacing: (dz, dy, dx) of the box in mm.
        others: bool mask of the other labelled structures on the box (None: nothing else is labelled).
        cut_off: the field of view cuts the vertebra at its top or bottom.
    """
    from scipy import ndimage

    from cspine.features.ring import RING_FEATURES, ring_features, ring_measurable

    if others is None:
        others = np.zeros(inside.shape, bool)
    hu_g, (in_g, others_g), grid = _to_grid(hu.astype(np.float32), (inside, others), spacing)
    n = int(in_g.sum())
    if n == 0:
        return np.zeros(N_LUCENCY, np.float32)
    x = hu_g[in_g]
    feats: list[float] = [float((x < t).mean()) for t in LT_HU]
    depth = ndimage.distance_transform_edt(in_g, sampling=grid)
    core = hu_g[depth > CORE_DEPTH_MM]
    feats += [float((core < t).mean()) if core.size else 0.0 for t in CORE_LT_HU]
    eroded = ndimage.binary_erosion(in_g)
    window = [2 * int(mm / s / 2) + 1 for mm, s in zip(MEDIAN_MM, grid, strict=True)]
    res = hu_g[eroded] - _local_median(hu_g, eroded, window)
    feats += [float((res < -t).mean()) if res.size else 0.0 for t in RES_LT_HU]
    feats += [float((res > t).mean()) if res.size else 0.0 for t in RES_GT_HU]
    zs = np.nonzero(in_g.any(axis=(1, 2)))[0]
    feats += [float(np.log(n * float(np.prod(grid)))), float((zs[-1] - zs[0] + 1) * grid[0])]
    if ring_measurable(spacing, cut_off):
        feats += ring_features(hu_g, in_g, others_g, grid).tolist()
    else:
        feats += [float("nan")] * len(RING_FEATURES)
    return np.asarray(feats, np.float32)


def _local_median(hu: np.ndarray, where: np.ndarray, window: list[int]) -> np.ndarray:
    """Median of the ``window`` around each voxel of ``where`` (edges padded by repetition).

    Only at the voxels asked for: a vertebra fills a small part of its box, so this is ~25x faster than
    scipy.ndimage.median_filter over the box (3.7 s -> 0.15 s per small study)."""
    from numpy.lib.stride_tricks import sliding_window_view

    if not where.any():  # a speck of a vertebra erodes to nothing
        return np.zeros(0, hu.dtype)
    half = [w // 2 for w in window]
    padded = np.pad(hu, [(h, h) for h in half], mode="edge")
    local = sliding_window_view(padded, window)[np.nonzero(where)]
    return np.median(local.reshape(len(local), -1), axis=1)


def _to_grid(
    hu: np.ndarray, masks: tuple[np.ndarray, ...], spacing: tuple[float, float, float]
) -> tuple[np.ndarray, tuple[np.ndarray, ...], tuple[float, float, float]]:
    """Average axes finer than LUCENCY_SPACING down to it (HU smoothed before it is thinned, so noise does not
    alias; each mask interpolated and thresholded at one half, so its boundary stays put); keep coarser axes."""
    from scipy import ndimage

    native = np.asarray(spacing, np.float64)
    target = np.maximum(native, LUCENCY_SPACING)
    factor = native / target  # <= 1
    if np.all(factor > 0.9):
        return hu, masks, tuple(float(x) for x in native)  # type: ignore[return-value]
    hu = ndimage.gaussian_filter(hu, sigma=(1.0 / factor - 1.0) / 2.0)
    shape = np.maximum(np.rint(np.asarray(hu.shape) * factor).astype(int), 1)
    zoom = shape / np.asarray(hu.shape)
    hu_g = ndimage.zoom(hu, zoom, order=1, grid_mode=True, mode="nearest")
    masks_g = tuple(
        ndimage.zoom(m.astype(np.float32), zoom, order=1, grid_mode=True, mode="nearest") > 0.5 for m in masks
    )
    grid = np.asarray(hu.shape, np.float64) * native / shape
    return hu_g, masks_g, tuple(float(x) for x in grid)  # type: ignore[return-value]
