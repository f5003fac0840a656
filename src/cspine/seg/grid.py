"""The model grid: how a CT becomes network input and how network output maps back onto the study.

Preprocessing is pure and deterministic (style guide 6): the same :class:`PreprocessConfig` turns any study into
the same model-grid image, in training and in inference. Steps:

1. Canonical orientation: axes permuted and flipped (views, no copy) so that axis 0 runs inferior->superior,
   axis 1 anterior->posterior and axis 2 right->left, whatever the DICOM slice order or NIfTI orientation.
   The network therefore always sees a neck the same way up; this is also why augmentation never flips.
2. Separable resampling to the model spacing with a triangle kernel whose width follows the zoom factor
   (anti-aliased area average when shrinking a 0.3 mm study, plain linear interpolation when enlarging), done in
   slabs so that a 512x512x400 int16 study never exists as a float32 copy.
3. HU window to [0, 1].

:class:`GridMap` records steps 1-2 so that network output can be mapped back exactly onto the study's own grid
(:func:`logits_to_labels`). Only augmentation is random, and it draws from the generators it is given.

Kept apart from training patches (:mod:`cspine.seg.patches`) and study discovery (:mod:`cspine.seg.studies`):
inference needs only this module.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from cspine.io.volume import Volume, check_grid, spacing_from_affine
from cspine.seg.config import CLASS_TO_VALUE, OTHER_CLASS, PreprocessConfig

if TYPE_CHECKING:
    import torch


#: World (LPS) axis read by each canonical axis: 0 <- S (z), 1 <- P (y), 2 <- L (x).
_CANONICAL_WORLD = (2, 1, 0)


# ---------------------------------------------------------------------------------------------------------------
# Label values <-> network classes
# ---------------------------------------------------------------------------------------------------------------


def value_to_class_lut() -> np.ndarray:
    """uint8 lookup table: mask value (0..255) -> network class (0 background, 1..7 C1..C7, 8 other vertebra)."""
    lut = np.full(256, OTHER_CLASS, dtype=np.uint8)
    lut[0] = 0
    for cls, value in enumerate(CLASS_TO_VALUE):
        lut[value] = cls
    return lut


def class_to_value_lut(keep_other: bool = True) -> np.ndarray:
    """uint8 lookup table: network class -> written mask value (other vertebra -> OTHER_VALUE or 0)."""
    lut = np.array(CLASS_TO_VALUE, dtype=np.uint8)
    if not keep_other:
        lut[OTHER_CLASS] = 0
    return lut


# ---------------------------------------------------------------------------------------------------------------
# Geometry: canonical orientation and the model grid
# ---------------------------------------------------------------------------------------------------------------


def canonical_orientation(affine: np.ndarray) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """(perm, flip): canonical axis a reads array axis perm[a], reversed where flip[a].

    The permutation maximises the alignment of the array axes with S, P, L (exhaustive over the 6 permutations,
    so an oblique or tilted grid still gets the closest one).
    """
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0, keepdims=True)
    best: tuple[float, tuple[int, ...]] = (-1.0, (0, 1, 2))
    for perm in itertools.permutations(range(3)):
        score = sum(abs(directions[w, k]) for w, k in zip(_CANONICAL_WORLD, perm, strict=True))
        if score > best[0] + 1e-9:
            best = (score, perm)
    perm = best[1]
    flip = tuple(bool(directions[w, k] < 0) for w, k in zip(_CANONICAL_WORLD, perm, strict=True))
    return (int(perm[0]), int(perm[1]), int(perm[2])), flip  # type: ignore[return-value]


@dataclass(frozen=True)
class GridMap:
    """How a study's array maps to the canonical model grid and back.

    Attributes:
        perm, flip: canonical orientation (see :func:`canonical_orientation`).
        shape: the study's shape in canonical axis order.
        spacing: the study's spacing (mm) in canonical axis order.
        model_spacing: target spacing (mm).
        model_shape: shape of the model grid; model voxel j sits at source coordinate j * scale.
    """

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    model_spacing: tuple[float, float, float]
    model_shape: tuple[int, int, int]

    @property
    def scale(self) -> np.ndarray:
        """Model voxel step in source voxels, per canonical axis."""
        return np.asarray(self.model_spacing, dtype=np.float64) / np.asarray(self.spacing, dtype=np.float64)

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """A view of a study-grid array in canonical orientation."""
        out = np.transpose(array, self.perm)
        for a, f in enumerate(self.flip):
            if f:
                out = np.flip(out, axis=a)
        return out

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_canonical` (a contiguous array on the study's grid)."""
        out = array
        for a, f in enumerate(self.flip):
            if f:
                out = np.flip(out, axis=a)
        return np.ascontiguousarray(np.transpose(out, np.argsort(self.perm)))


