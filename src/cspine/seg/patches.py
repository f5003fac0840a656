"""Training cases and patches: a study on the model grid with its soft class targets (:class:`Case`), augmented
patch sampling (:class:`PatchSampler`), and the cross-validation folds of a set of studies.

Apart from the model grid (:mod:`cspine.seg.grid`), which inference shares, because only training draws patches;
augmentation is the only random step and draws from the generators it is given.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from cspine.io.volume import Volume
from cspine.labels import CERVICAL_VALUES
from cspine.seg.config import CLASS_TO_VALUE, AugmentConfig, PreprocessConfig, RandomizeConfig
from cspine.seg.grid import argmax0, class_shares, foreground_shares, to_model_grid

if TYPE_CHECKING:
    import torch


@dataclass
class Case:
    """One study on the model grid: image (float16 to halve memory), classes, class shares, where each class lies.

    ``shares`` are the soft targets (:func:`class_shares`) quantised to uint8 (1/255 steps): (classes, z, y, x).
    ``lucent``: (n, 3) model-grid voxels of a vertebra whose 26 neighbours are vertebra too and that are darker than
    the ``lucent_hu`` the case was built with: fracture lines and gaps (an intact generated vertebra has none).
    """

    uid: str
    image: np.ndarray
    labels: np.ndarray
    shares: np.ndarray | None = None
    fg_index: dict[int, np.ndarray] = field(default_factory=dict)
    lucent: np.ndarray | None = None

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
        lucent_hu: float | None = None,
    ) -> Case:
        """``stage`` "refine" collapses the classes to background / vertebra (share of any vertebra); patch
        centres are still balanced over C1..C7 and other (``fg_index`` by vertebra), so C1, next to the skull
        base, is seen as often as C4. ``lucent_hu``: also list the lucent vertebra voxels (:attr:`lucent`)."""
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
        lucent = None
        if lucent_hu is not None:
            from scipy import ndimage

            inner = ndimage.binary_erosion(vertebrae > 0, np.ones((3, 3, 3), bool))
            lucent = np.argwhere(inner & (image < window_value(lucent_hu, cfg))).astype(np.int32)
            if len(lucent) > max_points:
                lucent = lucent[rng.choice(len(lucent), max_points, replace=False)]
        return cls(uid, image.astype(np.float16), labels, q, fg, lucent)


#: Values of :meth:`PatchSampler.lucent_map`.
LUCENT_INSIDE, LUCENT_OUTSIDE = 1, 2


def window_value(hu: float, cfg: PreprocessConfig) -> float:
    """Where ``hu`` lies on the network's input scale (the window mapped to [0, 1])."""
    return (hu - (cfg.window_level - cfg.window_width / 2.0)) / cfg.window_width


