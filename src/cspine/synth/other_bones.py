"""The bones around the cervical spine that masks label 0: skull base, mandible, hyoid, first ribs, clavicles.

Part of :func:`cspine.synth.anatomy.build_anatomy`; geometry in the frames of the vertebrae they attach to.
"""

from __future__ import annotations

import itertools

from cspine.synth.parts import Part
from cspine.synth.shapes import Bar, Body, Ellipsoid, Frame, Primitive, Shell
from cspine.synth.vertebrae import rib_bars


def other_bones(
    frames: dict[str, Frame],
    skull: Frame,
    s: float,
    fm_w: float,
    jaw: float,
    cortical: float,
    cancellous: float,
    cortical_mm: float,
    jaw_frame: Frame,
    hyoid_frame: Frame,
) -> list[Part]:
    """Skull base (``fm_w``: foramen magnum height above the atlas centre), mandible (opened by ``jaw`` mm),
    hyoid, the first two ribs and the clavicles, at scale ``s`` with the patient's bone densities. The mandible
    and hyoid sit in ``jaw_frame`` and ``hyoid_frame`` (C2's and C3's in the default profile)."""
    skull_prims: list[Primitive] = [
        Shell((0.0, 14.0 * s, fm_w + 48.0 * s), (62.0 * s, 78.0 * s, 48.0 * s), 7.0 * s, fm_w + 45.0 * s),
        Bar((0.0, -4.0 * s, fm_w + 1.0 * s), (0.0, -24.0 * s, fm_w + 24.0 * s), 11.0 * s, 5.0 * s, round=2.0),
    ]
    for side in (-1.0, 1.0):
        skull_prims.append(Ellipsoid((side * 12.0 * s, 4.0 * s, 11.5 * s), (5.5 * s, 9.0 * s, 4.0 * s)))  # condyle
        skull_prims.append(Ellipsoid((side * 44.0 * s, 14.0 * s, fm_w + 6.0 * s), (8.0 * s, 10.0 * s, 14.0 * s)))
    skull_holes: list[Primitive] = [Body((0.0, 14.5 * s, fm_w + 2.0 * s), 15.0 * s, 17.5 * s, 9.0 * s, round=2.0)]
    parts: list[Part] = []
    parts.append(
        Part("skull", skull, skull_prims, skull_holes, 0, cortical * 1.05, cancellous * 1.4, cortical_mm * 1.4)
    )
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
    parts.append(Part("mandible", jaw_frame, mand, [], 0, cortical * 1.1, cancellous, cortical_mm * 1.4))
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
    parts.append(Part("hyoid", hyoid_frame, hyoid, [], 0, cortical * 0.8, cancellous, cortical_mm))
    for lvl, pts_r, drop in (
        ("T1", [(31.0, 11.0), (42.0, 6.0), (52.0, -12.0), (55.0, -36.0), (46.0, -60.0), (32.0, -72.0)], 30.0),
        ("T2", [(31.0, 12.0), (46.0, 14.0), (64.0, -4.0), (71.0, -34.0), (66.0, -64.0), (50.0, -84.0)], 36.0),
    ):
        rib = rib_bars(pts_r, drop, s, 5.0)
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
    return parts


__all__ = ["other_bones"]