def make_gridmap(shape: Sequence[int], affine: np.ndarray, model_spacing: Sequence[float]) -> GridMap:
    """The :class:`GridMap` of a study of ``shape`` with ``affine`` (index -> LPS) onto ``model_spacing``."""
    perm, flip = canonical_orientation(affine)
    spacing_all = spacing_from_affine(affine)
    c_shape = tuple(int(shape[p]) for p in perm)
    c_spacing = tuple(float(spacing_all[p]) for p in perm)
    new = tuple(float(s) for s in model_spacing)
    m_shape = tuple(max(1, round((n - 1) * old / s) + 1) for n, old, s in zip(c_shape, c_spacing, new, strict=True))
    check_grid(m_shape, "model grid")  # before anything of that size is allocated
    return GridMap(perm, flip, c_shape, c_spacing, new, m_shape)  # type: ignore[arg-type]


def axis_taps(n_in: int, n_out: int, scale: float, antialias: bool, offset: float = 0.0) -> tuple[np.ndarray, ...]:
    """Separable resampling weights along one axis: output j reads source coordinate offset + j * scale.

    Triangle kernel of half-width max(1, scale) when ``antialias`` (area-like averaging on shrinking), 1 otherwise
    (linear interpolation). Indices are clamped to the edge (replicate). Returns (idx, w), each (n_out, taps).
    """
    c = offset + np.arange(n_out, dtype=np.float64) * scale
    support = max(1.0, scale) if antialias else 1.0
    taps = math.ceil(2 * support) + 1
    first = np.floor(c - support).astype(np.int64) + 1
    idx = first[:, None] + np.arange(taps)[None, :]
    w = np.clip(1.0 - np.abs(idx - c[:, None]) / support, 0.0, None)
    w /= w.sum(axis=1, keepdims=True)
    keep = w.any(axis=0)  # drop tap columns that are zero everywhere
    return np.clip(idx[:, keep], 0, n_in - 1), w[:, keep].astype(np.float32)


def resample_axis(t: torch.Tensor, axis: int, idx: np.ndarray, w: np.ndarray) -> torch.Tensor:
    """Apply :func:`axis_taps` weights along ``axis`` of a float tensor.

    Done as a dense matrix product (BLAS) rather than as gathers: on CPU a gather costs about as much as 30
    multiply-adds, and the matrices here are small (output side x input side of one axis).
    """
    import torch

    n_out, taps = idx.shape
    dense = np.zeros((n_out, t.shape[axis]), dtype=np.float32)
    np.add.at(dense, (np.repeat(np.arange(n_out), taps), idx.ravel()), w.ravel())
    out = torch.matmul(t.movedim(axis, -1), torch.from_numpy(dense).T)
    return out.movedim(-1, axis)


def to_model_grid(vol: Volume, cfg: PreprocessConfig, slab: int = 32) -> tuple[np.ndarray, GridMap]:
    """A study -> (float32 image in [0, 1] on the canonical model grid, its :class:`GridMap`).

    Resampling runs in HU (partial-volume averages, as a scanner at that resolution would see them), then the
    window is applied. The source is converted to float in slabs of ``slab`` canonical slices.
    """
    import torch

    gm = make_gridmap(vol.shape, vol.affine, cfg.spacing)
    src = gm.to_canonical(vol.array)
    sc = gm.scale
    taps = [axis_taps(gm.shape[a], gm.model_shape[a], float(sc[a]), cfg.antialias) for a in range(3)]
    mid = torch.empty((gm.shape[0], gm.model_shape[1], gm.model_shape[2]), dtype=torch.float32)
    with torch.inference_mode():
        for z0 in range(0, gm.shape[0], slab):
            block = torch.from_numpy(np.ascontiguousarray(src[z0 : z0 + slab], dtype=np.float32))
            block = resample_axis(block, 2, *taps[2])
            mid[z0 : z0 + slab] = resample_axis(block, 1, *taps[1])
        out = resample_axis(mid, 0, *taps[0])
        lo = cfg.window_level - cfg.window_width / 2.0
        out.sub_(lo).div_(cfg.window_width).clamp_(0.0, 1.0)
    return out.numpy(), gm


