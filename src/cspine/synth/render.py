"""Render an :class:`~cspine.synth.anatomy.Anatomy` on an axial grid: HU, vertebra mask, tissue classes.

The same anatomy rendered at 128 x 128 or 512 x 512 differs only by sampling, which is what makes the small size a
faithful stand-in for the full one. Work goes slab by slab along z so memory stays bounded at full size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from cspine.synth.parts import TISSUES, Anatomy, Part
from cspine.synth.shapes import FAR, Frame

# --------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """Axial sampling grid: voxel (k, r, c) is at LPS (ox + c dx, oy + r dy, oz + k dz), k ascending in z."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # (dz, dy, dx)
    origin: tuple[float, float, float]  # LPS (x, y, z) of voxel (0, 0, 0)

    def axis(self, i: int) -> np.ndarray:
        """World coordinate along z (0), y (1) or x (2) of every index on that axis."""
        o = (self.origin[2], self.origin[1], self.origin[0])[i]
        return (o + np.arange(self.shape[i]) * self.spacing[i]).astype(np.float32)

    @property
    def h(self) -> float:
        """Partial-volume ramp width: geometric mean voxel size."""
        dz, dy, dx = self.spacing
        return float((dz * dy * dx) ** (1.0 / 3.0))

    def index_range(self, lo: np.ndarray, hi: np.ndarray, k0: int, k1: int) -> tuple[slice, slice, slice] | None:
        """Index slices (z, y, x) covering the world box [lo, hi] (LPS x, y, z), z limited to [k0, k1)."""
        out = []
        for i, (ax_lo, ax_hi, lim) in enumerate(
            [(lo[2], hi[2], (k0, k1)), (lo[1], hi[1], (0, self.shape[1])), (lo[0], hi[0], (0, self.shape[2]))]
        ):
            o = (self.origin[2], self.origin[1], self.origin[0])[i]
            d = self.spacing[i]
            a = max(lim[0], math.ceil((ax_lo - o) / d))
            b = min(lim[1], math.floor((ax_hi - o) / d) + 1)
            if b <= a:
                return None
            out.append(slice(a, b))
        return out[0], out[1], out[2]


def _world_bbox(frame: Frame, lo: np.ndarray, hi: np.ndarray, pad: float) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    world = corners @ frame.R.T + frame.centre
    return world.min(0) - pad, world.max(0) + pad


def _occ(d: np.ndarray, h: float) -> np.ndarray:
    """Partial-volume occupancy of the region d < 0 for a voxel of size h."""
    return np.clip(np.float32(0.5) - d * np.float32(1.0 / h), 0.0, 1.0)


@dataclass
class RenderResult:
    hu: np.ndarray  # float32 (z, y, x)
    mask: np.ndarray  # uint8
    tissue: np.ndarray  # uint8, TISSUES codes
    #: per fracture index -> {k: (r0, r1, c0, c1, vr0, vr1, vc0, vc1)}: fracture bbox and its vertebra's bbox
    fracture_slices: dict[int, dict[int, tuple[int, int, int, int, int, int, int, int]]]


def _ellipse_dist(dx: np.ndarray, dy: np.ndarray, rx: np.ndarray, ry: np.ndarray, shrink: float) -> np.ndarray:
    """Approximate signed distance to an ellipse with semi-axes shrunk by ``shrink`` mm (a layer boundary)."""
    f32 = np.float32
    a, b = np.maximum(rx - f32(shrink), f32(0.5)), np.maximum(ry - f32(shrink), f32(0.5))
    k = np.sqrt((dx / a) ** 2 + (dy / b) ** 2)
    return (k - 1.0) * np.minimum(a, b)


