"""Domain randomisation for segmentation training: what a CT looks like is drawn far wider than real scans vary.

SynthSeg (Billot et al., 2023) trained on images whose intensities, resolution and artefacts were drawn at random so
that real scans became one more variation; this module does that for CT volumes in HU with their label masks:
crops of the field of view, a random intensity mapping per HU band (air, fat, soft tissue, bone, dense bone), a
bias field, gamma, blur, a lower resolution, and noise.

torchio's pattern: each transform has a random half that *draws* parameters from a seeded ``numpy.random.Generator``
and a deterministic half that *applies* them, so what was applied is a plain JSON-able record that can be saved and
replayed exactly (:func:`randomize` returns it, :func:`replay` applies it again). MONAI's deterministic transforms do
the work where they exist (SpatialCrop, Resize, GaussianSmooth, AdjustContrast, RandBiasField's field).

Example::

    rng = np.random.default_rng(0)
    image2, mask2, record = randomize(image, mask, rng, spacing=(1.0, 0.5, 0.5))
    image3, mask3 = replay(image, mask, record)   # identical to image2, mask2
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from cspine.seg.config import RandomizeConfig

Params = dict[str, Any]

#: HU knots of the intensity mapping: air, fat, soft tissue, cancellous bone, cortical bone, metal.
HU_KNOTS: tuple[float, ...] = (-1000.0, -100.0, 40.0, 300.0, 1200.0, 3000.0)

class Transform(Protocol):
    """A random transform: ``sample`` draws parameters (or None: not applied), ``apply`` is deterministic."""

    name: str

    def sample(self, rng: np.random.Generator, image: np.ndarray, spacing: Sequence[float]) -> Params | None: ...

    def apply(self, image: np.ndarray, mask: np.ndarray, params: Params) -> tuple[np.ndarray, np.ndarray]: ...


def _tensor(image: np.ndarray) -> Any:
    import torch

    return torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32))[None]


def _numpy(t: Any) -> np.ndarray:
    return np.asarray(t[0].detach().cpu().numpy(), dtype=np.float32)


def _draw_box(rng: np.random.Generator, shape: Sequence[int], keep: tuple[float, float]) -> Params:
    """A box keeping a random fraction ``keep`` of each axis at a random offset: {"start": [...], "end": [...]}."""
    start, end = [], []
    for n in shape:
        k = max(1, round(n * float(rng.uniform(*keep))))
        s = int(rng.integers(0, n - k + 1))
        start.append(s)
        end.append(s + k)
    return {"start": start, "end": end}


@dataclass(frozen=True)
class Crop:
    """A box of the field of view (image and mask alike): each axis keeps a random fraction at a random offset."""

    p: float
    keep: tuple[float, float]
    name: str = "crop"

    def sample(self, rng: np.random.Generator, image: np.ndarray, spacing: Sequence[float]) -> Params | None:
        if rng.random() >= self.p:
            return None
        return _draw_box(rng, image.shape, self.keep)

    def apply(self, image: np.ndarray, mask: np.ndarray, params: Params) -> tuple[np.ndarray, np.ndarray]:
        from monai.transforms import SpatialCrop

        crop = SpatialCrop(roi_start=params["start"], roi_end=params["end"])
        return _numpy(crop(_tensor(image))), _numpy(crop(_tensor(mask))).round().astype(mask.dtype)


@dataclass(frozen=True)
class FovEdge:
    """The edge of a field of view inside a training patch: beyond a random box the image is scanner padding (a
    value drawn from ``pad_hu``) and the labels are background, so the network meets vertebrae cut off by the first
    or last slice or by the reconstruction circle. Shape-preserving (patches keep their size); labels (z, y, x) or
    class shares (classes, z, y, x, background first)."""

    p: float
    keep: tuple[float, float]
    pad_hu: tuple[float, ...]
    name: str = "fov_edge"

    def sample(self, rng: np.random.Generator, image: np.ndarray, spacing: Sequence[float]) -> Params | None:
        if rng.random() >= self.p:
            return None
        box = _draw_box(rng, image.shape[-3:], self.keep)
        return {**box, "pad_hu": float(self.pad_hu[int(rng.integers(len(self.pad_hu)))])}

    def apply(self, image: np.ndarray, mask: np.ndarray, params: Params) -> tuple[np.ndarray, np.ndarray]:
        outside = np.ones(image.shape[-3:], dtype=bool)
        outside[tuple(slice(a, b) for a, b in zip(params["start"], params["end"], strict=True))] = False
        image = np.where(outside, np.float32(params["pad_hu"]), image).astype(np.float32)
        mask = mask.copy()
        mask[..., outside] = 0
        if mask.ndim == 4:  # class shares: what lies outside is background
            mask[0][outside] = 1
        return image, mask


@dataclass(frozen=True)
class IntensityMap:
    """A new intensity per tissue: a piecewise-linear map through :data:`HU_KNOTS`, each knot scaled about water
    and shifted at random (contrasts between tissues change, and may even invert)."""

    p: float
    scale: tuple[float, float]
    shift_hu: float
    name: str = "intensity"

    def sample(self, rng: np.random.Generator, image: np.ndarray, spacing: Sequence[float]) -> Params | None:
        if rng.random() >= self.p:
            return None
        out = [
            float(k * rng.uniform(*self.scale) + rng.normal(0.0, self.shift_hu)) for k in HU_KNOTS
        ]  # scale about 0 HU (water)
        return {"knots_in": list(HU_KNOTS), "knots_out": out}

    def apply(self, image: np.ndarray, mask: np.ndarray, params: Params) -> tuple[np.ndarray, np.ndarray]:
        x, y = np.asarray(params["knots_in"]), np.asarray(params["knots_out"])
        slope_lo = (y[1] - y[0]) / (x[1] - x[0])
        slope_hi = (y[-1] - y[-2]) / (x[-1] - x[-2])
        out = np.interp(image, x, y)
        out = np.where(image < x[0], y[0] + (image - x[0]) * slope_lo, out)  # extend linearly beyond the knots
        out = np.where(image > x[-1], y[-1] + (image - x[-1]) * slope_hi, out)
        return out.astype(np.float32), mask


@dataclass(frozen=True)
class BiasField:
    """A smooth multiplicative field (exp of a degree-3 Legendre polynomial, MONAI's RandBiasField field) applied
    to HU + 1024, so that air stays near -1024 while tissue brightness drifts across the volume."""

    p: float
    coeff: float
    degree: int = 3
    name: str = "bias"

    def sample(self, rng: np.random.Generator, image: np.ndarray, spacing: Sequence[float]) -> Params | None:
        if rng.random() >= self.p:
            return None
        n = math.comb(self.degree + 3, 3)  # Legendre terms of total degree <= 3 in 3-D
        return {"degree": self.degree, "coeffs": [float(c) for c in rng.uniform(-self.coeff, self.coeff, n)]}

    def apply(self, image: np.ndarray, mask: np.ndarray, params: Params) -> tuple[np.ndarray, np.ndarray]:
        from monai.transforms import RandBiasField

        field = RandBiasField(degree=params["degree"])._generate_random_field(
            image.shape, params["degree"], params["coeffs"]
        )
        return ((image + 1024.0) * np.exp(field) - 1024.0).astype(np.float32), mask


@dataclass(frozen=True)
class Gamma:
    """Gamma on the image's own range (MONAI AdjustContrast)."""

    p: float
    gamma: tuple[float, float]
    name: str = "gamma"

    def sample(self, rng: np.random.Generator, image: np.ndarray, spacing: Sequence[float]) -> Params | None:
        if rng.random() >= self.p:
            return None
        return {"gamma": float(math.exp(rng.uniform(math.log(self.gamma[0]), math.log(self.gamma[1]))))}

    def apply(self, image: np.ndarray, mask: np.ndarray, params: Params) -> tuple[np.ndarray, np.ndarray]:
        from monai.transforms import AdjustContrast

        return _numpy(AdjustContrast(gamma=params["gamma"])(_tensor(image))), mask


@dataclass(frozen=True)
class Blur:
    """Gaussian blur of sigma drawn in mm per axis (MONAI GaussianSmooth, in voxels)."""

    p: float
    mm: tuple[float, float]
    name: str = "blur"

    def sample(self, rng: np.random.Generator, image: np.ndarray, spacing: Sequence[float]) -> Params | None:
        if rng.random() >= self.p:
            return None
        return {"sigma_vox": [float(rng.uniform(*self.mm)) / float(s) for s in spacing]}

    def apply(self, image: np.ndarray, mask: np.ndarray, params: Params) -> tuple[np.ndarray, np.ndarray]:
        from monai.transforms import GaussianSmooth

        return _numpy(GaussianSmooth(sigma=params["sigma_vox"])(_tensor(image))), mask


@dataclass(frozen=True)
class Resolution:
    """A coarser scan: the image is averaged down to a voxel size drawn per axis, then interpolated back to its grid
    (MONAI Resize, area then trilinear); the mask keeps its grid, so it stays aligned."""

    p: float
    mm: tuple[float, float]
    name: str = "resolution"

    def sample(self, rng: np.random.Generator, image: np.ndarray, spacing: Sequence[float]) -> Params | None:
        if rng.random() >= self.p:
            return None
        low = []
        for n, s in zip(image.shape, spacing, strict=True):
            target = float(rng.uniform(max(self.mm[0], s), max(self.mm[1], s)))
            low.append(max(2, min(n, round(n * s / target))))
        return {"low_shape": low}

    def apply(self, image: np.ndarray, mask: np.ndarray, params: Params) -> tuple[np.ndarray, np.ndarray]:
        from monai.transforms import Resize

        down = Resize(spatial_size=params["low_shape"], mode="area")(_tensor(image))
        up = Resize(spatial_size=image.shape, mode="trilinear", align_corners=False)(down)
        return _numpy(up), mask


@dataclass(frozen=True)
class Noise:
    """Gaussian noise of a drawn sd; the noise itself comes from a recorded seed, so replay is exact."""

    p: float
    hu: tuple[float, float]
    name: str = "noise"

    def sample(self, rng: np.random.Generator, image: np.ndarray, spacing: Sequence[float]) -> Params | None:
        if rng.random() >= self.p:
            return None
        return {"sd": float(rng.uniform(*self.hu)), "seed": int(rng.integers(2**31))}

    def apply(self, image: np.ndarray, mask: np.ndarray, params: Params) -> tuple[np.ndarray, np.ndarray]:
        noise = np.random.default_rng(params["seed"]).standard_normal(image.shape, dtype=np.float32)
        return image + noise * np.float32(params["sd"]), mask


def pipeline(cfg: RandomizeConfig) -> list[Transform]:
    """The transforms in the order they are applied: geometry first, then intensities, then acquisition."""
    return [
        Crop(cfg.p_crop, cfg.crop_keep),
        IntensityMap(cfg.p_intensity, cfg.intensity_scale, cfg.intensity_shift_hu),
        BiasField(cfg.p_bias, cfg.bias_coeff),
        Gamma(cfg.p_gamma, cfg.gamma),
        Blur(cfg.p_blur, cfg.blur_mm),
        Resolution(cfg.p_resolution, cfg.resolution_mm),
        Noise(cfg.p_noise, cfg.noise_hu),
    ]


def patch_pipeline(cfg: RandomizeConfig) -> list[Transform]:
    """The pipeline for training patches: as :func:`pipeline`, with the shape-preserving :class:`FovEdge` in place
    of :class:`Crop` (a batch needs patches of one size)."""
    return [FovEdge(cfg.p_crop, cfg.crop_keep, cfg.pad_hu), *pipeline(cfg)[1:]]


def randomize_patch(
    image: np.ndarray, target: np.ndarray, rng: np.random.Generator, cfg: RandomizeConfig, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Randomise one training patch in HU, (z, y, x), with its labels or class shares; draws only from ``rng``.

    Not recorded per patch (thousands per run): the config and the training seed are the record, and the same seed
    draws the same patches again.
    """
    image, target, _ = _run(patch_pipeline(cfg), image, target, rng, spacing)
    return image, target


def randomize(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    cfg: RandomizeConfig | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> tuple[np.ndarray, np.ndarray, list[Params]]:
    """Draw and apply the pipeline to a (z, y, x) HU image and its label mask; returns (image, mask, record).

    ``record`` lists the transforms applied, in order, as ``{"name": ..., **params}`` (JSON-able); give it to
    :func:`replay` to apply the same again. Deterministic in the state of ``rng``.
    """
    if image.shape != mask.shape:
        raise ValueError(f"image {image.shape} and mask {mask.shape} must have the same shape")
    return _run(pipeline(cfg or RandomizeConfig()), np.asarray(image, dtype=np.float32), mask, rng, spacing)


def _run(
    transforms: Sequence[Transform],
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    spacing: Sequence[float],
) -> tuple[np.ndarray, np.ndarray, list[Params]]:
    """Draw and apply each transform in turn; (image, mask, record of what was applied)."""
    record: list[Params] = []
    for t in transforms:
        params = t.sample(rng, image, spacing)
        if params is not None:
            image, mask = t.apply(image, mask, params)
            record.append({"name": t.name, **params})
    return image, mask, record


def replay(image: np.ndarray, mask: np.ndarray, record: Sequence[Params]) -> tuple[np.ndarray, np.ndarray]:
    """Apply a record of :func:`randomize` again (exactly: every random choice is in the record)."""
    by_name = {t.name: t for t in pipeline(RandomizeConfig())}
    image = np.asarray(image, dtype=np.float32)
    for entry in record:
        params = {k: v for k, v in entry.items() if k != "name"}
        image, mask = by_name[entry["name"]].apply(image, mask, params)
    return image, mask