def class_shares(mask: np.ndarray, gm: GridMap, slab: int = 16) -> torch.Tensor:
    """Share of every network class in each model-grid voxel, (classes, *model_shape) float32 summing to 1.

    Each class's indicator is resampled with the same anti-aliased kernel as the image, so a share is the
    partial-volume fraction of that class around the voxel: soft training targets that keep sub-voxel edge
    positions, which hard labels on a 2 mm grid lose (their round trip caps Dice at ~0.92 on the generated
    studies; the shares' at ~0.97).
    """
    import torch

    classes = value_to_class_lut()[gm.to_canonical(mask)]
    present = np.unique(classes)
    out = torch.zeros((len(CLASS_TO_VALUE), *gm.model_shape), dtype=torch.float32)
    if len(present) == 1:
        out[int(present[0])] = 1.0
        return out
    sc = gm.scale
    taps = [axis_taps(gm.shape[a], gm.model_shape[a], float(sc[a]), True) for a in range(3)]
    mid = torch.empty((len(present), gm.shape[0], gm.model_shape[1], gm.model_shape[2]), dtype=torch.float32)
    with torch.inference_mode():
        for z0 in range(0, gm.shape[0], slab):
            block = classes[z0 : z0 + slab]
            onehot = torch.from_numpy(np.stack([block == c for c in present]).astype(np.float32))
            mid[:, z0 : z0 + slab] = resample_axis(resample_axis(onehot, 3, *taps[2]), 2, *taps[1])
        out[torch.from_numpy(present.astype(np.int64))] = resample_axis(mid, 1, *taps[0])
    return out


def foreground_shares(shares: torch.Tensor) -> torch.Tensor:
    """Class shares (classes, ...) -> (background, any vertebra) shares, the refinement stage's targets."""
    import torch

    return torch.stack([shares[0], 1.0 - shares[0]])


def labels_to_model_grid(mask: np.ndarray, gm: GridMap) -> np.ndarray:
    """Mask values on the study grid -> network classes on the model grid: the class with the largest share.

    A soft majority vote (see :func:`class_shares`); nearest-neighbour sampling would shift boundaries by up to
    half a source voxel at random.
    """
    return argmax0(class_shares(mask, gm)).numpy()


def study_box(
    logits: torch.Tensor | np.ndarray, gm: GridMap, margin: int = 2, cervical_only: bool = False
) -> tuple[np.ndarray, np.ndarray] | None:
    """Canonical study-voxel box [lo, hi] (inclusive) covered by the predicted vertebrae plus ``margin`` model
    voxels, or None when there are none. Only this box is resampled back.

    ``cervical_only``: the box of the largest piece of each of C1..C7 (what post-processing keeps), which the
    refinement stage runs on: stray specks would otherwise stretch it over the whole scan (measured: 2-2.6x the
    voxels on generated studies).
    """
    from scipy import ndimage

    coarse = _decide(np.asarray(logits))[0]
    if cervical_only:
        pts = []
        for c, sl in enumerate(ndimage.find_objects(coarse, max_label=OTHER_CLASS - 1), start=1):
            if sl is None:
                continue
            pieces, _ = ndimage.label(coarse[sl] == c, np.ones((3, 3, 3), dtype=bool))  # raster order kept
            largest = int(np.argmax(np.bincount(pieces.ravel())[1:])) + 1
            box = ndimage.find_objects(pieces, max_label=largest)[largest - 1]
            pts += [[b.start + s.start for b, s in zip(box, sl, strict=True)],
                    [b.stop - 1 + s.start for b, s in zip(box, sl, strict=True)]]  # fmt: skip
        fg = np.array(pts, dtype=np.int64).reshape(-1, 3)
    else:
        fg = nonzero_box(coarse)
    return points_to_study_box(fg, gm, margin)


