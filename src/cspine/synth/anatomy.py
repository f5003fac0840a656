"""One synthetic patient: spine curve, vertebrae, other bones and soft tissues, as data to render.

:func:`build_anatomy` samples a patient in patient LPS millimetres (see :mod:`cspine.synth.shapes`); rendering on a
grid is :mod:`cspine.synth.render`'s job, so one anatomy can be sampled at any resolution. The bones around the
spine are :mod:`cspine.synth.other_bones`, the soft tissues :mod:`cspine.synth.soft_tissue`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from cspine.labels import LABEL_VALUES
from cspine.synth.fractures import Fracture, make_fracture
from cspine.synth.other_bones import other_bones
from cspine.synth.parts import TISSUES, Anatomy, Part
from cspine.synth.shapes import Body, Frame, Primitive, rot_x, rot_y, rot_z
from cspine.synth.soft_tissue import soft_tissues
from cspine.synth.vertebrae import LEVELS, Junction, atlas_c1, axis_c2, subaxial
from cspine.synth.wide import (
    LOWER_DISCS,
    LOWER_ORDER,
    couch_tubes,
    draw_junction,
    head_parts,
    larynx_parts,
    lower_phis,
    neighbour_frames,
    rib_parts,
    shoulder_parts,
    trunk_tubes,
)

# --------------------------------------------------------------------------------------------------------------
# Building a study's anatomy
# --------------------------------------------------------------------------------------------------------------

SPINE_ORDER: tuple[str, ...] = ("T2", "T1", "C7", "C6", "C5", "C4", "C3", "C2")  # built bottom-up
DISCS = {"T2": 4.2, "T1": 4.8, "C7": 5.0, "C6": 5.4, "C5": 5.5, "C4": 5.2, "C3": 4.8}  # disc above each level, mm


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
    junction = Junction()
    if wide:
        junction = draw_junction(rng)
        params |= {"atlas_height": junction.lateral_mass[2], "dens_mm": junction.dens_mm}
    R1 = c2.R @ rot_x(rad(rng.uniform(-6, 6))) @ rot_z(rad(rng.normal(0, 2.0)))
    frames["C1"] = Frame(c2.to_world((0.0, -1.5 * s, hh2 + junction.lift_mm * s)), R1)
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
            prims, holes, _ = axis_c2(s, osteo.get(name, ()), wedge, bifid=wide, junction=junction)
        else:
            prims, holes = subaxial(name, s, osteo.get(name, ()), wedge)
        parts.append(bone(name, frames[name], prims, holes, LABEL_VALUES.get(name, 0)))
    c1p, c1h = atlas_c1(s, junction)
    parts.append(bone("C1", frames["C1"], c1p, c1h, LABEL_VALUES["C1"]))

    # ---- other bones (mask 0): skull base, mandible, hyoid, first ribs, clavicles
    fm_w = junction.foramen_mm * s  # foramen magnum height above the atlas centre
    jaw = float(rng.uniform(-8, 6)) * s  # mouth opening / head posture moves the mandible
    jaw_frame, hyoid_frame = frames["C2"], frames["C3"]
    if wide:  # the mandible hangs from the skull, not from C2, and the hyoid from the mandible and larynx
        jaw_frame, hyoid_frame, shifts = neighbour_frames(rng, frames, s)
        params |= shifts
    parts += other_bones(frames, skull, s, fm_w, jaw, cortical, cancellous, cortical_mm, jaw_frame, hyoid_frame)
    metal: list[tuple[float, float, float]] = []
    if wide:
        head, metal, head_params = head_parts(
            rng, skull, jaw_frame, s, jaw, fm_w, cortical, cancellous, cortical_mm, junction.atlas_top
        )
        params |= head_params
        parts = head[:1] + parts + head[1:]  # the brain first: bone paints over it
        parts += larynx_parts(rng, frames, s) + rib_parts(frames, s, cortical, cancellous, cortical_mm)

    # ---- soft tissues, slice by slice
    neck = soft_tissues(rng, frames, skull, s, fm_w, habitus, wide)
    params |= neck.params
    fm, bx, zz = neck.fm, neck.bx, neck.zz
    z_top = float(fm[2]) + float(rng.uniform(12, 30))
    z_bottom = float(frames["T1"].centre[2]) - float(rng.uniform(-4, 30))
    anat = Anatomy(neck.tubes, parts, -1000.0, z_top, z_bottom, (float(place[0]), float(place[1] + 7.0 * s)), params)
    if wide:
        anat.tubes[1:1] = trunk_tubes(rng, frames, skull, s, fm_w, jaw, habitus, jaw_frame)
        anat.tubes[0:0] = couch_tubes(
            rng, float(np.median(bx)), float((neck.ncy + neck.ryb).max()), (float(zz[1]), float(zz[-2]))
        )
        anat.parts += shoulder_parts(frames["T1"], s, neck.rx0 + 80.0, cortical, cancellous, cortical_mm)
        anat.metal = metal
        anat.landmarks = {
            "vertex": float(skull.to_world((0.0, 10.0 * s, fm_w + 132.0 * s))[2]) + 7.0,
            "foramen_magnum": float(fm[2]),
            "head_x": float(skull.to_world((0.0, 10.0 * s, fm_w + 62.0 * s))[0]),
            "head_y": float(skull.to_world((0.0, 10.0 * s, fm_w + 62.0 * s))[1]),
            **{f"{v}_centre": float(f.centre[2]) for v, f in frames.items()},
        }
    return anat
