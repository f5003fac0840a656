"""Vertebra shapes C1-T2 as lists of primitives (and holes) in the vertebra's local frame, scaled by ``s``."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from cspine.synth.shapes import Bar, Body, Ellipsoid, Primitive

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
    # below T2: only the wide profile's chest and abdomen fields of view use these
    "T3": (13.5, 10.5, 9.2, 36.0, 30.0),
    "T4": (14.0, 11.0, 9.5, 36.0, 29.0),
    "T5": (14.5, 11.5, 9.8, 36.0, 28.0),
    "T6": (15.0, 12.0, 10.0, 36.0, 28.0),
    "T7": (15.5, 12.5, 10.3, 35.0, 28.0),
    "T8": (16.0, 13.0, 10.6, 34.0, 28.0),
    "T9": (16.5, 13.5, 11.0, 33.0, 28.0),
    "T10": (17.5, 14.0, 11.4, 32.0, 27.0),
    "T11": (19.0, 15.0, 11.8, 30.0, 25.0),
    "T12": (20.0, 16.0, 12.2, 28.0, 22.0),
    "L1": (21.0, 16.5, 12.5, 28.0, 28.0),
    "L2": (22.0, 17.0, 13.0, 28.0, 32.0),
    "L3": (23.0, 17.5, 13.5, 28.0, 36.0),
}
CANAL_HALF = (12.0, 7.5)  # canal half-width, half-depth (cervical)
C1_MASS_HALF_HEIGHT = 6.5  # C1's lateral masses reach this far above and below its centre (mm, adult mean)


@dataclass(frozen=True)
class Junction:
    """Proportions of the atlas and the axis, as factors on the adult mean (1.0) unless named in mm.

    The default profile keeps the mean; the wide profile draws them (:func:`cspine.synth.wide.draw_junction`), so
    that the atlas has to be told by its place on C2 and under the skull, not by one fixed look.
    """

    lateral_mass: tuple[float, float, float] = (1.0, 1.0, 1.0)  # C1's lateral masses: width, depth, height
    ring: float = 1.0  # C1's ring about the dens axis
    anterior_arch: float = 1.0  # thickness of C1's anterior arch and tubercle
    posterior_arch: float = 1.0  # thickness of C1's posterior arch and tubercle
    transverse: float = 1.0  # reach of C1's transverse processes
    lift_mm: float = 11.0  # C1's centre above the top of C2's body
    dens_mm: float = 16.0  # the dens's height above C2's body
    dens_width: float = 1.0
    foramen_mm: float = 15.0  # the foramen magnum above C1's centre

    @property
    def atlas_top(self) -> float:
        """The top of C1's lateral masses above its centre (mm, unscaled): where the condyles sit."""
        return C1_MASS_HALF_HEIGHT * self.lateral_mass[2]


def canal_v(name: str, s: float) -> float:
    """v of the canal centre behind the body centre (local mm)."""
    _, rv, _, _, _ = LEVELS[name]
    half_depth = CANAL_HALF[1] * (0.93 if not name.startswith("C") else 1.0)
    return s * (rv + half_depth + 0.6)


def subaxial(
    name: str, s: float, osteophytes: Sequence[tuple[float, float]] = (), wedge: float = 0.0
) -> tuple[list[Primitive], list[Primitive]]:
    """C3-T2: body, uncinate lips, pedicles, articular pillars, laminae, spinous and transverse processes."""
    ru, rv, hh, sp_len, tp = (x * s for x in LEVELS[name])
    thoracic = not name.startswith("C")  # thoracic and lumbar: no uncinate processes, no transverse foramina
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
    bifid: bool = False,
    junction: Junction = Junction(),
) -> tuple[list[Primitive], list[Primitive], float]:
    """C2: body, dens rising into the atlas, superior facets, pedicles, laminae, large spinous process (with
    ``bifid``, its two tubercles: the wide profile; the default profile keeps its single knob).

    Returns (prims, holes, dens_top_w)."""
    prims, holes = subaxial("C2", s, osteophytes, wedge)
    _ru, _rv, hh, _, _ = (x * s for x in LEVELS["C2"])
    dens_h = junction.dens_mm * s
    prims.append(
        Bar(
            (0.0, -1.5 * s, hh + dens_h / 2 - 1.0 * s),
            (0.0, -1.5 * s, hh + dens_h / 2 - 1.0 * s),
            4.7 * s * junction.dens_width,
            dens_h / 2 + 1.0 * s,
            round=3.5 * s,
        )
    )
    for side in (-1.0, 1.0):  # superior articular facets (large, lateral to the dens)
        prims.append(Ellipsoid((side * 12.5 * s, 2.5 * s, hh - 2.5 * s), (7.0 * s, 8.0 * s, 4.5 * s)))
    # heavier laminae + spinous
    vc = canal_v("C2", s)
    prims.append(Bar((0.0, vc + 10.0 * s, -2.0 * s), (0.0, vc + 24.0 * s, -8.0 * s), 3.4 * s, 5.2 * s, round=1.2))
    if bifid:
        for side in (-1.0, 1.0):
            prims.append(Ellipsoid((side * 4.5 * s, vc + 25.0 * s, -8.5 * s), (4.0 * s, 3.5 * s, 5.0 * s)))
    return prims, holes, hh + dens_h


