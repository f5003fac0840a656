"""Segmentation data: where studies come from, how a CT becomes network input, and training patches.

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
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from cspine.io.volume import Volume, check_grid, spacing_from_affine
from cspine.seg.config import CLASS_TO_VALUE, OTHER_CLASS, AugmentConfig, PreprocessConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

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
    logits: torch.Tensor, gm: GridMap, margin: int = 2, cervical_only: bool = False
) -> tuple[np.ndarray, np.ndarray] | None:
    """Canonical study-voxel box [lo, hi] (inclusive) covered by the predicted vertebrae plus ``margin`` model
    voxels, or None when there are none. Only this box is resampled back.

    ``cervical_only``: the box of the largest piece of each of C1..C7 (what post-processing keeps), which the
    refinement stage runs on: stray specks would otherwise stretch it over the whole scan (measured: 2-2.6x the
    voxels on generated studies).
    """
    from scipy import ndimage

    coarse = logits.argmax(0).numpy()
    if cervical_only:
        pts = []
        for c in range(1, OTHER_CLASS):
            pieces, n = ndimage.label(coarse == c, np.ones((3, 3, 3), dtype=bool))
            if n:
                largest = int(np.argmax(np.bincount(pieces.ravel())[1:])) + 1
                box = ndimage.find_objects(pieces, max_label=largest)[largest - 1]
                pts += [[b.start for b in box], [b.stop - 1 for b in box]]
        fg = np.array(pts, dtype=np.int64).reshape(-1, 3)
    else:
        fg = np.argwhere(coarse > 0)
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
    logits: torch.Tensor,
    gm: GridMap,
    margin: int = 2,
    slab: int = 16,
    foreground: Foreground | None = None,
    gate: float = 8.0,
) -> np.ndarray:
    """Network logits (C, model grid) -> class labels (uint8) on the study's grid, in canonical orientation.

    Logits are interpolated linearly to every study voxel (finer than nearest-neighbour upsampling of the coarse
    argmax: on 2 mm output that is worth several Dice points) but only inside :func:`study_box`, in slabs, so
    full-size studies stay within memory.

    Inside ``foreground``'s box (from the refinement stage) its mask decides which voxels are vertebra and the
    logits only name them (argmax over the non-background classes). A refined voxel stays background where the
    coarse background logit beats the best vertebra logit by more than ``gate``: far from any vertebra the coarse
    model knows better (skull base, mandible and ribs are bone, but not vertebrae).
    """
    import torch

    out = np.zeros(gm.shape, dtype=np.uint8)
    box = study_box(logits, gm, margin)
    if box is None:
        return out
    f_lo, f_hi = box
    if foreground is not None:
        r_lo, r_hi = foreground.lo, foreground.lo + np.array(foreground.mask.shape) - 1
        if np.any(r_lo < f_lo) or np.any(r_hi > f_hi):
            raise ValueError(f"refined box {r_lo.tolist()}..{r_hi.tolist()} outside {f_lo.tolist()}..{f_hi.tolist()}")
    sc = gm.scale
    lo = [max(0, math.floor(f_lo[a] / sc[a] + 1e-6)) for a in range(3)]
    hi = [min(gm.model_shape[a] - 1, math.ceil(f_hi[a] / sc[a] - 1e-6)) for a in range(3)]
    crop = logits[:, lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1].float()
    taps = []
    for a in range(3):
        n_f = int(f_hi[a] - f_lo[a] + 1)
        taps.append(axis_taps(crop.shape[a + 1], n_f, 1.0 / sc[a], False, offset=f_lo[a] / sc[a] - lo[a]))
    with torch.inference_mode():
        for z0 in range(0, taps[0][0].shape[0], slab):
            zi, zw = taps[0][0][z0 : z0 + slab], taps[0][1][z0 : z0 + slab]
            block = resample_axis(crop, 1, zi, zw)
            block = resample_axis(block, 2, *taps[1])
            block = resample_axis(block, 3, *taps[2])
            labels = argmax0(block)
            z = int(f_lo[0]) + z0
            if foreground is not None:
                _apply_foreground(block, labels, foreground, np.array([z, f_lo[1], f_lo[2]]), gate)
            out[z : z + block.shape[1], f_lo[1] : f_hi[1] + 1, f_lo[2] : f_hi[2] + 1] = labels.numpy()
    return out


def _apply_foreground(
    block: torch.Tensor, labels: torch.Tensor, fg: Foreground, origin: np.ndarray, gate: float
) -> None:
    """In place: labels (z, y, x) of a slab at ``origin`` (study voxels) take the refined foreground where it
    overlaps, named by the best non-background logit of ``block`` (C, z, y, x)."""
    import torch

    a = np.maximum(fg.lo, origin)
    b = np.minimum(fg.lo + np.array(fg.mask.shape), origin + np.array(labels.shape))
    if np.any(b <= a):
        return
    blk = tuple(slice(int(i - o), int(j - o)) for i, j, o in zip(a, b, origin, strict=True))
    ref = tuple(slice(int(i - o), int(j - o)) for i, j, o in zip(a, b, fg.lo, strict=True))
    sub = block[(slice(None), *blk)]
    best, ident = sub[1:].max(0)
    keep = torch.from_numpy(np.ascontiguousarray(fg.mask[ref])) & (sub[0] - best <= gate)
    labels[blk] = torch.where(keep, ident.to(torch.uint8) + 1, torch.zeros_like(labels[blk]))


def argmax0(block: torch.Tensor) -> torch.Tensor:
    """uint8 index of the largest value over dim 0 (classes); ``max(0).indices`` is ~4x faster than
    ``argmax(0)`` on large CPU tensors."""
    import torch

    return block.max(0).indices.to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Where studies come from
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyRef:
    """A study in a prepared cache or an RSNA-layout folder; nothing is read until :meth:`load`."""

    uid: str
    split: str
    path: Path
    kind: str  # "cache" | "rsna"
    mask_path: Path | None = None

    @property
    def has_mask(self) -> bool:
        return self.mask_path is not None

    def load(self, with_mask: bool = True) -> tuple[Volume, np.ndarray | None]:
        """(volume, mask on the volume's grid or None); a mask that does not line up is an error naming both."""
        from cspine.data.cache import load_prepared
        from cspine.io import load_segmentation, load_series

        if self.kind == "cache":
            st = load_prepared(self.path)
            vol, mask = st.volume, (st.mask if with_mask else None)
        else:
            vol = load_series(self.path)
            mask = load_segmentation(self.mask_path, vol) if with_mask and self.mask_path else None
        if mask is not None and mask.shape != vol.shape:
            raise ValueError(
                f"{self.path}: mask shape {mask.shape} differs from volume shape {vol.shape}; "
                f"re-run cspine prepare or check {self.mask_path}"
            )
        return vol, mask


def discover_studies(data: Path, split: str = "train") -> list[StudyRef]:
    """Studies of a split in a prepared cache (``cspine prepare``) or an RSNA-layout folder, sorted by UID."""
    from cspine.data.cache import MASK_FILE, META_FILE, prepared_studies

    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"{data}: no such file or folder")
    if (data / META_FILE).exists():  # one prepared study
        return [StudyRef(data.name, split, data, "cache", data / MASK_FILE if (data / MASK_FILE).exists() else None)]
    dirs = prepared_studies(data, split)
    if dirs:
        return [StudyRef(d.name, split, d, "cache", d / MASK_FILE if (d / MASK_FILE).exists() else None) for d in dirs]
    if (data / f"{split}_images").is_dir():
        from cspine.data.rsna import RsnaDataset

        ds = RsnaDataset(data)
        return [
            StudyRef(
                uid, split, ds.study_dir(split, uid), "rsna", ds.segmentation_path(uid) if split == "train" else None
            )
            for uid in ds.study_uids(split)
        ]
    raise ValueError(
        f"{data}: no {split!r} studies found; expected a prepared cache ({split}/<uid>/meta.json, see cspine prepare) "
        f"or an RSNA-layout folder ({split}_images/<uid>/)"
    )


