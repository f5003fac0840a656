"""Shape primitives of the phantom: signed-distance-like solids in a local frame, and the frames themselves.

Anatomy is described in patient LPS millimetres (x = left, y = posterior, z = superior) as unions of these
primitives placed in one local frame per bone. Why distances and not voxel masks: a distance gives partial-volume
occupancy for free (``0.5 - d / h``), so thin cortex and 1-pixel fracture lines are anti-aliased at every resolution,
and a cortical shell over cancellous bone is just a second threshold (``d + t``). Every primitive knows its bounding
box, so it is evaluated only there.

Local vertebra frame: u = lateral (patient left), v = posterior, w = along the spine (superior); origin at the
centre of the vertebral body (C1: on the dens axis at the height of the atlas).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FAR = np.float32(1e3)  # distance used outside a primitive's bounding box


# --------------------------------------------------------------------------------------------------------------
# Primitives (local coordinates, mm). Each returns an approximate signed distance (negative inside).
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ellipsoid:
    """Ellipsoid; Inigo Quilez's bound ``k0 (k0 - 1) / k1`` is close to the true distance near the surface."""

    c: tuple[float, float, float]
    r: tuple[float, float, float]

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        c, r = np.asarray(self.c), np.asarray(self.r)
        return c - r, c + r

    def sdf(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        a, b, c = (np.float32(x) for x in self.r)
        pu, pv, pw = u - np.float32(self.c[0]), v - np.float32(self.c[1]), w - np.float32(self.c[2])
        k0 = np.sqrt((pu / a) ** 2 + (pv / b) ** 2 + (pw / c) ** 2)
        k1 = np.sqrt((pu / (a * a)) ** 2 + (pv / (b * b)) ** 2 + (pw / (c * c)) ** 2)
        return k0 * (k0 - 1.0) / np.maximum(k1, np.float32(1e-6))


@dataclass(frozen=True)
class Bar:
    """A segment a->b swept in the (u, v) plane with half-thickness r and half-height hh, its mid-height sliding
    linearly from a's w to b's w. Models plates and rods (pedicles, laminae, spinous and transverse processes,
    arches, ribs, mandible); with a == b in (u, v) it is a vertical cylinder. r and hh taper linearly to r2, hh2.
    """

    a: tuple[float, float, float]
    b: tuple[float, float, float]
    r: float
    hh: float
    r2: float | None = None
    hh2: float | None = None
    round: float = 0.8

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        a, b = np.asarray(self.a), np.asarray(self.b)
        rr = max(self.r, self.r2 or 0.0)
        hh = max(self.hh, self.hh2 or 0.0)
        lo = np.minimum(a, b) - np.array([rr, rr, hh])
        hi = np.maximum(a, b) + np.array([rr, rr, hh])
        return lo, hi

    def sdf(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        au, av, aw = (np.float32(x) for x in self.a)
        bu, bv, bw = (np.float32(x) for x in self.b)
        du, dv = bu - au, bv - av
        ll = du * du + dv * dv
        pu, pv = u - au, v - av
        t = np.clip((pu * du + pv * dv) / ll, 0.0, 1.0) if ll > 1e-9 else np.zeros_like(u)
        ex, ey = pu - t * du, pv - t * dv
        rnd = np.float32(min(self.round, self.r * 0.9, self.hh * 0.9))
        r = np.float32(self.r) + t * np.float32((self.r2 if self.r2 is not None else self.r) - self.r)
        hh = np.float32(self.hh) + t * np.float32((self.hh2 if self.hh2 is not None else self.hh) - self.hh)
        dxy = np.sqrt(ex * ex + ey * ey) - (r - rnd)
        dz = np.abs(w - (aw + t * (bw - aw))) - (hh - rnd)
        out = np.sqrt(np.maximum(dxy, 0.0) ** 2 + np.maximum(dz, 0.0) ** 2)
        return out + np.minimum(np.maximum(dxy, dz), 0.0) - rnd


@dataclass(frozen=True)
class Body:
    """Vertebral body: elliptic cylinder with rounded rims; ``wedge`` mm of height lost at the anterior edge
    (compression fracture), falling linearly to zero at the posterior wall."""

    c: tuple[float, float, float]
    ru: float
    rv: float
    hh: float
    wedge: float = 0.0
    round: float = 1.5

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        c = np.asarray(self.c)
        r = np.array([self.ru, self.rv, self.hh])
        return c - r, c + r

    def sdf(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        rnd = np.float32(self.round)
        a, b = np.float32(self.ru - self.round), np.float32(self.rv - self.round)
        pu, pv, pw = u - np.float32(self.c[0]), v - np.float32(self.c[1]), w - np.float32(self.c[2])
        k0 = np.sqrt((pu / a) ** 2 + (pv / b) ** 2)
        k1 = np.sqrt((pu / (a * a)) ** 2 + (pv / (b * b)) ** 2)
        dxy = k0 * (k0 - 1.0) / np.maximum(k1, np.float32(1e-6))
        hh = np.float32(self.hh) - rnd
        if self.wedge > 0:
            drop = np.float32(self.wedge) * np.clip(0.5 - pv / np.float32(2 * self.rv), 0.0, 1.0)
            mid, half = -drop / 2, hh - drop / 2
            dz = np.abs(pw - mid) - half
        else:
            dz = np.abs(pw) - hh
        out = np.sqrt(np.maximum(dxy, 0.0) ** 2 + np.maximum(dz, 0.0) ** 2)
        return out + np.minimum(np.maximum(dxy, dz), 0.0) - rnd


@dataclass(frozen=True)
class Shell:
    """Ellipsoidal shell of thickness ``th`` below the plane w = ``w_max`` (the skull base seen from below)."""

    c: tuple[float, float, float]
    r: tuple[float, float, float]
    th: float
    w_max: float
    w_min: float | None = None  # optional lower cut (the calvarium of the wide profile)

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        c, r = np.asarray(self.c), np.asarray(self.r) + self.th
        lo, hi = c - r, c + r
        hi[2] = min(hi[2], self.w_max)
        if self.w_min is not None:
            lo[2] = max(lo[2], self.w_min)
        return lo, hi

    def sdf(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        d = Ellipsoid(self.c, self.r).sdf(u, v, w)
        out = np.maximum(np.abs(d) - np.float32(self.th / 2), w - np.float32(self.w_max))
        if self.w_min is not None:
            out = np.maximum(out, np.float32(self.w_min) - w)
        return out


Primitive = Ellipsoid | Bar | Body | Shell


# --------------------------------------------------------------------------------------------------------------
# Frames, parts and fractures
# --------------------------------------------------------------------------------------------------------------


def rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=np.float64)


def rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=np.float64)


def rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float64)


@dataclass(frozen=True)
class Frame:
    """Local -> patient LPS: ``p = centre + R @ local``; R's columns are the u, v, w axes in LPS."""

    centre: np.ndarray
    R: np.ndarray

    def to_world(self, local: Sequence[float]) -> np.ndarray:
        return self.centre + self.R @ np.asarray(local, dtype=np.float64)
