"""One synthetic patient: spine curve, vertebrae, other bones and soft tissues, as data to render.

:func:`build_anatomy` samples a patient in patient LPS millimetres (see :mod:`cspine.synth.shapes`); rendering on a
grid is :mod:`cspine.synth.render`'s job, so one anatomy can be sampled at any resolution.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from cspine.labels import LABEL_VALUES
from cspine.synth.fractures import Fracture, make_fracture
from cspine.synth.parts import TISSUES, Anatomy, Part, Tube
from cspine.synth.shapes import Bar, Body, Ellipsoid, Frame, Primitive, Shell, rot_x, rot_y, rot_z
from cspine.synth.vertebrae import LEVELS, atlas_c1, axis_c2, canal_v, rib_bars, subaxial
from cspine.synth.wide import (
    LOWER_DISCS,
    LOWER_ORDER,
    couch_tubes,
    head_parts,
    larynx_parts,
    lower_phis,
    rib_parts,
    shoulder_parts,
    trunk_tubes,
)

# --------------------------------------------------------------------------------------------------------------
# Building a study's anatomy
# --------------------------------------------------------------------------------------------------------------

SPINE_ORDER: tuple[str, ...] = ("T2", "T1", "C7", "C6", "C5", "C4", "C3", "C2")  # built bottom-up
DISCS = {"T2": 4.2, "T1": 4.8, "C7": 5.0, "C6": 5.4, "C5": 5.5, "C4": 5.2, "C3": 4.8}  # disc above each level, mm


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def build_anatomy(
    rng: np.random.Generator,
    fracture_plan: Sequence[tuple[str, str, bool]],
    fx_rng: np.random.Generator,
    h_min: float,
    wide: bool = False,
) -> Anatomy:
    """Sample one patient: spine curve, vertebrae, degenerative changes, soft tissues and the planned fractures.

    ``fracture_plan`` lists (vertebra, kind, subtle); the geometry of each is drawn from ``fx_rng`` so that the
    anatomy stream does not depend on the labels (a fractured and an intact study share the same distribution
    of everything else). ``wide`` (the wide profile) widens the ranges of size, build, curvature and pose and adds
    the head, face, larynx, chest and upper abdomen of :mod:`cspine.synth.wide`.
    """
    deg = np.degrees
    rad = math.radians
    if wide:
        s = float(np.clip(rng.normal(1.0, 0.09), 0.8, 1.22))
        habitus = float(rng.uniform(0.72, 1.5))
    else:
        s = float(np.clip(rng.normal(1.0, 0.06), 0.86, 1.16))
        habitus = float(rng.uniform(0.88, 1.25))
    age = float(rng.beta(2.0, 2.0))  # drives degeneration, independent of fractures
    phi_bottom = rad(rng.uniform(8, 24))
    if wide:  # kyphotic / straightened / flexed to strongly lordotic; the head turned and tilted in the scanner
        lordosis = rad(rng.uniform(-30, 50))
        yaw, roll = rad(rng.normal(0, 9.0)), rad(rng.normal(0, 5.0))
    else:
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
    order = SPINE_ORDER
    if wide:
        phis = lower_phis(phi_bottom) + phis
        order = LOWER_ORDER + SPINE_ORDER
    frames: dict[str, Frame] = {}
    centre = np.zeros(3)
    prev = None
    for i, name in enumerate(order):
        R = rot_x(phis[i]) @ rot_z(rad(rng.normal(0, 1.5))) @ rot_y(rad(rng.normal(0, 1.0)))
        hh = LEVELS[name][2] * s
        if prev is not None:
            pname, pR = prev
            phh = LEVELS[pname][2] * s
            disc = (DISCS | LOWER_DISCS)[pname] * s * (1.0 - 0.45 * age * rng.uniform(0, 1))
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
    for lower, upper in itertools.pairwise(order):
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
    for name in order:
        fx = by_level.get(name, [])
        wedge = max((f.wedge for f in fx), default=0.0)
        if name == "C2":
            prims, holes, _ = axis_c2(s, osteo.get(name, ()), wedge, bifid=wide)
        else:
            prims, holes = subaxial(name, s, osteo.get(name, ()), wedge)
        parts.append(bone(name, frames[name], prims, holes, LABEL_VALUES.get(name, 0)))
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
    metal: list[tuple[float, float, float]] = []
    if wide:
        head, metal, head_params = head_parts(rng, skull, frames["C2"], s, jaw, fm_w, cortical, cancellous, cortical_mm)
        params |= head_params
        parts = head[:1] + parts + head[1:]  # the brain first: bone paints over it
        parts += larynx_parts(rng, frames, s) + rib_parts(frames, s, cortical, cancellous, cortical_mm)

    # ---- soft tissues, slice by slice
    levels = ["T2", "T1", "C7", "C6", "C5", "C4", "C3", "C2", "C1"]
    if wide:
        levels = list(LOWER_ORDER) + levels
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
    if wide:  # the chest deepens below the shoulders (sternum 10-13 cm in front of the spine)
        ryf = ryf + float(rng.uniform(45, 80)) * habitus * _smoothstep((z_t2 - zz) / 60.0)
    muscle = float(rng.uniform(25, 55) if wide else rng.uniform(35, 60))
    params["muscle_hu"] = muscle
    fat = float(rng.uniform(-120, -75))
    tf = float(rng.uniform(5, 26) if wide else rng.uniform(4, 14)) * habitus  # subcutaneous fat
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
            z_range=(float(frames["T5"].centre[2]) if wide else -1e9, float(fm[2]) - 5.0),
            tissue=TISSUES["airway"],
        )
    )

    z_top = float(fm[2]) + float(rng.uniform(12, 30))
    z_bottom = float(frames["T1"].centre[2]) - float(rng.uniform(-4, 30))
    anat = Anatomy(tubes, parts, -1000.0, z_top, z_bottom, (float(place[0]), float(place[1] + 7.0 * s)), params)
    if wide:
        anat.tubes[1:1] = trunk_tubes(rng, frames, skull, s, fm_w, jaw, habitus)
        anat.tubes[0:0] = couch_tubes(
            rng, float(np.median(bx)), float((ncy + ryb).max()), (float(zz[1]), float(zz[-2]))
        )
        anat.parts += shoulder_parts(frames["T1"], s, rx0 + 80.0, cortical, cancellous, cortical_mm)
        anat.metal = metal
        anat.landmarks = {
            "vertex": float(skull.to_world((0.0, 10.0 * s, fm_w + 132.0 * s))[2]) + 7.0,
            "foramen_magnum": float(fm[2]),
            "head_x": float(skull.to_world((0.0, 10.0 * s, fm_w + 62.0 * s))[0]),
            "head_y": float(skull.to_world((0.0, 10.0 * s, fm_w + 62.0 * s))[1]),
            **{f"{v}_centre": float(f.centre[2]) for v, f in frames.items()},
        }
    return anat