def points_to_study_box(fg: np.ndarray, gm: GridMap, margin: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Canonical study-voxel box [lo, hi] around model-grid points (N, 3) plus ``margin`` model voxels."""
    if len(fg) == 0:
        return None
    lo = (fg.min(0) - margin).clip(0)
    hi = np.minimum(fg.max(0) + margin, np.array(gm.model_shape) - 1)
    sc = gm.scale
    f_lo = np.array([max(0, math.ceil(lo[a] * sc[a] - 1e-6)) for a in range(3)])
    f_hi = np.array([min(gm.shape[a] - 1, math.floor(hi[a] * sc[a] + 1e-6)) for a in range(3)])
    if np.any(f_hi < f_lo):
        return None
    return f_lo, f_hi


def nonzero_box(a: np.ndarray) -> np.ndarray:
    """(2, 3) first and last index of the nonzero voxels of a 3-D array per axis (empty (0, 3) when none)."""
    corners = []
    for axis in range(3):
        hit = np.flatnonzero(a.any(axis=tuple(b for b in range(3) if b != axis)))
        if not len(hit):
            return np.zeros((0, 3), dtype=np.int64)
        corners.append((hit[0], hit[-1]))
    return np.array(corners, dtype=np.int64).T


def canonical_crop(vol: Volume, gm: GridMap, lo: np.ndarray, hi: np.ndarray) -> Volume:
    """The canonical study-voxel box [lo, hi] of ``vol`` as a Volume stored in canonical order (a view).

    Its affine points axis 0 to S, 1 to P and 2 to L (origin 0: only spacing and orientation matter here), so
    :func:`to_model_grid` resamples just this box and its :class:`GridMap` is the identity orientation: labels it
    returns index the box directly.
    """
    arr = gm.to_canonical(vol.array)[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1]
    affine = np.zeros((4, 4))
    for a, w in enumerate(_CANONICAL_WORLD):
        affine[w, a] = gm.spacing[a]
    affine[3, 3] = 1.0
    return Volume(array=arr, spacing=gm.spacing, affine=affine)


class Foreground(NamedTuple):
    """Which voxels of a canonical study-grid box are vertebra (the refinement stage's answer)."""

    lo: np.ndarray  # box origin, canonical study voxels
    mask: np.ndarray  # bool, the box's shape


def logits_to_labels(
    logits: torch.Tensor | np.ndarray,
    gm: GridMap,
    margin: int = 2,
    foreground: Foreground | None = None,
    gate: float = 8.0,
) -> np.ndarray:
    """Network logits (C, model grid) -> class labels (uint8) on the study's grid, in canonical orientation.

    The whole canonical grid, zero outside :func:`labels_in_box`'s box (see there).
    """
    out = np.zeros(gm.shape, dtype=np.uint8)
    found = labels_in_box(logits, gm, margin, foreground, gate)
    if found is not None:
        lo, labels = found
        out[tuple(slice(int(a), int(a) + n) for a, n in zip(lo, labels.shape, strict=True))] = labels
    return out


def labels_in_box(
    logits: torch.Tensor | np.ndarray,
    gm: GridMap,
    margin: int = 2,
    foreground: Foreground | None = None,
    gate: float = 8.0,
    lut: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Network logits (C, model grid) -> (box origin, uint8 class labels of the :func:`study_box` box) in
    canonical study voxels; None when no voxel is a vertebra. Every voxel outside the box is background.

    Each study voxel takes the class of the logits interpolated linearly at its position (finer than
    nearest-neighbour upsampling of the coarse argmax: on 2 mm output that is worth several Dice points); see
    :func:`_interpolate_labels` for how that stays cheap on a 512x512x400 study.

    Inside ``foreground``'s box (from the refinement stage) its mask decides which voxels are vertebra and the
    logits only name them (argmax over the non-background classes). A refined voxel stays background where the
    coarse background logit beats the best vertebra logit by more than ``gate``: far from any vertebra the coarse
    model knows better (skull base, mandible and ribs are bone, but not vertebrae). ``lut``: class -> the value
    written (:func:`class_to_value_lut`; default the class itself).
    """
    values = logits.float().numpy() if hasattr(logits, "numpy") else np.asarray(logits, dtype=np.float32)
    box = study_box(values, gm, margin)
    if box is None:
        return None
    f_lo, f_hi = box
    if foreground is None:
        return f_lo, _interpolate_labels(values, gm.scale, f_lo, f_hi, lut=lut)
    r_lo, r_hi = foreground.lo, foreground.lo + np.array(foreground.mask.shape) - 1
    if np.any(r_lo < f_lo) or np.any(r_hi > f_hi):
        raise ValueError(f"refined box {r_lo.tolist()}..{r_hi.tolist()} outside {f_lo.tolist()}..{f_hi.tolist()}")
    inner = tuple(slice(int(a - f), int(b - f) + 1) for a, b, f in zip(r_lo, r_hi, f_lo, strict=True))
    outside = np.ones(tuple(f_hi - f_lo + 1), dtype=bool)
    outside[inner] = False  # the refined box is overwritten below: no need to interpolate it twice
    labels = _interpolate_labels(values, gm.scale, f_lo, f_hi, need=outside, lut=lut)
    named = _interpolate_labels(values, gm.scale, r_lo, r_hi, gate, need=foreground.mask, lut=lut)
    named[~foreground.mask] = 0
    labels[inner] = named
    return f_lo, labels


#: A model cell is interpolated voxel by voxel unless its 8 corners agree with a margin above this share of the
#: largest |logit| (float32 linear interpolation is exact to a few 1e-7 of it).
_REL_TOL = 1e-4
_UNDECIDED = 255


def _decide(values: np.ndarray, gate: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 decision, float32 margin) per voxel of (C, ...) logits.

    ``gate`` None: the first largest class (as ``argmax``), margin = best - second best. ``gate`` g: the refined
    foreground's naming, i.e. the first largest non-background class + 1 where background minus it is <= g, else 0;
    margin = the distance to the nearer edge of that decision. A decision that all corners of a model cell share
    with a positive margin holds for every convex combination of them, i.e. for every linearly interpolated voxel
    inside the cell.
    """
    v = values if gate is None else values[1:]
    best = np.array(v[0], dtype=np.float32)
    second = np.full_like(best, -np.inf)
    ident = np.zeros(best.shape, dtype=np.uint8)
    for c in range(1, len(v)):
        x = v[c]
        gt = x > best  # strict: ties keep the first class, as argmax does
        second = np.where(gt, best, np.maximum(second, x))
        best = np.where(gt, x, best)
        ident[gt] = c
    if gate is None:
        return ident, best - second
    q = values[0] - best
    keep = q <= gate
    return np.where(keep, ident + 1, 0).astype(np.uint8), np.where(keep, np.minimum(best - second, gate - q), q - gate)


def _interpolate_labels(
    logits: np.ndarray,
    scale: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    gate: float | None = None,
    need: np.ndarray | None = None,
    lut: np.ndarray | None = None,
    chunk: int = 2048,
) -> np.ndarray:
    """:func:`_decide` of the logits (C, model grid) interpolated linearly at every study voxel of the canonical
    box [lo, hi] (model voxel j sits at study voxel j * ``scale``; edges replicate).

    Interpolating all classes at every voxel of a neck box (tens of millions of voxels) costs seconds and
    memory, yet most model cells lie wholly inside one class: where a cell's 8 corners share the decision with a
    margin (see :func:`_decide`), every voxel in it has that decision, so it is filled without interpolating.
    Only the other cells (the boundaries, a few percent) are interpolated, all together in vectorised bricks.
    ``need`` (bool, the box's shape): the voxels whose label matters; a cell without one is left 0, not
    interpolated. ``lut``: what each decision is written as (uint8, e.g. class -> mask value; 0 must stay 0).
    """
    lut = np.arange(256, dtype=np.uint8) if lut is None else lut
    pad = [(0, 0)] + [(0, 1 if n == 1 else 0) for n in logits.shape[1:]]  # a cell needs two corners per axis
    if any(p[1] for p in pad):
        logits = np.pad(logits, pad, mode="edge")
    n = logits.shape[1:]
    cells, w1 = [], []
    for a in range(3):
        c = np.arange(int(lo[a]), int(hi[a]) + 1, dtype=np.float64) / float(scale[a])
        i = np.clip(np.floor(c).astype(np.int64), 0, n[a] - 2)
        cells.append(i)
        w1.append(np.clip(c - i, 0.0, 1.0))
    c0 = [int(i[0]) for i in cells]
    sub = logits[:, c0[0] : int(cells[0][-1]) + 2, c0[1] : int(cells[1][-1]) + 2, c0[2] : int(cells[2][-1]) + 2]
    corner, margin = _decide(sub, gate)
    tol = _REL_TOL * (1.0 + float(np.abs(sub).max()))
    shape = tuple(s - 1 for s in corner.shape)
    decided = corner[: shape[0], : shape[1], : shape[2]].copy()
    agree = np.ones(shape, dtype=bool)
    for d in itertools.product((0, 1), repeat=3):
        at = tuple(slice(k, k + s) for k, s in zip(d, shape, strict=True))
        agree &= (corner[at] == decided) & (margin[at] > tol)
    decided = lut[decided]
    counts = [np.bincount(i - c0[a], minlength=shape[a]) for a, i in enumerate(cells)]
    starts = [np.concatenate([[0], np.cumsum(k)[:-1]]) for k in counts]
    if need is not None:
        wanted = np.zeros((shape[0], *need.shape[1:]), dtype=bool)
        for z, cz in enumerate(cells[0] - c0[0]):  # slice by slice: reduceat along axis 0 is several times slower
            wanted[cz] |= need[z]
        for a in (1, 2):
            wanted = np.logical_or.reduceat(wanted, np.minimum(starts[a], need.shape[a] - 1), axis=a)
        decided[~agree & ~wanted] = 0
        agree |= ~wanted
    decided[~agree] = _UNDECIDED  # every such cell is interpolated below
    out = decided
    for a in (2, 1, 0):
        out = np.repeat(out, counts[a], axis=a)
    todo = np.argwhere(~agree)
    most = [int(k.max()) for k in counts]
    for b in range(0, len(todo), chunk):
        t = todo[b : b + chunk]
        _interpolate_cells(sub, t, [(s[t[:, a]], k[t[:, a]], m, w1[a]) for a, (s, k, m) in enumerate(
            zip(starts, counts, most, strict=True))], gate, lut, out)  # fmt: skip
    return out


def _interpolate_cells(
    sub: np.ndarray,
    cells: np.ndarray,
    axes: list[tuple[np.ndarray, np.ndarray, int, np.ndarray]],
    gate: float | None,
    lut: np.ndarray,
    out: np.ndarray,
) -> None:
    """In place: ``out`` at the study voxels of the given model cells (B, 3) takes :func:`_decide` of the logits
    interpolated there. ``axes``: per axis (first voxel of each cell, its voxel count, the largest count, the
    weight of the upper corner per voxel of the box)."""
    v = np.stack([sub[:, cells[:, 0] + i, cells[:, 1] + j, cells[:, 2] + k]
                  for i, j, k in itertools.product((0, 1), repeat=3)], axis=-1)  # fmt: skip
    v = v.reshape(len(sub), len(cells), 2, 2, 2)  # (C, B, z, y, x) corners
    pos, valid, w0, w1 = [], [], [], []
    for start, count, most, upper in axes:
        off = np.arange(most)
        p = np.minimum(start[:, None] + off[None, :], len(upper) - 1)
        pos.append(p)
        valid.append(off[None, :] < count[:, None])
        w1.append(upper[p].astype(np.float32))
        w0.append((1.0 - upper[p]).astype(np.float32))
    v = v[..., :1] * w0[2][None, :, None, None, :] + v[..., 1:] * w1[2][None, :, None, None, :]
    v = v[:, :, :, :1] * w0[1][None, :, None, :, None] + v[:, :, :, 1:] * w1[1][None, :, None, :, None]
    v = v[:, :, :1] * w0[0][None, :, :, None, None] + v[:, :, 1:] * w1[0][None, :, :, None, None]
    labels = _decide(v, gate)[0]
    ok = valid[0][:, :, None, None] & valid[1][:, None, :, None] & valid[2][:, None, None, :]
    z, y, x = (np.broadcast_to(p, ok.shape)[ok] for p in
               (pos[0][:, :, None, None], pos[1][:, None, :, None], pos[2][:, None, None, :]))  # fmt: skip
    out[z, y, x] = lut[labels[ok]]


def argmax0(block: torch.Tensor) -> torch.Tensor:
    """uint8 index of the largest value over dim 0 (classes); ``max(0).indices`` is ~4x faster than
    ``argmax(0)`` on large CPU tensors."""
    import torch

    return block.max(0).indices.to(torch.uint8)
