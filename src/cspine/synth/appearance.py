"""The wide profile's scanner: field of view and resolution, noise, streaks, HU calibration and padding.

Each function takes the numbers it needs from a ``numpy.random.Generator`` handed in by the study, so the choices
are reproducible and recorded (:func:`cspine.synth.study.generate_study` puts them in ``SynthStudy.extra``).
"""

from __future__ import annotations

import math

import numpy as np

from cspine.synth.parts import Anatomy
from cspine.synth.render import Grid

#: Fields of view of the wide profile and how often each is drawn.
FOVS: dict[str, float] = {
    "head": 0.1,
    "head_neck": 0.2,
    "head_upper_neck": 0.1,
    "neck": 0.2,
    "neck_chest": 0.2,
    "chest": 0.1,
    "abdomen": 0.1,
}
#: Fields of view that hold no cervical vertebra (empty cervical mask, every label 0).
NO_CSPINE: frozenset[str] = frozenset({"head", "chest", "abdomen"})
#: What real scanners write outside the reconstruction circle (HU); None: no circle.
PADDING: tuple[int | None, ...] = (-2048, -3024, -1024, 0, None)
PIXEL_MM = (0.3, 5.0)
SLICE_MM = (0.5, 5.0)
MAX_MATRIX = {"small": 128, "full": 512}
MAX_SLICES = {"small": 128, "full": 600}


def draw_fov(rng: np.random.Generator) -> str:
    names = list(FOVS)
    return names[int(rng.choice(len(names), p=list(FOVS.values())))]


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def wide_grid(rng: np.random.Generator, anat: Anatomy, size: str, fov: str) -> Grid:
    """Scan range from the field of view's landmarks; pixel 0.3-5 mm, slices 0.5-5 mm (log-uniform), matrix and slice
    count capped per size (the spacing grows instead, so the physical extent is kept)."""
    lm = anat.landmarks
    u = rng.uniform
    ranges = {
        "head": (lm["foramen_magnum"] + u(8, 30), lm["vertex"] + u(0, 15)),
        "head_neck": (lm["T1_centre"] - u(0, 25), lm["vertex"] + u(0, 15)),
        # a head CT that runs into the neck and stops anywhere from C3 to C7 (the column ends in a cut vertebra)
        "head_upper_neck": (lm["C3_centre"] + u(0, 1) * (lm["C7_centre"] - lm["C3_centre"]), lm["vertex"] + u(0, 15)),
        "neck": (anat.z_bottom, anat.z_top),
        "neck_chest": (lm["T6_centre"] - u(0, 50), lm["foramen_magnum"] + u(10, 40)),
        "chest": (lm["T12_centre"] - u(0, 40), lm["T2_centre"] - u(8, 25)),
        "abdomen": (lm["L3_centre"] - u(0, 30), lm["T10_centre"] + u(0, 20)),
    }
    lo, hi = ranges[fov]
    dx = _log_uniform(rng, *PIXEL_MM)
    fov_lo, fov_hi = {
        "head": (210, 260),
        "head_upper_neck": (210, 260),
        "neck": (170, 320),
        "chest": (300, 480),
        "abdomen": (300, 480),
    }.get(fov, (220, 480))
    n = int(np.clip(round(float(u(fov_lo, fov_hi)) / dx), 24, 512))
    if n > MAX_MATRIX[size]:
        dx, n = dx * n / MAX_MATRIX[size], MAX_MATRIX[size]
    dz = _log_uniform(rng, *SLICE_MM)
    k = max(8, math.ceil((hi - lo) / dz) + 1)  # ceil: the spacing drawn is an upper bound
    if k > MAX_SLICES[size]:
        k = MAX_SLICES[size]
    dz = round((hi - lo) / (k - 1), 4)
    dx = round(dx, 6)
    cx, cy = (lm["head_x"], lm["head_y"] - 15.0) if fov == "head" else anat.centre_xy
    cx += float(u(-15, 15))
    cy += float(u(-20, 15)) - (60.0 if fov in ("chest", "abdomen") else 0.0)
    fov_mm = n * dx
    origin = (round(cx - fov_mm / 2 + dx / 2, 4), round(cy - fov_mm / 2 + dx / 2, 4), round(hi - (k - 1) * dz, 4))
    return Grid((k, n, n), (dz, dx, dx), origin)