def load_study_volume(path: Path) -> Volume:
    """A study for inference: DICOM folder / zip / file, NIfTI volume, or prepared study folder."""
    from cspine.data.cache import META_FILE, load_prepared
    from cspine.io import load_study

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir() and (path / META_FILE).exists():
        return load_prepared(path).volume
    return load_study(path)


# ---------------------------------------------------------------------------------------------------------------
# Training cases and patches
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One study on the model grid: image (float16 to halve memory), classes, class shares, where each class lies.

    ``shares`` are the soft targets (:func:`class_shares`) quantised to uint8 (1/255 steps): (classes, z, y, x).
    """

    uid: str
    image: np.ndarray
    labels: np.ndarray
    shares: np.ndarray | None = None
    fg_index: dict[int, np.ndarray] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        uid: str,
        vol: Volume,
        mask: np.ndarray,
        cfg: PreprocessConfig,
        max_points: int = 2000,
        soft: bool = True,
        stage: str = "coarse",
    ) -> Case:
        """``stage`` "refine" collapses the classes to background / vertebra (share of any vertebra); patch
        centres are still balanced over C1..C7 and other (``fg_index`` by vertebra), so C1, next to the skull
        base, is seen as often as C4."""
        image, gm = to_model_grid(vol, cfg)
        shares = class_shares(mask, gm)
        vertebrae = argmax0(shares).numpy()
        if stage == "refine":
            shares = foreground_shares(shares)
        labels = argmax0(shares).numpy() if stage == "refine" else vertebrae
        q = np.rint(shares.numpy() * 255).astype(np.uint8) if soft else None
        rng = np.random.default_rng(0)  # which points are kept is fixed, not part of the training randomness
        fg: dict[int, np.ndarray] = {}
        for c in np.unique(vertebrae):
            if c == 0:
                continue
            pts = np.argwhere(vertebrae == c)
            if len(pts) > max_points:
                pts = pts[rng.choice(len(pts), max_points, replace=False)]
            fg[int(c)] = pts.astype(np.int32)
        return cls(uid, image.astype(np.float16), labels, q, fg)


def _crop_padded(arr: np.ndarray, lo: np.ndarray, size: np.ndarray) -> np.ndarray:
    """arr[..., lo:lo+size] over the last three axes, zeros outside the array."""
    lead = arr.shape[:-3]
    out = np.zeros((*lead, *(int(s) for s in size)), dtype=arr.dtype)
    src_lo = np.maximum(lo, 0)
    src_hi = np.minimum(lo + size, arr.shape[-3:])
    if np.any(src_hi <= src_lo):
        return out
    dst_lo = src_lo - lo
    dst_hi = dst_lo + (src_hi - src_lo)
    out[(..., *(slice(a, b) for a, b in zip(dst_lo, dst_hi, strict=True)))] = arr[
        (..., *(slice(a, b) for a, b in zip(src_lo, src_hi, strict=True)))
    ]
    return out


def _rotation(angles_rad: Sequence[float]) -> np.ndarray:
    """Rotation about canonical axes 0, 1, 2 (in that order), acting on (a0, a1, a2) coordinates."""
    r = np.eye(3)
    for axis, ang in enumerate(angles_rad):
        c, s = math.cos(ang), math.sin(ang)
        i, j = [k for k in range(3) if k != axis]
        m = np.eye(3)
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        r = m @ r
    return r


class PatchSampler:
    """Draws augmented training patches from :class:`Case` objects.

    Centres: with probability ``fg_fraction`` a random voxel of a random present vertebra class (class-balanced,
    so C1 and C7 are seen as often as C4), otherwise anywhere. Spatial augmentation rotates and scales about the
    centre by resampling the patch from the case (trilinear image; trilinear class shares when ``soft``, else
    nearest labels); intensity augmentation adds gamma, contrast, brightness, noise and blur. Every draw comes
    from the generators passed in.
    """

    def __init__(
        self, cases: Sequence[Case], patch: Sequence[int], aug: AugmentConfig, fg_fraction: float, soft: bool = False
    ) -> None:
        if not cases:
            raise ValueError("no training cases")
        if soft and any(c.shares is None for c in cases):
            raise ValueError("soft targets need cases built with soft=True")
        self.cases = list(cases)
        self.patch = np.asarray(patch, dtype=np.int64)
        self.aug = aug
        self.fg_fraction = fg_fraction
        self.soft = soft

    def batch(self, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (n, 1, *patch) float32, targets): class shares (n, classes, *patch) float32 when soft, else
        labels (n, 1, *patch) int64."""
        import torch

        xs, ys = zip(*(self.sample(rng) for _ in range(n)), strict=True)
        if self.soft:
            return torch.stack(xs)[:, None], torch.stack(ys)
        return torch.stack(xs)[:, None], torch.stack(ys)[:, None].long()

    def _centre(self, case: Case, rng: np.random.Generator) -> np.ndarray:
        shape = np.array(case.image.shape)
        if case.fg_index and rng.random() < self.fg_fraction:
            classes = sorted(case.fg_index)
            pts = case.fg_index[classes[int(rng.integers(len(classes)))]]
            centre = pts[int(rng.integers(len(pts)))].astype(np.float64)
            centre += rng.uniform(-0.25, 0.25, 3) * self.patch
        else:
            centre = rng.uniform(0, 1, 3) * (shape - 1)
        return centre

    def sample(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One augmented (image, labels) patch."""
        import torch

        case = self.cases[int(rng.integers(len(self.cases)))]
        centre = self._centre(case, rng)
        p = self.patch
        a = self.aug
        target = case.shares if self.soft else case.labels
        assert target is not None
        if rng.random() < a.p_affine:
            angles = [math.radians(rng.uniform(-d, d)) for d in a.rotate_deg]
            scale = rng.uniform(*a.scale) * rng.uniform(1 - a.scale_jitter, 1 + a.scale_jitter, 3)
            x, y = warp_patch(case.image, target, centre, _rotation(angles) @ np.diag(scale), p)
        else:
            lo = np.rint(centre - (p - 1) / 2).astype(np.int64)
            x = torch.from_numpy(_crop_padded(case.image, lo, p).astype(np.float32))
            y = torch.from_numpy(_crop_padded(target, lo, p))
            if self.soft:
                y = _shares_from_uint8(y)
        if rng.random() < a.p_intensity:
            x = x.clamp(0, 1) ** float(rng.uniform(*a.gamma))
            x = x * float(1 + rng.uniform(-a.contrast, a.contrast)) + float(rng.uniform(-a.brightness, a.brightness))
            if a.noise_std > 0:
                sigma = float(rng.uniform(0, a.noise_std))
                x = x + torch.from_numpy(rng.standard_normal(x.shape, dtype=np.float32) * sigma)
        if rng.random() < a.p_blur:
            x = gaussian_blur(x, float(rng.uniform(*a.blur_sigma)))
        return x.contiguous(), y


def _shares_from_uint8(q: torch.Tensor) -> torch.Tensor:
    """uint8 (or interpolated float 0..255) shares -> float shares; outside the volume (all zero) is background."""
    y = q.float() / 255.0
    y[0] = (1.0 - y[1:].sum(0)).clamp_(0.0, 1.0)
    return y / y.sum(0, keepdim=True)


def warp_patch(
    image: np.ndarray, target: np.ndarray, centre: np.ndarray, m: np.ndarray, patch: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample a patch around ``centre``: output voxel offset o reads input position centre + m @ o.

    ``target`` is either labels (z, y, x), resampled nearest, or uint8 class shares (classes, z, y, x), resampled
    trilinearly and returned as float shares. Only the box the transformed patch covers is cut out (zeros outside
    the volume), then resampled with one ``affine_grid`` + ``grid_sample``.
    """
    import torch
    import torch.nn.functional as F

    soft = target.ndim == 4
    p = np.asarray(patch, dtype=np.int64)
    corners = np.array(list(itertools.product(*[(-(s - 1) / 2, (s - 1) / 2) for s in p])))
    half = np.abs(corners @ m.T).max(axis=0)
    lo = np.floor(centre - half).astype(np.int64) - 1
    size = np.ceil(2 * half).astype(np.int64) + 3
    img = torch.from_numpy(_crop_padded(image, lo, size).astype(np.float32))
    tgt = torch.from_numpy(_crop_padded(target, lo, size).astype(np.float32))
    # normalised output coords u (align_corners) -> normalised crop coords v: v = A u + b, in axis order (0, 1, 2)
    a_mat = np.diag(2.0 / (size - 1)) @ m @ np.diag((p - 1) / 2.0)
    b_vec = 2.0 * (centre - lo) / (size - 1) - 1.0
    theta = np.zeros((1, 3, 4), dtype=np.float32)
    theta[0, :, :3] = a_mat[::-1, ::-1]  # grid_sample orders coordinates (x, y, z) = axes (2, 1, 0)
    theta[0, :, 3] = b_vec[::-1]
    grid = F.affine_grid(torch.from_numpy(theta), [1, 1, *[int(v) for v in p]], align_corners=True)
    x = F.grid_sample(img[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
    if soft:
        y = F.grid_sample(tgt[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
        return x, _shares_from_uint8(y)
    y = F.grid_sample(tgt[None, None], grid, mode="nearest", padding_mode="zeros", align_corners=True)[0, 0]
    return x, y.round().to(torch.uint8)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable 3D Gaussian blur of a (z, y, x) tensor (sigma in voxels), edges replicated."""
    import torch
    import torch.nn.functional as F

    r = max(1, math.ceil(2.5 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = k / k.sum()
    t = x[None, None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = 2 * r + 1
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        t = F.conv3d(F.pad(t, pad, mode="replicate"), k.reshape(shape))
    return t[0, 0]


def fold_of(uids: Sequence[str], folds: int, seed: int) -> dict[str, int]:
    """Study -> fold, grouped by study (one study is never on both sides), balanced and fixed by the seed."""
    order = sorted(uids)
    perm = np.random.default_rng([seed, 17]).permutation(len(order))
    return {order[int(i)]: k % folds for k, i in enumerate(perm)}


def describe_cases(cases: Sequence[Case]) -> str:
    """One line for logs: how many cases and how many voxels per class."""
    counts = np.zeros(len(CLASS_TO_VALUE), dtype=np.int64)
    for c in cases:
        counts += np.bincount(c.labels.ravel(), minlength=len(counts))[: len(counts)]
    return json.dumps({"cases": len(cases), "voxels_per_class": counts.tolist()})