def cervical_box(vol: Volume, mask: np.ndarray, margin_mm: float) -> tuple[Volume, np.ndarray] | None:
    """The study cropped to the box around its C1..C7 voxels plus ``margin_mm``, or None when it has none."""
    from cspine.io.volume import crop

    pts = np.argwhere(np.isin(mask, CERVICAL_VALUES))
    if len(pts) == 0:
        return None
    pad = np.ceil(margin_mm / np.asarray(vol.spacing)).astype(np.int64)
    lo, hi = pts.min(0) - pad, pts.max(0) + pad + 1
    box = crop(vol, tuple(lo), tuple(hi))
    lo = np.maximum(lo, 0)
    return box, mask[lo[0] : lo[0] + box.shape[0], lo[1] : lo[1] + box.shape[1], lo[2] : lo[2] + box.shape[2]]


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
    nearest labels); intensity augmentation adds gamma, contrast, brightness, noise and blur. With ``randomize``
    (and the ``preprocess`` the cases were built with) each patch is first taken back to HU and domain-randomised
    (:func:`cspine.seg.randomize.randomize_patch`: field-of-view edges, tissue intensities, bias field, gamma, blur,
    resolution, noise), then windowed again. Every draw comes from the generators passed in. With ``lucent_hu``
    each patch also carries where its target vertebrae are lucent (:meth:`lucent_map`), and ``lucent_fraction`` of
    the centres fall on a case's lucent voxels (:attr:`Case.lucent`) where it has any.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        patch: Sequence[int],
        aug: AugmentConfig,
        fg_fraction: float,
        soft: bool = False,
        randomize: RandomizeConfig | None = None,
        preprocess: PreprocessConfig | None = None,
        lucent_hu: float | None = None,
        lucent_fraction: float = 0.0,
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
        if randomize is not None and preprocess is None:
            raise ValueError("domain randomisation needs the preprocessing the cases were built with")
        self.randomize = randomize
        self.preprocess = preprocess
        if lucent_hu is not None and preprocess is None:
            raise ValueError("lucent voxels need the preprocessing the cases were built with")
        self.lucent_hu = lucent_hu
        self.lucent_fraction = lucent_fraction

    def batch(self, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        """(images (n, 1, *patch) float32, targets): class shares (n, classes, *patch) float32 when soft, else
        labels (n, 1, *patch) int64; with ``lucent_hu`` a third tensor, the lucent maps (n, 1, *patch) uint8."""
        import torch

        drawn = [self.sample(rng) for _ in range(n)]
        x = torch.stack([d[0] for d in drawn])[:, None]
        y = torch.stack([d[1] for d in drawn])
        y = y if self.soft else y[:, None].long()
        if self.lucent_hu is None:
            return x, y
        return x, y, torch.stack([d[2] for d in drawn])[:, None]

    def _centre(self, case: Case, rng: np.random.Generator) -> np.ndarray:
        shape = np.array(case.image.shape)
        lucent = case.lucent if case.lucent is not None and self.lucent_fraction else np.empty((0, 3), np.int32)
        if len(lucent) and rng.random() < self.lucent_fraction:
            centre = lucent[int(rng.integers(len(lucent)))].astype(np.float64)
            return centre + rng.uniform(-0.25, 0.25, 3) * self.patch
        if case.fg_index and rng.random() < self.fg_fraction:
            classes = sorted(case.fg_index)
            pts = case.fg_index[classes[int(rng.integers(len(classes)))]]
            centre = pts[int(rng.integers(len(pts)))].astype(np.float64)
            centre += rng.uniform(-0.25, 0.25, 3) * self.patch
        else:
            centre = rng.uniform(0, 1, 3) * (shape - 1)
        return centre

    def sample(self, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        """One augmented (image, labels) patch, and its lucent map with ``lucent_hu``."""
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
        lucent = self.lucent_map(x, y) if self.lucent_hu is not None else None
        if self.randomize is not None:
            x, y = self._randomized(x, y, rng)
        if rng.random() < a.p_intensity:
            x = x.clamp(0, 1) ** float(rng.uniform(*a.gamma))
            x = x * float(1 + rng.uniform(-a.contrast, a.contrast)) + float(rng.uniform(-a.brightness, a.brightness))
            if a.noise_std > 0:
                sigma = float(rng.uniform(0, a.noise_std))
                x = x + torch.from_numpy(rng.standard_normal(x.shape, dtype=np.float32) * sigma)
        if rng.random() < a.p_blur:
            x = gaussian_blur(x, float(rng.uniform(*a.blur_sigma)))
        if lucent is None:
            return x.contiguous(), y
        lucent[(lucent == LUCENT_INSIDE) & ~self._foreground(y)] = 0  # a crop of the field of view took these
        return x.contiguous(), y, lucent

    def _foreground(self, y: torch.Tensor) -> torch.Tensor:
        return y[0] < 0.5 if self.soft else y > 0

    def lucent_map(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """uint8 map of a patch (read before intensity changes) of the voxels darker than ``lucent_hu``:
        :data:`LUCENT_INSIDE` where the target calls them vertebra and all 26 neighbours are vertebra too (a
        fracture line or gap), :data:`LUCENT_OUTSIDE` where it calls them background and one of their neighbours
        is vertebra (the soft tissue against the bone: the negatives that keep the masks from growing into it)."""
        import torch
        import torch.nn.functional as F

        assert self.lucent_hu is not None and self.preprocess is not None
        fg = self._foreground(y)[None, None].float()
        inner = -F.max_pool3d(-fg, 3, stride=1, padding=1)[0, 0] > 0.5
        touching = F.max_pool3d(fg, 3, stride=1, padding=1)[0, 0] > 0.5
        dark = x < window_value(self.lucent_hu, self.preprocess)
        out = torch.zeros(x.shape, dtype=torch.uint8)
        out[dark & inner] = LUCENT_INSIDE
        out[dark & touching & (fg[0, 0] < 0.5)] = LUCENT_OUTSIDE
        return out

    def _randomized(
        self, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The patch in HU through the domain randomisation, windowed again (values the window clipped stay at its
        ends: the network never sees beyond them either)."""
        import torch

        from cspine.seg.randomize import randomize_patch

        pre = self.preprocess
        assert pre is not None and self.randomize is not None
        lo = pre.window_level - pre.window_width / 2.0
        hu = x.numpy() * np.float32(pre.window_width) + np.float32(lo)
        hu, target = randomize_patch(hu, y.numpy(), rng, self.randomize, pre.spacing)
        x = torch.from_numpy(np.clip((hu - lo) / pre.window_width, 0.0, 1.0).astype(np.float32))
        return x, torch.from_numpy(np.ascontiguousarray(target))


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