def noise_level(rng: np.random.Generator, grid: Grid) -> tuple[float, float]:
    """(sigma HU, in-plane correlation px): 8-60 HU at 0.7 x 0.7 x 1 mm, scaled by 1 / sqrt(voxel volume)."""
    dz, dy, dx = grid.spacing
    ref = float(rng.uniform(8, 60))
    sigma = float(np.clip(ref * math.sqrt(0.49 / (dx * dy * dz)), 2.0, 150.0))
    return sigma, float(rng.uniform(0.4, 1.6))


def _world_to_index(grid: Grid, p: tuple[float, float, float]) -> tuple[float, float, float]:
    return (
        (p[2] - grid.origin[2]) / grid.spacing[0],
        (p[1] - grid.origin[1]) / grid.spacing[1],
        (p[0] - grid.origin[0]) / grid.spacing[2],
    )


def metal_streaks(hu: np.ndarray, grid: Grid, metal: list[tuple[float, float, float]], rng: np.random.Generator) -> int:
    """Bright and dark radial streaks from each dental metal point through the slices it touches; returns how many
    slices were streaked."""
    if not metal:
        return 0
    _, ny, nx = hu.shape
    dz, _dy, dx = grid.spacing
    rr, cc = np.mgrid[:ny, :nx].astype(np.float32)
    amp = float(rng.uniform(150, 600))
    decay = float(rng.uniform(40, 110)) / dx  # px
    width = max(0.6, 0.4 / dx)
    hit = 0
    for p in metal:
        kz, r0, c0 = _world_to_index(grid, p)
        ks = [k for k in range(math.floor(kz - 3.0 / dz), math.ceil(kz + 3.0 / dz) + 1) if 0 <= k < len(hu)]
        if not ks:
            continue
        angles = rng.uniform(0, math.pi, size=int(rng.integers(6, 16)))
        signs = rng.choice([-1.0, 1.0], size=len(angles))
        dr, dc = rr - np.float32(r0), cc - np.float32(c0)
        dist = np.sqrt(dr * dr + dc * dc)
        pattern = np.zeros((ny, nx), dtype=np.float32)
        for a, sgn in zip(angles, signs, strict=True):
            perp = dr * np.float32(math.cos(a)) - dc * np.float32(math.sin(a))
            pattern += np.float32(sgn) * np.exp(-0.5 * (perp / np.float32(width)) ** 2)
        pattern *= np.float32(amp) * np.exp(-dist / np.float32(decay)) * (dist > 2.0)
        for k in ks:
            hu[k] += pattern * np.float32(math.exp(-abs(k - kz) * dz / 3.0))
            hit += 1
    return hit


def bone_streaks(hu: np.ndarray, grid: Grid, rng: np.random.Generator, threshold: float = 900.0) -> int:
    """A dark band along the line joining dense bone far apart in a slice (skull base, shoulders): the
    beam-hardening shadow between two dense objects. Returns how many slices got one."""
    _, ny, nx = hu.shape
    dx = grid.spacing[2]
    amp = float(rng.uniform(15, 70))
    sigma = float(rng.uniform(3, 9)) / dx
    rr, cc = np.mgrid[:ny, :nx].astype(np.float32)
    hit = 0
    for k in range(len(hu)):
        r, c = np.nonzero(hu[k] > threshold)
        if len(r) < 20:
            continue
        pts = np.stack([r, c], 1).astype(np.float32)
        mean = pts.mean(0)
        d = pts - mean
        _w, v = np.linalg.eigh(d.T @ d / len(d))
        axis = v[:, 1]
        proj = d @ axis
        extent = float(proj.max() - proj.min()) * dx
        if extent < 80.0:
            continue
        perp = (rr - mean[0]) * axis[1] - (cc - mean[1]) * axis[0]
        along = (rr - mean[0]) * axis[0] + (cc - mean[1]) * axis[1]
        inside = np.clip((along - proj.min()) / 5.0, 0, 1) * np.clip((proj.max() - along) / 5.0, 0, 1)
        hu[k] -= np.float32(amp * min(1.0, extent / 200.0)) * np.exp(-0.5 * (perp / np.float32(sigma)) ** 2) * inside
        hit += 1
    return hit


def pad_circle(hu: np.ndarray, tissue: np.ndarray, value: int) -> None:
    """Write ``value`` outside the reconstruction circle (the matrix's inscribed circle), as scanners do."""
    n = hu.shape[1]
    yy, xx = np.mgrid[:n, :n]
    outside = (yy - (n - 1) / 2) ** 2 + (xx - (n - 1) / 2) ** 2 > (n / 2) ** 2
    hu[:, outside] = value
    tissue[:, outside] = 0