def render_tubes(anat: Anatomy, grid: Grid, k0: int, k1: int, hu: np.ndarray, tissue: np.ndarray) -> None:
    """Paint the slice-wise structures (neck outline with fat layer, airway, vessels, canal ...) into hu[k0:k1]."""
    zs = grid.axis(0)[k0:k1]
    ys = grid.axis(1)
    xs = grid.axis(2)
    h = float(min(grid.spacing[1], grid.spacing[2]))
    for t in anat.tubes:
        sel = (zs >= t.z_range[0]) & (zs <= t.z_range[1])
        if not sel.any():
            continue
        ks = np.nonzero(sel)[0]
        ka, kb = int(ks[0]), int(ks[-1]) + 1
        z = zs[ka:kb]
        cx, cy = np.interp(z, t.z, t.cx), np.interp(z, t.z, t.cy)
        rx, ryf, ryb = np.interp(z, t.z, t.rx), np.interp(z, t.z, t.ry_front), np.interp(z, t.z, t.ry_back)
        # bounding box over these slices
        xlo, xhi = float((cx - rx).min()) - 2 * h, float((cx + rx).max()) + 2 * h
        ylo, yhi = float((cy - ryf).min()) - 2 * h, float((cy + ryb).max()) + 2 * h
        ca = max(0, math.ceil((xlo - xs[0]) / grid.spacing[2]))
        cb = min(len(xs), math.floor((xhi - xs[0]) / grid.spacing[2]) + 1)
        ra = max(0, math.ceil((ylo - ys[0]) / grid.spacing[1]))
        rb = min(len(ys), math.floor((yhi - ys[0]) / grid.spacing[1]) + 1)
        if cb <= ca or rb <= ra:
            continue
        X = xs[None, None, ca:cb]
        Y = ys[None, ra:rb, None]
        f32 = np.float32
        cx3, cy3 = cx.astype(f32)[:, None, None], cy.astype(f32)[:, None, None]
        rx3 = rx.astype(f32)[:, None, None]
        ry3f, ry3b = ryf.astype(f32)[:, None, None], ryb.astype(f32)[:, None, None]
        dx_, dy_ = X - cx3, Y - cy3
        ry3 = np.where(dy_ < 0, ry3f, ry3b)
        view = hu[k0 + ka : k0 + kb, ra:rb, ca:cb]
        tview = tissue[k0 + ka : k0 + kb, ra:rb, ca:cb]

        o = _occ(_ellipse_dist(dx_, dy_, rx3, ry3, 0.0), h)
        if t.inner is None:
            view += o * (f32(t.hu) - view)
            tview[o > 0.5] = t.tissue
        else:
            oi = _occ(_ellipse_dist(dx_, dy_, rx3, ry3, t.inner[0]), h)
            view *= 1.0 - o
            view += (o - oi) * f32(t.hu) + oi * f32(t.inner[1])
            tview[o > 0.5] = t.tissue
            tview[oi > 0.5] = t.inner_tissue


def render_part(
    part: Part,
    grid: Grid,
    k0: int,
    k1: int,
    hu: np.ndarray,
    mask: np.ndarray,
    tissue: np.ndarray,
    fx_slices: dict[int, dict[int, tuple[int, int, int, int, int, int, int, int]]],
    fx_offset: int,
) -> None:
    """Paint one bony part into hu/mask for slices [k0, k1); record per-slice fracture boxes."""
    h = grid.h
    pad = 1.5 * h + part.cortical_mm
    shift_pad = max((float(np.linalg.norm(f.shift)) for f in part.fractures), default=0.0)
    boxes = []
    for p in part.prims:
        lo, hi = p.bbox()
        boxes.append(_world_bbox(part.frame, lo, hi, pad + shift_pad))
    lo = np.min([b[0] for b in boxes], axis=0)
    hi = np.max([b[1] for b in boxes], axis=0)
    rng_ = grid.index_range(lo, hi, k0, k1)
    if rng_ is None:
        return
    sz, sy, sx = rng_
    Z = grid.axis(0)[sz][:, None, None] - np.float32(part.frame.centre[2])
    Y = grid.axis(1)[sy][None, :, None] - np.float32(part.frame.centre[1])
    X = grid.axis(2)[sx][None, None, :] - np.float32(part.frame.centre[0])
    R = part.frame.R.astype(np.float32)
    # local = R^T (p - c): u = R[:,0] . (p - c) etc.
    U = R[0, 0] * X + R[1, 0] * Y + R[2, 0] * Z
    V = R[0, 1] * X + R[1, 1] * Y + R[2, 1] * Z
    W = R[0, 2] * X + R[1, 2] * Y + R[2, 2] * Z
    U0, V0, W0 = U, V, W
    for f in part.fractures:
        if any(f.shift):
            side = (
                (U0 - f.point[0]) * f.normal[0] + (V0 - f.point[1]) * f.normal[1] + (W0 - f.point[2]) * f.normal[2]
            ) > 0
            U = U - np.float32(f.shift[0]) * side
            V = V - np.float32(f.shift[1]) * side
            W = W - np.float32(f.shift[2]) * side
    d = np.full(U.shape, FAR, dtype=np.float32)
    base = (sz.start, sy.start, sx.start)

    def sub(b: tuple[np.ndarray, np.ndarray]) -> tuple[slice, slice, slice] | None:
        r = grid.index_range(b[0], b[1], sz.start, sz.stop)
        if r is None:
            return None
        return tuple(slice(s.start - o, s.stop - o) for s, o in zip(r, base, strict=True))  # type: ignore[return-value]

    for p, b in zip(part.prims, boxes, strict=True):
        ix = sub(b)
        if ix is None:
            continue
        np.minimum(d[ix], p.sdf(U[ix], V[ix], W[ix]), out=d[ix])
    for p in part.holes:
        lo_h, hi_h = p.bbox()
        ix = sub(_world_bbox(part.frame, lo_h, hi_h, pad + shift_pad))
        if ix is None:
            continue
        np.maximum(d[ix], -p.sdf(U[ix], V[ix], W[ix]), out=d[ix])
    o_out = _occ(d, h)
    if not o_out.any():
        return
    o_in = _occ(d + np.float32(part.cortical_mm), h)
    bone = (o_out - o_in) * np.float32(part.cortical_hu) + o_in * np.float32(part.cancellous_hu)
    fill = np.zeros_like(o_out)
    inside = d < 0
    tview = tissue[sz, sy, sx]
    if part.tissue >= 0:
        tview[o_out > 0.5] = part.tissue
    else:
        tview[o_out > 0.5] = TISSUES["cortical"]
        tview[o_in > 0.5] = TISSUES["cancellous"]
    for j, f in enumerate(part.fractures):
        n = np.asarray(f.normal, dtype=np.float32)
        pu, pv, pw = U0 - f.point[0], V0 - f.point[1], W0 - f.point[2]
        sdist = pu * n[0] + pv * n[1] + pw * n[2]
        radial = np.sqrt(np.maximum((pu * pu + pv * pv + pw * pw) - sdist * sdist, 0.0))
        o_line = _occ(np.abs(sdist) - np.float32(f.width / 2), h) * _occ(radial - np.float32(f.radius), h)
        if f.dense_hu:
            bone += o_in * o_line * np.float32(f.dense_hu)
        else:
            bone *= 1.0 - o_line
            fill += o_out * o_line * np.float32(f.fill_hu)
        fmask = inside & (o_line > 0.5)
        tview[fmask] = TISSUES["fracture"]
        rec = fx_slices.setdefault(fx_offset + j, {})
        zs_hit = np.nonzero(fmask.any(axis=(1, 2)))[0]
        for kz in zs_hit:
            sl = fmask[kz]
            rows = np.nonzero(sl.any(axis=1))[0]
            cols = np.nonzero(sl.any(axis=0))[0]
            vsl = inside[kz]
            vrows = np.nonzero(vsl.any(axis=1))[0]
            vcols = np.nonzero(vsl.any(axis=0))[0]
            rec[int(kz + sz.start)] = (
                int(rows[0] + sy.start),
                int(rows[-1] + sy.start),
                int(cols[0] + sx.start),
                int(cols[-1] + sx.start),
                int(vrows[0] + sy.start),
                int(vrows[-1] + sy.start),
                int(vcols[0] + sx.start),
                int(vcols[-1] + sx.start),
            )
    view = hu[sz, sy, sx]
    view *= 1.0 - o_out
    view += bone + fill
    if part.label:
        mask[sz, sy, sx][inside] = part.label