def atlas_c1(s: float, junction: Junction = Junction()) -> tuple[list[Primitive], list[Primitive]]:
    """C1: a ring with two lateral masses and no body; anterior arch in front of the dens, posterior arch
    around the canal, long transverse processes with foramina. Origin on the dens axis. ``junction`` sizes its
    parts; each grows outwards, so the gaps to the dens stay as they are."""
    j = junction
    lu, lv, lw = j.lateral_mass
    a, p, r = j.anterior_arch, j.posterior_arch, j.ring
    front = 2.4 * (a - 1.0)  # a thicker anterior arch grows forwards, off the dens
    prims: list[Primitive] = []
    holes: list[Primitive] = []
    prims.append(Ellipsoid((0.0, (-10.3 * r - front) * s, 0.0), (4.2 * s * a, 2.8 * s * a, 5.2 * s * a)))  # tubercles
    prims.append(Ellipsoid((0.0, 31.0 * r * s, -1.0 * s), (4.0 * s * p, 3.5 * s * p, 4.8 * s * p)))
    for side in (-1.0, 1.0):
        mass_u = side * (6.5 + 6.5 * lu)  # its inner face stays 6.5 mm from the dens axis
        mass_r = (6.5 * s * lu, 9.5 * s * lv, C1_MASS_HALF_HEIGHT * s * lw)
        prims.append(Ellipsoid((mass_u * s, 3.5 * s, 0.0), mass_r))  # lateral mass
        pts_a = [(side * 11.0 * r, -3.5 * r - front), (side * 6.5 * r, -8.5 * r - front), (0.0, -10.0 * r - front)]
        for p0, q in itertools.pairwise(pts_a):  # anterior arch
            prims.append(
                Bar((p0[0] * s, p0[1] * s, 0.0), (q[0] * s, q[1] * s, 0.0), 2.4 * s * a, 4.2 * s * a, round=1.0)
            )
        pts_p = [(side * 12.0 * r, 10.0 * r), (side * 12.5 * r, 19.0 * r), (side * 8.0 * r, 27.5 * r), (0.0, 30.0 * r)]
        for p0, q in itertools.pairwise(pts_p):  # posterior arch
            w0, w1 = -0.5 * s, -1.0 * s
            prims.append(Bar((p0[0] * s, p0[1] * s, w0), (q[0] * s, q[1] * s, w1), 2.6 * s * p, 3.4 * s * p, round=1.0))
        prims.append(
            Bar(
                (side * 17.0 * s, 3.5 * s, 0.0),
                (side * (17.0 + 16.0 * j.transverse) * s, 4.5 * s, 0.0),
                4.2 * s,
                3.8 * s,
                r2=3.4 * s,
                round=1.5,
            )
        )  # transverse process
        holes.append(Bar((side * 22.5 * s, 3.6 * s, 0.0), (side * 22.5 * s, 3.6 * s, 0.0), 2.8 * s, 6.0 * s, round=0.5))
    return prims, holes


def rib_bars(points: Sequence[tuple[float, float]], drop: float, s: float, hh: float) -> list[Primitive]:
    """A pair of ribs in the frame of their vertebra: the (u, v) polyline mirrored left and right, falling ``drop``
    mm (times ``s``) from the spine to the front, 3 mm thick and ``hh`` mm half-high (times ``s``)."""
    m = len(points) - 1
    out: list[Primitive] = []
    for side in (-1.0, 1.0):
        for j, (p, q) in enumerate(itertools.pairwise(points)):
            out.append(
                Bar(
                    (side * p[0] * s, p[1] * s, -drop * s * j / m),
                    (side * q[0] * s, q[1] * s, -drop * s * (j + 1) / m),
                    3.0 * s,
                    hh * s,
                    round=1.5,
                )
            )
    return out
