"""Fracture geometry: one :class:`Fracture` per fractured level, drawn in its vertebra's local frame.

Which levels break and of which kind is decided by :mod:`cspine.synth.sampling`; this module only says where the
line runs, how wide it is, what fills it and how far the fragment moved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cspine.synth.vertebrae import CANAL_HALF, LEVELS, canal_v


@dataclass(frozen=True)
class Fracture:
    """One fracture, in its vertebra's local frame.

    The fracture is a slab |(p - point) . normal| < width / 2 limited to a disc of ``radius`` around ``point``;
    inside bone it is filled with ``fill_hu`` (hematoma / partial filling; subtle lines are filled higher), or,
    for an impaction band, made denser by ``dense_hu``. The fragment on the positive side of the plane is shifted
    by ``shift`` mm (displacement; zero for undisplaced lines). ``wedge`` (mm) is anterior height loss of the body.
    """

    vertebra: str
    kind: str  # "body_line" | "wedge" | "posterior" | "dens" | "ring"
    subtle: bool
    point: tuple[float, float, float]
    normal: tuple[float, float, float]
    width: float
    radius: float
    fill_hu: float = 60.0
    dense_hu: float = 0.0
    shift: tuple[float, float, float] = (0.0, 0.0, 0.0)
    wedge: float = 0.0
    location: str = ""

    def describe(self) -> dict[str, object]:
        """Plain-data description (for manifests, tests and plots)."""
        return {
            "vertebra": self.vertebra,
            "kind": self.kind,
            "subtle": self.subtle,
            "location": self.location,
            "width_mm": round(self.width, 2),
            "displacement_mm": round(float(np.linalg.norm(self.shift)), 2),
            "wedge_mm": round(self.wedge, 2),
        }


def _unit(v: Sequence[float]) -> tuple[float, float, float]:
    a = np.asarray(v, dtype=np.float64)
    a = a / np.linalg.norm(a)
    return (float(a[0]), float(a[1]), float(a[2]))


def _tangent(rng: np.random.Generator, n: Sequence[float]) -> np.ndarray:
    """A random unit vector perpendicular to n (shear direction of a displaced fragment)."""
    n_ = np.asarray(n, dtype=np.float64)
    v = rng.normal(size=3)
    v -= (v @ n_) * n_
    return v / np.linalg.norm(v)


def make_fracture(rng: np.random.Generator, vertebra: str, kind: str, subtle: bool, s: float, h: float) -> Fracture:
    """Geometry of one fracture in its vertebra's local frame.

    ``h`` is the finest voxel size the study may be sampled at; a subtle line is as wide as that (1 pixel), an
    obvious one 2.5-4.5 mm, so both remain visible after sampling (2+ pixels even at the small size).
    A subtle line is filled at 60-150 HU (hematoma and partial volume): darker than cancellous bone (~130-380 HU),
    so a reader can see it (filled like the bone around it, a line inside the body shows only its cortical break).
    """
    width = max(h, 0.45) if subtle else float(rng.uniform(2.5, 4.5))
    fill = float(rng.uniform(60, 150)) if subtle else float(rng.uniform(30, 80))
    if kind == "ring":  # C1: break through the anterior or posterior arch
        ant = bool(rng.random() < 0.5)
        side = float(rng.choice([-1.0, 1.0]))
        if ant:
            p, q = np.array([side * 11.0, -3.5]), np.array([side * 6.5, -8.5])
        else:
            p, q = np.array([side * 12.5, 19.0]), np.array([side * 8.0, 27.5])
        t = float(rng.uniform(0.2, 0.8))
        pt = (p + t * (q - p)) * s
        tang = q - p
        normal = _unit((tang[0], tang[1], rng.uniform(-0.3, 0.3)))
        return Fracture(
            vertebra,
            kind,
            subtle,
            (float(pt[0]), float(pt[1]), 0.0),
            normal,
            width,
            7.0 * s,
            fill,
            location=("anterior" if ant else "posterior") + " arch",
        )
    ru, rv, hh, sp_len, _ = (x * s for x in LEVELS[vertebra])
    if kind == "dens":
        w = hh + float(rng.uniform(2.6, 4.0)) * s
        normal = _unit((rng.uniform(-0.2, 0.2), rng.uniform(-0.3, 0.3), 1.0))
        shift = (0.0, 0.0, 0.0)
        if not subtle:
            shift = tuple(float(x) for x in _tangent(rng, normal) * rng.uniform(2.0, 4.0))
        return Fracture(
            vertebra, kind, subtle, (0.0, -1.5 * s, w), normal, width, 8.0 * s, fill, shift=shift, location="dens base"
        )  # type: ignore[arg-type]
    if kind == "wedge":
        frac = float(rng.uniform(0.12, 0.2) if subtle else rng.uniform(0.25, 0.45))
        wedge = frac * 2 * hh
        pt = (0.0, -0.25 * rv, hh - wedge * 0.6 - 2.0 * s)
        normal = _unit((0.0, 0.25 + 0.5 * frac, 1.0))
        return Fracture(
            vertebra,
            kind,
            subtle,
            pt,
            normal,
            float(rng.uniform(1.8, 3.0)),
            rv * 1.1,
            fill,
            dense_hu=float(rng.uniform(150, 300)),
            wedge=wedge,
            location="superior endplate",
        )
    if kind == "body_line":
        theta = rng.uniform(0, np.pi)
        normal = _unit((math.cos(theta), math.sin(theta), rng.uniform(-0.6, 0.6)))
        if subtle:  # incomplete line reaching the cortex from inside
            ang = rng.uniform(0, 2 * np.pi)
            pt = (0.6 * ru * math.cos(ang), 0.6 * rv * math.sin(ang), float(rng.uniform(-0.4, 0.4)) * hh)
            return Fracture(
                vertebra, kind, subtle, pt, normal, width, float(rng.uniform(0.5, 0.8)) * rv, fill, location="body"
            )
        pt = (
            float(rng.uniform(-0.3, 0.3)) * ru,
            float(rng.uniform(-0.3, 0.3)) * rv,
            float(rng.uniform(-0.3, 0.3)) * hh,
        )
        shift = (0.0, 0.0, 0.0)
        if rng.random() < 0.8:
            shift = tuple(float(x) for x in _tangent(rng, normal) * rng.uniform(2.0, 4.0))
        return Fracture(
            vertebra,
            kind,
            subtle,
            pt,
            normal,
            width,
            2.5 * max(ru, rv),
            fill,
            shift=shift,  # type: ignore[arg-type]
            location="body",
        )
    # posterior elements
    vc = canal_v(vertebra, s)
    px = s * CANAL_HALF[0] * (0.85 if vertebra.startswith("T") else 1.0) + 4.2 * s
    side = float(rng.choice([-1.0, 1.0]))
    elem = str(rng.choice(["lamina", "pedicle", "spinous"], p=[0.45, 0.3, 0.25]))
    if elem == "lamina":
        a = np.array([side * (px - 1.5 * s), vc + 3.0 * s, -0.5 * s])
        b = np.array([side * 1.0 * s, vc + 11.5 * s, -2.0 * s])
    elif elem == "pedicle":
        a = np.array([side * (ru - 2.2 * s), rv - 2.0 * s, 0.8 * s])
        b = np.array([side * px, vc - 1.0 * s, 0.8 * s])
    else:
        ang = math.radians(25.0)
        a = np.array([0.0, vc + 10.5 * s, -2.0 * s])
        b = a + np.array([0.0, sp_len * math.cos(ang), -sp_len * math.sin(ang)])
    t = float(rng.uniform(0.35, 0.65)) if elem != "spinous" else float(rng.uniform(0.2, 0.6))
    pt = a + t * (b - a)
    axis = (b - a) / np.linalg.norm(b - a)
    normal = _unit(axis + rng.normal(scale=0.25, size=3))
    loc = elem if elem == "spinous" else f"{'left' if side > 0 else 'right'} {elem}"
    shift = (0.0, 0.0, 0.0) if subtle else tuple(float(x) for x in _tangent(rng, normal) * rng.uniform(1.5, 3.0))
    return Fracture(
        vertebra,
        "posterior",
        subtle,
        (float(pt[0]), float(pt[1]), float(pt[2])),
        normal,
        width,
        7.0 * s,
        fill,
        shift=shift,  # type: ignore[arg-type]
        location=loc,
    )