def render(
    anat: Anatomy,
    grid: Grid,
    noise_sigma: float,
    noise_rng: np.random.Generator,
    slab: int = 48,
    noise_corr: float | None = None,
) -> RenderResult:
    """Render the anatomy on ``grid`` (float32 HU before quantisation, uint8 mask, fracture slices).

    Works slab by slab along z so that memory stays bounded at full size; noise is drawn slab after slab from
    ``noise_rng`` so the result depends only on the seed, and it is spatially correlated like CT noise.
    """
    nz, _ny, _nx = grid.shape
    hu = np.empty(grid.shape, dtype=np.float32)
    mask = np.zeros(grid.shape, dtype=np.uint8)
    tissue = np.zeros(grid.shape, dtype=np.uint8)
    fx: dict[int, dict[int, tuple[int, int, int, int, int, int, int, int]]] = {}
    offsets = []
    n = 0
    for part in anat.parts:
        offsets.append(n)
        n += len(part.fractures)
    # Sigma of the smoothed noise shrinks by the filter; rescale. The default (0.7 px) keeps its continuous
    # approximation (its output is fixed); other correlations use the exact gain of the sampled kernel.
    corr = 0.7 if noise_corr is None else noise_corr
    if noise_corr is None:
        gain = 1.0 / math.sqrt(1.0 / (4.0 * math.pi * corr * corr))
    else:
        delta = np.zeros((1, 15, 15), dtype=np.float32)
        delta[0, 7, 7] = 1.0
        gain = 1.0 / math.sqrt(float((gaussian_filter(delta, sigma=(0.0, corr, corr), mode="wrap") ** 2).sum()))
    for k0 in range(0, nz, slab):
        k1 = min(nz, k0 + slab)
        view = hu[k0:k1]
        view.fill(np.float32(anat.air_hu))
        render_tubes(anat, grid, k0, k1, hu, tissue)
        for part, off in zip(anat.parts, offsets, strict=True):
            render_part(part, grid, k0, k1, hu, mask, tissue, fx, off)
        if noise_sigma > 0:
            noise = noise_rng.standard_normal(view.shape, dtype=np.float32)
            noise = gaussian_filter(noise, sigma=(0.0, corr, corr), mode="wrap")
            view += noise * np.float32(noise_sigma * gain)
    return RenderResult(hu=hu, mask=mask, tissue=tissue, fracture_slices=fx)
