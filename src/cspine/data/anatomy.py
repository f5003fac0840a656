"""Analytic neck phantom for the synthetic RSNA generator: shapes in patient millimetres, rendered on any grid.

The anatomy is described once, in patient LPS coordinates (x = left, y = posterior, z = superior, mm), as
signed-distance-like primitives (ellipsoids, extruded bars, elliptic cylinders) placed in one local frame per
vertebra along a lordotic curve. A study is then *sampled* on a grid: the same anatomy rendered at 128 x 128
or 512 x 512 differs only by sampling, which is what makes the small size a faithful stand-in for the full one.

Why distances and not voxel masks: a distance gives partial-volume occupancy for free (``0.5 - d / h``), so thin
cortex and 1-pixel fracture lines are anti-aliased at every resolution, and a cortical shell over cancellous bone is
just a second threshold (``d + t``). Every primitive is evaluated only inside its own bounding box, so a full-size
study costs seconds, not minutes.

Local vertebra frame: u = lateral (patient left), v = posterior, w = along the spine (superior); origin at the
centre of the vertebral body (C1: on the dens axis at the height of the atlas).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter

from cspine.labels import LABEL_VALUES

FAR = np.float32(1e3)  # distance used outside a primitive's bounding box

#: Tissue classes of the phantom (the ``tissue`` map of a rendered study): ground truth for HU checks.
TISSUES: dict[str, int] = {
    "air": 0,
    "fat": 1,
    "soft": 2,
    "airway": 3,
    "canal": 4,
    "vessel": 5,
    "disc": 6,
    "cortical": 7,
    "cancellous": 8,
    "fracture": 9,
}

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

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        c, r = np.asarray(self.c), np.asarray(self.r) + self.th
        lo, hi = c - r, c + r
        hi[2] = min(hi[2], self.w_max)
        return lo, hi

    def sdf(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        d = Ellipsoid(self.c, self.r).sdf(u, v, w)
        return np.maximum(np.abs(d) - np.float32(self.th / 2), w - np.float32(self.w_max))


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


@dataclass
class Part:
    """A rigid bony (or disc) structure: union of primitives minus holes, in one frame.

    ``label`` is the mask value written where the part is (0 = not written: skull, mandible, ribs, discs).
    Material: cortical shell ``cortical_mm`` thick at ``cortical_hu`` over ``cancellous_hu``.
    """

    name: str
    frame: Frame
    prims: list[Primitive]
    holes: list[Primitive] = field(default_factory=list)
    label: int = 0
    cortical_hu: float = 1200.0
    cancellous_hu: float = 300.0
    cortical_mm: float = 1.2
    fractures: list[Fracture] = field(default_factory=list)
    tissue: int = -1  # -1: bone (cortical / cancellous); otherwise one class for the whole part (discs)


@dataclass
class Tube:
    """A structure drawn slice by slice: an ellipse whose centre and radii are interpolated along z.

    ``ry_front``/``ry_back`` are the anterior/posterior semi-axes (an egg shape for the neck outline).
    ``inner`` optionally gives (shrink_mm, hu): a second layer (e.g. muscle inside the subcutaneous fat).
    """

    name: str
    z: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    rx: np.ndarray
    ry_front: np.ndarray
    ry_back: np.ndarray
    hu: float
    inner: tuple[float, float] | None = None
    z_range: tuple[float, float] = (-1e9, 1e9)
    tissue: int = TISSUES["soft"]
    inner_tissue: int = TISSUES["soft"]


@dataclass
class Anatomy:
    """Everything needed to render one study on any grid."""

    tubes: list[Tube]
    parts: list[Part]
    air_hu: float
    z_top: float  # suggested scan range (LPS z, mm)
    z_bottom: float
    centre_xy: tuple[float, float]
    params: dict[str, float]


# --------------------------------------------------------------------------------------------------------------
# Vertebra shapes
# --------------------------------------------------------------------------------------------------------------

#: Body half-width (u), half-depth (v), half-height (w), spinous length, transverse-process reach (mm, adult mean).
LEVELS: dict[str, tuple[float, float, float, float, float]] = {
    "C2": (8.5, 8.0, 8.0, 22.0, 22.0),
    "C3": (8.0, 7.5, 6.5, 14.0, 23.0),
    "C4": (8.5, 7.7, 6.5, 15.0, 24.0),
    "C5": (9.0, 7.9, 6.6, 16.5, 25.0),
    "C6": (9.6, 8.2, 6.8, 19.0, 26.0),
    "C7": (10.5, 8.5, 7.2, 30.0, 29.0),
    "T1": (12.0, 9.0, 8.2, 34.0, 32.0),
    "T2": (12.8, 9.8, 8.8, 35.0, 31.0),
}
CANAL_HALF = (12.0, 7.5)  # canal half-width, half-depth (cervical)


def canal_v(name: str, s: float) -> float:
    """v of the canal centre behind the body centre (local mm)."""
    _, rv, _, _, _ = LEVELS[name]
    half_depth = CANAL_HALF[1] * (0.93 if name.startswith("T") else 1.0)
    return s * (rv + half_depth + 0.6)


def subaxial(
    name: str, s: float, osteophytes: Sequence[tuple[float, float]] = (), wedge: float = 0.0
) -> tuple[list[Primitive], list[Primitive]]:
    """C3-T2: body, uncinate lips, pedicles, articular pillars, laminae, spinous and transverse processes."""
    ru, rv, hh, sp_len, tp = (x * s for x in LEVELS[name])
    thoracic = name.startswith("T")
    vc = canal_v(name, s)
    cx = s * CANAL_HALF[0] * (0.85 if thoracic else 1.0)
    px = cx + 4.2 * s  # pillar centre u
    prims: list[Primitive] = [Body((0.0, 0.0, 0.0), ru, rv, hh, wedge=wedge)]
    holes: list[Primitive] = []
    for side in (-1.0, 1.0):
        if not thoracic:  # uncinate processes: the cervical body's raised lateral lips
            prims.append(
                Bar(
                    (side * (ru - 1.6 * s), -rv * 0.4, hh),
                    (side * (ru - 1.6 * s), rv * 0.4, hh),
                    1.4 * s,
                    1.6 * s,
                    round=0.6,
                )
            )
        # pedicle: posterolateral corner of the body to the pillar
        prims.append(
            Bar(
                (side * (ru - 2.2 * s), rv - 2.0 * s, 0.8 * s),
                (side * px, vc - 1.0 * s, 0.8 * s),
                2.4 * s,
                3.6 * s,
                round=1.0,
            )
        )
        # articular pillar, slanting down posteriorly like the facet joints
        prims.append(
            Bar(
                (side * px, vc - 3.5 * s, 1.4 * s),
                (side * px, vc + 3.5 * s, -1.4 * s),
                4.6 * s,
                hh + 0.3 * s,
                round=1.6,
            )
        )
        # lamina: pillar to the midline, sloping down posteriorly
        prims.append(
            Bar(
                (side * (px - 1.5 * s), vc + 3.0 * s, -0.5 * s),
                (side * 1.0 * s, vc + 11.5 * s, -2.0 * s),
                1.8 * s,
                hh - 1.2 * s,
                round=0.9,
            )
        )
        # transverse process: anterior root from the body, posterior root from the pillar, foramen between
        tip = (side * tp, (4.0 if not thoracic else 10.0) * s, -1.0 * s)
        if thoracic:
            prims.append(Bar((side * (px - 1.0 * s), vc - 1.0 * s, 0.0), tip, 4.2 * s, 3.6 * s, r2=3.2 * s, round=1.2))
        else:
            prims.append(Bar((side * (ru - 1.0 * s), 0.5 * s, 0.0), tip, 2.6 * s, 2.6 * s, round=1.0))
            prims.append(Bar((side * (px - 1.0 * s), vc - 3.0 * s, 0.0), tip, 2.4 * s, 2.6 * s, round=1.0))
            fr = (2.2 if name == "C7" else 2.9) * s
            holes.append(
                Bar(
                    (side * (ru + 5.2 * s), 3.2 * s, 0.0), (side * (ru + 5.2 * s), 3.2 * s, 0.0), fr, 6.0 * s, round=0.5
                )
            )
    # spinous process from the laminar junction, descending posteriorly; bifid tips C2-C6
    top = (0.0, vc + 10.5 * s, -2.0 * s)
    ang = math.radians(35.0 if thoracic else 22.0 if name == "C7" else 25.0)
    end = (0.0, top[1] + sp_len * math.cos(ang), top[2] - sp_len * math.sin(ang))
    prims.append(Bar(top, end, 2.3 * s, 3.8 * s, r2=1.9 * s, hh2=3.0 * s, round=1.0))
    if name in ("C3", "C4", "C5", "C6"):
        for side in (-1.0, 1.0):
            prims.append(Ellipsoid((side * 2.6 * s, end[1], end[2]), (2.6 * s, 2.8 * s, 3.2 * s)))
    else:  # C7/T1/T2: a knobbed tip (C7 = vertebra prominens)
        prims.append(Ellipsoid((0.0, end[1], end[2]), (3.0 * s, 3.2 * s, 3.6 * s)))
    for du, dw in osteophytes:  # anterior rim spurs of the body (degenerative)
        prims.append(Ellipsoid((du * ru * 0.5, -rv + 0.6 * s, dw * (hh - 0.5 * s)), (3.5 * s, 2.2 * s, 1.8 * s)))
    return prims, holes


def axis_c2(
    s: float,
    osteophytes: Sequence[tuple[float, float]] = (),
    wedge: float = 0.0,
    dens_shift: tuple[float, float, float] | None = None,
) -> tuple[list[Primitive], list[Primitive], float]:
    """C2: body, dens rising into the atlas, superior facets, pedicles, laminae, large bifid spinous process.

    Returns (prims, holes, dens_top_w)."""
    prims, holes = subaxial("C2", s, osteophytes, wedge)
    _ru, _rv, hh, _, _ = (x * s for x in LEVELS["C2"])
    dens_h = 16.0 * s
    prims.append(
        Bar(
            (0.0, -1.5 * s, hh + dens_h / 2 - 1.0 * s),
            (0.0, -1.5 * s, hh + dens_h / 2 - 1.0 * s),
            4.7 * s,
            dens_h / 2 + 1.0 * s,
            round=3.5 * s,
        )
    )
    for side in (-1.0, 1.0):  # superior articular facets (large, lateral to the dens)
        prims.append(Ellipsoid((side * 12.5 * s, 2.5 * s, hh - 2.5 * s), (7.0 * s, 8.0 * s, 4.5 * s)))
    # heavier laminae + spinous
    vc = canal_v("C2", s)
    prims.append(Bar((0.0, vc + 10.0 * s, -2.0 * s), (0.0, vc + 24.0 * s, -8.0 * s), 3.4 * s, 5.2 * s, round=1.2))
    return prims, holes, hh + dens_h


def atlas_c1(s: float) -> tuple[list[Primitive], list[Primitive]]:
    """C1: a ring with two lateral masses and no body; anterior arch in front of the dens, posterior arch
    around the canal, long transverse processes with foramina. Origin on the dens axis."""
    prims: list[Primitive] = []
    holes: list[Primitive] = []
    prims.append(Ellipsoid((0.0, -10.3 * s, 0.0), (4.2 * s, 2.8 * s, 5.2 * s)))  # anterior tubercle
    prims.append(Ellipsoid((0.0, 31.0 * s, -1.0 * s), (4.0 * s, 3.5 * s, 4.8 * s)))  # posterior tubercle
    for side in (-1.0, 1.0):
        prims.append(Ellipsoid((side * 13.0 * s, 3.5 * s, 0.0), (6.5 * s, 9.5 * s, 6.5 * s)))  # lateral mass
        pts_a = [(side * 11.0, -3.5), (side * 6.5, -8.5), (0.0, -10.0)]
        for p, q in itertools.pairwise(pts_a):  # anterior arch
            prims.append(Bar((p[0] * s, p[1] * s, 0.0), (q[0] * s, q[1] * s, 0.0), 2.4 * s, 4.2 * s, round=1.0))
        pts_p = [(side * 12.0, 10.0), (side * 12.5, 19.0), (side * 8.0, 27.5), (0.0, 30.0)]
        for p, q in itertools.pairwise(pts_p):  # posterior arch
            prims.append(
                Bar((p[0] * s, p[1] * s, -0.5 * s), (q[0] * s, q[1] * s, -1.0 * s), 2.6 * s, 3.4 * s, round=1.0)
            )
        prims.append(
            Bar(
                (side * 17.0 * s, 3.5 * s, 0.0),
                (side * 33.0 * s, 4.5 * s, 0.0),
                4.2 * s,
                3.8 * s,
                r2=3.4 * s,
                round=1.5,
            )
        )  # transverse process
        holes.append(Bar((side * 22.5 * s, 3.6 * s, 0.0), (side * 22.5 * s, 3.6 * s, 0.0), 2.8 * s, 6.0 * s, round=0.5))
    return prims, holes


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
    anat: Anatomy, grid: Grid, noise_sigma: float, noise_rng: np.random.Generator, slab: int = 48
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
    # Sigma of the smoothed noise shrinks by the filter; measure once and rescale.
    corr = 0.7
    gain = 1.0 / math.sqrt(1.0 / (4.0 * math.pi * corr * corr))
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


# --------------------------------------------------------------------------------------------------------------
# Building a study's anatomy
# --------------------------------------------------------------------------------------------------------------

SPINE_ORDER: tuple[str, ...] = ("T2", "T1", "C7", "C6", "C5", "C4", "C3", "C2")  # built bottom-up
DISCS = {"T2": 4.2, "T1": 4.8, "C7": 5.0, "C6": 5.4, "C5": 5.5, "C4": 5.2, "C3": 4.8}  # disc above each level, mm


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
    so a reader can see it. It used to be filled at 150-320 HU, the same as the bone around it, which made 40 % of
    the fractures invisible inside the body (only their cortical break showed) and capped any classifier.
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


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def build_anatomy(
    rng: np.random.Generator, fracture_plan: Sequence[tuple[str, str, bool]], fx_rng: np.random.Generator, h_min: float
) -> Anatomy:
    """Sample one patient: spine curve, vertebrae, degenerative changes, soft tissues and the planned fractures.

    ``fracture_plan`` lists (vertebra, kind, subtle); the geometry of each is drawn from ``fx_rng`` so that the
    anatomy stream does not depend on the labels (a fractured and an intact study share the same distribution
    of everything else).
    """
    deg = np.degrees
    rad = math.radians
    s = float(np.clip(rng.normal(1.0, 0.06), 0.86, 1.16))
    habitus = float(rng.uniform(0.88, 1.25))
    age = float(rng.beta(2.0, 2.0))  # drives degeneration, independent of fractures
    phi_bottom = rad(rng.uniform(8, 24))
    lordosis = rad(rng.uniform(-5, 42))
    yaw, roll = rad(rng.normal(0, 3.0)), rad(rng.normal(0, 2.5))
    cancellous = float(rng.uniform(230, 380) * (1.0 - 0.45 * age * rng.uniform(0.3, 1.0)))
    cortical = float(rng.uniform(1050, 1500) * (1.0 - 0.12 * age))
    cortical_mm = float(rng.uniform(0.5, 0.9)) * s
    disc_hu = float(rng.uniform(70, 100))
    params = {
        "scale": s,
        "habitus": habitus,
        "age": age,
        "lordosis_deg": float(deg(lordosis)),
        "yaw_deg": float(deg(yaw)),
        "roll_deg": float(deg(roll)),
        "cancellous_hu": cancellous,
        "cortical_hu": cortical,
    }

    # ---- spine chain, bottom-up in a neck frame
    n = len(SPINE_ORDER)
    phis = [phi_bottom - lordosis * i / (n - 1) for i in range(n)]
    frames: dict[str, Frame] = {}
    centre = np.zeros(3)
    prev = None
    for i, name in enumerate(SPINE_ORDER):
        R = rot_x(phis[i]) @ rot_z(rad(rng.normal(0, 1.5))) @ rot_y(rad(rng.normal(0, 1.0)))
        hh = LEVELS[name][2] * s
        if prev is not None:
            pname, pR = prev
            phh = LEVELS[pname][2] * s
            disc = DISCS[pname] * s * (1.0 - 0.45 * age * rng.uniform(0, 1))
            centre = centre + pR[:, 2] * phh + (pR[:, 2] + R[:, 2]) / 2 * disc + R[:, 2] * hh
        frames[name] = Frame(centre.copy(), R)
        prev = (name, R)
    c2 = frames["C2"]
    hh2 = LEVELS["C2"][2] * s
    R1 = c2.R @ rot_x(rad(rng.uniform(-6, 6))) @ rot_z(rad(rng.normal(0, 2.0)))
    frames["C1"] = Frame(c2.to_world((0.0, -1.5 * s, hh2 + 11.0 * s)), R1)
    Rs = R1 @ rot_x(rad(rng.uniform(-10, 8)))
    skull = Frame(frames["C1"].centre, Rs)
    # global pose: rotate about C5 and place in the scanner
    Rg = rot_z(yaw) @ rot_y(roll)
    pivot = frames["C5"].centre.copy()
    place = np.array([rng.uniform(-12, 12), rng.uniform(-40, 40), rng.uniform(-350, 50)])

    def pose(f: Frame) -> Frame:
        return Frame(Rg @ (f.centre - pivot) + place, Rg @ f.R)

    frames = {k: pose(f) for k, f in frames.items()}
    skull = pose(skull)

    # ---- fractures (local geometry)
    by_level: dict[str, list[Fracture]] = {}
    for vert, kind, subtle in fracture_plan:
        by_level.setdefault(vert, []).append(make_fracture(fx_rng, vert, kind, subtle, s, h_min))

    # ---- degenerative changes: anterior osteophytes at random subaxial levels
    osteo: dict[str, list[tuple[float, float]]] = {}
    for _ in range(int(rng.poisson(5.0 * age))):
        lvl = str(rng.choice(["C3", "C4", "C5", "C6", "C7"], p=[0.1, 0.2, 0.3, 0.25, 0.15]))
        osteo.setdefault(lvl, []).append((float(rng.uniform(-1, 1)), float(rng.choice([-1.0, 1.0]))))
    params["osteophytes"] = float(sum(len(v) for v in osteo.values()))

    def bone(
        name: str, frame: Frame, prims: list[Primitive], holes: list[Primitive], label: int, dens: float = 1.0
    ) -> Part:
        return Part(
            name,
            frame,
            prims,
            holes,
            label,
            cortical * rng.uniform(0.95, 1.05),
            cancellous * dens * rng.uniform(0.9, 1.1),
            cortical_mm,
            by_level.get(name, []),
        )

    parts: list[Part] = []
    # discs first, so the endplates of the bodies paint over them
    for lower, upper in itertools.pairwise(SPINE_ORDER):
        fl, fu = frames[lower], frames[upper]
        hl, hu_ = LEVELS[lower][2] * s, LEVELS[upper][2] * s
        top = fl.to_world((0, 0, hl))
        bot = fu.to_world((0, 0, -hu_))
        mid = (top + bot) / 2
        gap = float(np.linalg.norm(bot - top))
        ru, rv = LEVELS[upper][0] * s, LEVELS[upper][1] * s
        parts.append(
            Part(
                f"disc {upper}-{lower}",
                Frame(mid, fu.R),
                [Body((0, 0, 0), ru * 1.02, rv * 1.02, gap / 2 + 0.6, round=1.0)],
                [],
                0,
                disc_hu,
                disc_hu,
                0.0,
                tissue=TISSUES["disc"],
            )
        )
    for name in SPINE_ORDER:
        fx = by_level.get(name, [])
        wedge = max((f.wedge for f in fx), default=0.0)
        if name == "C2":
            prims, holes, _ = axis_c2(s, osteo.get(name, ()), wedge)
        else:
            prims, holes = subaxial(name, s, osteo.get(name, ()), wedge)
        parts.append(bone(name, frames[name], prims, holes, LABEL_VALUES[name]))
    c1p, c1h = atlas_c1(s)
    parts.append(bone("C1", frames["C1"], c1p, c1h, LABEL_VALUES["C1"]))

    # ---- other bones (mask 0): skull base, mandible, hyoid, first ribs, clavicles
    fm_w = 15.0 * s  # foramen magnum height above the atlas centre
    skull_prims: list[Primitive] = [
        Shell((0.0, 14.0 * s, fm_w + 48.0 * s), (62.0 * s, 78.0 * s, 48.0 * s), 7.0 * s, fm_w + 45.0 * s),
        Bar((0.0, -4.0 * s, fm_w + 1.0 * s), (0.0, -24.0 * s, fm_w + 24.0 * s), 11.0 * s, 5.0 * s, round=2.0),
    ]
    for side in (-1.0, 1.0):
        skull_prims.append(Ellipsoid((side * 12.0 * s, 4.0 * s, 11.5 * s), (5.5 * s, 9.0 * s, 4.0 * s)))  # condyle
        skull_prims.append(Ellipsoid((side * 44.0 * s, 14.0 * s, fm_w + 6.0 * s), (8.0 * s, 10.0 * s, 14.0 * s)))
    skull_holes: list[Primitive] = [Body((0.0, 14.5 * s, fm_w + 2.0 * s), 15.0 * s, 17.5 * s, 9.0 * s, round=2.0)]
    parts.append(
        Part("skull", skull, skull_prims, skull_holes, 0, cortical * 1.05, cancellous * 1.4, cortical_mm * 1.4)
    )
    jaw = float(rng.uniform(-8, 6)) * s  # mouth opening / head posture moves the mandible
    mand: list[Primitive] = []
    pts = [(46.0, -16.0), (41.0, -46.0), (26.0, -68.0), (0.0, -76.0)]
    for side in (-1.0, 1.0):
        for p, q in itertools.pairwise(pts):
            mand.append(
                Bar(
                    (side * p[0] * s, p[1] * s, jaw - 6.0 * s),
                    (side * q[0] * s, q[1] * s, jaw - 8.0 * s),
                    4.5 * s,
                    11.0 * s,
                    round=2.0,
                )
            )
        mand.append(
            Bar(
                (side * 46.0 * s, -10.0 * s, jaw + 22.0 * s),
                (side * 47.0 * s, -34.0 * s, jaw + 22.0 * s),
                3.5 * s,
                20.0 * s,
                round=2.0,
            )
        )  # ramus
    parts.append(Part("mandible", frames["C2"], mand, [], 0, cortical * 1.1, cancellous, cortical_mm * 1.4))
    hy_pts = [(19.0, -30.0), (12.0, -39.0), (0.0, -42.0)]
    hyoid: list[Primitive] = []
    for side in (-1.0, 1.0):
        for p, q in itertools.pairwise(hy_pts):
            hyoid.append(
                Bar(
                    (side * p[0] * s, p[1] * s, 2.0 * s),
                    (side * q[0] * s, q[1] * s, 2.0 * s),
                    2.0 * s,
                    3.5 * s,
                    round=1.0,
                )
            )
    parts.append(Part("hyoid", frames["C3"], hyoid, [], 0, cortical * 0.8, cancellous, cortical_mm))
    for lvl, pts_r, drop in (
        ("T1", [(31.0, 11.0), (42.0, 6.0), (52.0, -12.0), (55.0, -36.0), (46.0, -60.0), (32.0, -72.0)], 30.0),
        ("T2", [(31.0, 12.0), (46.0, 14.0), (64.0, -4.0), (71.0, -34.0), (66.0, -64.0), (50.0, -84.0)], 36.0),
    ):
        rib: list[Primitive] = []
        for side in (-1.0, 1.0):
            m = len(pts_r) - 1
            for j, (p, q) in enumerate(itertools.pairwise(pts_r)):
                rib.append(
                    Bar(
                        (side * p[0] * s, p[1] * s, -drop * s * j / m),
                        (side * q[0] * s, q[1] * s, -drop * s * (j + 1) / m),
                        3.0 * s,
                        5.0 * s,
                        round=1.5,
                    )
                )
        parts.append(Part(f"ribs {lvl}", frames[lvl], rib, [], 0, cortical * 0.9, cancellous, cortical_mm))
    clav: list[Primitive] = []
    for side in (-1.0, 1.0):
        cl = [(18.0, -72.0, 18.0), (55.0, -66.0, 24.0), (95.0, -40.0, 34.0)]
        for p, q in itertools.pairwise(cl):
            clav.append(
                Bar(
                    (side * p[0] * s, p[1] * s, p[2] * s),
                    (side * q[0] * s, q[1] * s, q[2] * s),
                    5.0 * s,
                    5.5 * s,
                    round=2.0,
                )
            )
    parts.append(Part("clavicles", frames["T1"], clav, [], 0, cortical, cancellous, cortical_mm * 1.5))

    # ---- soft tissues, slice by slice
    levels = ["T2", "T1", "C7", "C6", "C5", "C4", "C3", "C2", "C1"]
    zc = np.array([frames[k].centre[2] for k in levels])
    body = np.array([frames[k].centre for k in levels])
    canal = np.array([frames[k].to_world((0, canal_v(k, s) if k != "C1" else 17.5 * s, 0)) for k in levels])
    front = np.array([frames[k].to_world((0, -(LEVELS[k][1] if k != "C1" else 10.0) * s, 0)) for k in levels])
    fm = skull.to_world((0.0, 14.0 * s, fm_w))
    order = np.argsort(zc)
    z_lo, z_hi = float(zc.min()) - 300.0, float(zc.max()) + 300.0

    def ext(z: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        zz = np.concatenate([[z_lo], z[order], [z_hi]])
        vv = np.concatenate([[vals[order][0]], vals[order], [vals[order][-1]]])
        return zz, vv

    zz, bx = ext(zc, body[:, 0])
    _, by = ext(zc, body[:, 1])
    _, cnx = ext(zc, canal[:, 0])
    _, cny = ext(zc, canal[:, 1])
    _, fy = ext(zc, front[:, 1])
    rx0, ryb0, ryf0 = (
        float(rng.uniform(50, 62)) * habitus,
        float(rng.uniform(56, 70)) * habitus,
        float(rng.uniform(46, 56)) * habitus,
    )
    z_c6, z_t2, z_c3, z_c1 = (frames[k].centre[2] for k in ("C6", "T2", "C3", "C1"))
    shoulder = _smoothstep((z_c6 - zz) / max(z_c6 - z_t2, 1.0))
    head = _smoothstep((zz - z_c1) / 40.0)
    chin = _smoothstep((zz - (z_c3 - 5.0)) / 25.0)
    rx = rx0 + 95.0 * shoulder + 12.0 * head
    ryb = ryb0 + 12.0 * shoulder + 20.0 * head
    ryf = ryf0 + 14.0 * shoulder + 40.0 * chin
    muscle = float(rng.uniform(35, 60))
    params["muscle_hu"] = muscle
    fat = float(rng.uniform(-120, -75))
    tf = float(rng.uniform(4, 14)) * habitus
    ncy = by + 7.0 * s
    tubes = [Tube("neck", zz, bx, ncy, rx, ryf, ryb, fat, inner=(tf, muscle), tissue=TISSUES["fat"])]
    for side in (-1.0, 1.0):  # intermuscular fat planes (posterior triangle)
        tubes.append(
            Tube(
                "fat plane",
                zz,
                bx + side * (rx0 * 0.55 + 20 * shoulder),
                ncy + 0.3 * ryb0,
                np.full_like(zz, rng.uniform(5, 9) * habitus),
                np.full_like(zz, rng.uniform(3, 6)),
                np.full_like(zz, rng.uniform(3, 6)),
                fat,
                z_range=(z_t2 - 50, z_c1),
                tissue=TISSUES["fat"],
            )
        )
    prevert = np.where(zz > frames["C4"].centre[2], 4.0, 12.0 + 4.0 * shoulder) * s
    air_rx = np.where(zz > frames["C4"].centre[2], 13.0, 9.0) * s
    air_ry = np.full_like(zz, 8.0 * s)
    air_y = fy - prevert - air_ry
    tubes.append(
        Tube(
            "canal",
            zz,
            cnx,
            cny,
            np.full_like(zz, 10.5 * s),
            np.full_like(zz, 7.0 * s),
            np.full_like(zz, 7.0 * s),
            float(rng.uniform(5, 20)),
            inner=(3.8 * s, float(rng.uniform(30, 40))),
            tissue=TISSUES["canal"],
            inner_tissue=TISSUES["canal"],
        )
    )
    contrast = bool(rng.random() < 0.2)
    params["contrast"] = float(contrast)
    art, ven = (float(rng.uniform(200, 400)), float(rng.uniform(120, 200))) if contrast else (45.0, 40.0)
    for side in (-1.0, 1.0):
        tubes.append(
            Tube(
                "carotid",
                zz,
                bx + side * (air_rx + 12 * s),
                air_y + 7 * s,
                np.full_like(zz, 3.4 * s),
                np.full_like(zz, 3.4 * s),
                np.full_like(zz, 3.4 * s),
                art,
                tissue=TISSUES["vessel"],
            )
        )
        tubes.append(
            Tube(
                "jugular",
                zz,
                bx + side * (air_rx + 21 * s),
                air_y + 10 * s,
                np.full_like(zz, 5.5 * s),
                np.full_like(zz, 4.5 * s),
                np.full_like(zz, 4.5 * s),
                ven,
                tissue=TISSUES["vessel"],
            )
        )
        tubes.append(
            Tube(
                "thyroid",
                zz,
                bx + side * (air_rx + 3 * s),
                air_y - 1 * s,
                np.full_like(zz, 7.0 * s),
                np.full_like(zz, 8.0 * s),
                np.full_like(zz, 8.0 * s),
                float(rng.uniform(80, 110)),
                z_range=(frames["T1"].centre[2], frames["C6"].centre[2]),
            )
        )
    tubes.append(
        Tube(
            "airway",
            zz,
            bx,
            air_y,
            air_rx,
            air_ry,
            air_ry,
            -1000.0,
            z_range=(-1e9, float(fm[2]) - 5.0),
            tissue=TISSUES["airway"],
        )
    )

    z_top = float(fm[2]) + float(rng.uniform(12, 30))
    z_bottom = float(frames["T1"].centre[2]) - float(rng.uniform(-4, 30))
    return Anatomy(tubes, parts, -1000.0, z_top, z_bottom, (float(place[0]), float(place[1] + 7.0 * s)), params)
