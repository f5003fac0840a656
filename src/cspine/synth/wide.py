"""The wide profile's extra anatomy: calvarium and brain, skull base (petrous bones, mastoids, the ring around the
foramen magnum), face (palate, teeth, dental metal), a mandible, hyoid and larynx that move against the vertebrae,
ribs T3-T10, lungs and liver, and the lower spine T3-L3, so that a field of view can be a head, a neck, a chest or
an abdomen.

Why: real CTs that reach cspine are not all tight cervical-spine scans (SynthSeg's lesson: train on variation far
beyond the real one). These structures are coarse, but they put bone, air and metal where real scans have them, so
a segmenter meets the skull, the teeth, the ribs and the lungs it will meet on real CT. Used only by
``profile="wide"``; the default profile never calls this module, so its output stays byte-identical.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from cspine.synth.parts import TISSUES, Part, Tube
from cspine.synth.shapes import Bar, Body, Ellipsoid, Frame, Primitive, Shell
from cspine.synth.vertebrae import C1_MASS_HALF_HEIGHT, Junction, rib_bars

#: Levels below T2, built bottom-up before the default chain (L1-L3 are drawn but carry mask value 0).
LOWER_ORDER: tuple[str, ...] = ("L3", "L2", "L1", "T12", "T11", "T10", "T9", "T8", "T7", "T6", "T5", "T4", "T3")
LOWER_DISCS = {"L3": 9.0, "L2": 9.0, "L1": 8.0, "T12": 6.5, "T11": 6.0, "T10": 5.5, "T9": 5.0, "T8": 5.0}
LOWER_DISCS |= {"T7": 4.8, "T6": 4.6, "T5": 4.5, "T4": 4.4, "T3": 4.3}


def lower_phis(phi_bottom: float) -> list[float]:
    """Sagittal tilt of L3..T3: T2's tilt easing through zero near T8 into lumbar lordosis."""
    m = len(LOWER_ORDER)
    return [phi_bottom * (1.0 - (m - j) / 6.0) for j in range(m)]


def _arch(points: list[tuple[float, float]], n: int) -> list[tuple[float, float]]:
    """n points evenly spaced along a polyline (u, v)."""
    seg = [math.dist(p, q) for p, q in itertools.pairwise(points)]
    total = sum(seg)
    out = []
    for i in range(n):
        d = total * (i + 0.5) / n
        for (p, q), L in zip(itertools.pairwise(points), seg, strict=True):
            if d <= L:
                t = d / L
                out.append((p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])))
                break
            d -= L
    return out


def head_parts(
    rng: np.random.Generator,
    skull: Frame,
    jaw_frame: Frame,
    s: float,
    jaw: float,
    fm_w: float,
    cortical: float,
    cancellous: float,
    cortical_mm: float,
    atlas_top: float = C1_MASS_HALF_HEIGHT,
) -> tuple[list[Part], list[tuple[float, float, float]], dict[str, float]]:
    """Brain, calvarium, palate, skull base (petrous bones, jugular processes, clivus, mastoids, sphenoid sinus, the
    foramen magnum's ring, random bony blobs), upper and lower teeth (some with metal). ``atlas_top``: the top of
    C1's lateral masses above its centre (mm, unscaled), where the condyles sit. Returns (parts, metal points,
    params)."""
    size = float(rng.uniform(0.93, 1.07))
    c = (0.0, 10.0 * s, fm_w + 62.0 * s)
    r = (68.0 * s * size, 88.0 * s * size, 70.0 * s * size)
    th = float(rng.uniform(5.0, 8.0)) * s
    brain_hu = float(rng.uniform(28, 42))
    inner = tuple(x - th for x in r)
    parts = [
        Part("brain", skull, [Ellipsoid(c, inner)], [], 0, brain_hu, brain_hu, 0.0, tissue=TISSUES["soft"]),  # type: ignore[arg-type]
        Part(
            "calvarium",
            skull,
            [Shell(c, tuple(x - th / 2 for x in r), th, 1e4, w_min=fm_w + 40.0 * s)],  # type: ignore[arg-type]
            [],
            0,
            cortical * 1.1,
            cancellous * 1.6,
            th / 3,
        ),
        Part(
            "palate",
            skull,
            [Bar((0.0, -36.0 * s, 2.0 * s), (0.0, -66.0 * s, 0.0), 15.0 * s, 3.0 * s, r2=11.0 * s, round=1.5)],
            [],
            0,
            cortical,
            cancellous * 1.2,
            cortical_mm,
        ),
    ]
    # The skull base beside and above the atlas. On real CT it is the densest and widest bone at the top of the
    # column: petrous pyramids running from the mastoids to the clivus, mastoid processes of air cells reaching
    # down beside C1, the jugular processes joining the condyles to them, a clivus 10-15 mm thick. A thin bowl with
    # two bars was the largest difference from the real necks at the top of the column (docs/real_ct.md, session
    # 18), so its bulk is drawn large and varied (``base``: 0.85-1.3).
    base = float(rng.uniform(0.85, 1.3))
    base_bones: list[Primitive] = [  # petrous pyramids: dense wedges from the mastoids to the clivus
        Bar(
            (side * 48.0 * s, 16.0 * s, fm_w + 8.0 * s),
            (side * 11.0 * s, -16.0 * s, fm_w + 22.0 * s),
            10.0 * s * base,
            10.0 * s * base,
            r2=5.0 * s * base,
            hh2=6.0 * s * base,
            round=2.0,
        )
        for side in (-1.0, 1.0)
    ]
    base_bones += [  # jugular processes: condyle to mastoid, just above the atlas's lateral masses
        Bar(
            (side * 14.0 * s, 6.0 * s, fm_w + 1.0 * s),
            (side * 42.0 * s, 14.0 * s, fm_w + 3.0 * s),
            6.0 * s * base,
            5.0 * s * base,
            round=2.0,
        )
        for side in (-1.0, 1.0)
    ]
    base_bones.append(  # the basi-occiput and clivus, from the front of the foramen magnum up to the dorsum sellae
        Bar((0.0, -1.0 * s, fm_w + 3.0 * s), (0.0, -25.0 * s, fm_w + 32.0 * s), 12.0 * s * base, 7.0 * s, r2=9.0 * s)
    )
    density = float(rng.uniform(1.15, 1.6))
    parts.append(Part("skull base", skull, base_bones, [], 0, cortical * density, cancellous * 3.0, cortical_mm * 2.5))
    # Mastoid processes: wide, with their tips beside C1's transverse processes, a cortical shell around air cells
    # (pneumatised to a random degree, which at a few mm reads anywhere from air to mottled bone).
    air_cells = float(rng.uniform(-700.0, 400.0))
    mastoid: list[Primitive] = [
        Ellipsoid((side * 48.0 * s, 12.0 * s, 19.0 * s), (11.0 * s * base, 13.0 * s * base, 17.0 * s))
        for side in (-1.0, 1.0)
    ]
    parts.append(Part("mastoids", skull, mastoid, [], 0, cortical * 1.2, air_cells, 2.0 * s))
    parts.append(  # the sphenoid sinus in front of the clivus
        Part(
            "sphenoid sinus",
            skull,
            [Ellipsoid((0.0, -36.0 * s, fm_w + 34.0 * s), (13.0 * s, 10.0 * s, 10.0 * s))],
            [],
            0,
            -950.0,
            -950.0,
            0.0,
            tissue=TISSUES["airway"],
        )
    )
    # The occipital bone closes a ring around the foramen magnum, with the condyles below its front half: on an
    # axial slice a ring over the atlas, as on real CT.
    ring, rim_h = float(rng.uniform(1.0, 1.25)), float(rng.uniform(4.0, 9.0))
    rim: list[Primitive] = [
        Body((0.0, 14.5 * s, fm_w + 4.0 * s), 22.0 * s * ring, 25.0 * s * ring, rim_h * s, round=3.0)
    ]
    condyle_w = (atlas_top + 6.0) * s
    rim += [Ellipsoid((side * 13.0 * s, 4.0 * s, condyle_w), (8.0 * s, 12.0 * s, 5.0 * s)) for side in (-1.0, 1.0)]
    fm_hole = Body((0.0, 14.5 * s, fm_w + 4.0 * s), 15.0 * s, 17.5 * s, rim_h * s + 2.0, round=2.0)
    parts.append(
        Part("foramen magnum rim", skull, rim, [fm_hole], 0, cortical * 1.05, cancellous * 1.4, cortical_mm * 1.4)
    )
    parts += skull_base_clutter(rng, skull, s, fm_w, cortical, cortical_mm, atlas_top)
    enamel = float(rng.uniform(1800, 2600))
    upper = _arch([(25.0, -46.0), (21.0, -60.0), (12.0, -69.0), (0.0, -72.0)], 7)
    lower = _arch([(41.0, -46.0), (26.0, -68.0), (0.0, -76.0)], 7)
    teeth: dict[str, tuple[Frame, list[tuple[float, float, float]]]] = {
        "upper teeth": (skull, [(side * u * s, v * s, -7.0 * s) for side in (-1.0, 1.0) for u, v in upper]),
        "lower teeth": (
            jaw_frame,
            [(side * u * 0.9 * s, v * 0.95 * s, jaw + 7.0 * s) for side in (-1.0, 1.0) for u, v in lower],
        ),
    }
    n_metal = int(rng.choice([0, 0, 0, 1, 2, 3, 4]))
    all_teeth = [(name, i) for name, (_, pts) in teeth.items() for i in range(len(pts))]
    metal_idx = {all_teeth[int(k)] for k in rng.choice(len(all_teeth), size=n_metal, replace=False)}
    metal: list[tuple[float, float, float]] = []
    for name, (frame, pts) in teeth.items():
        prims: list[Primitive] = [Ellipsoid(p, (3.2 * s, 3.6 * s, 4.8 * s)) for p in pts]
        parts.append(Part(name, frame, prims, [], 0, enamel, enamel * 0.75, 1.0))
        for i, p in enumerate(pts):
            if (name, i) in metal_idx:
                parts.append(
                    Part("dental metal", frame, [Ellipsoid(p, (2.6 * s, 2.6 * s, 2.4 * s))], [], 0, 8000.0, 8000.0, 0.0)
                )
                w = frame.to_world(p)
                metal.append((float(w[0]), float(w[1]), float(w[2])))
    return parts, metal, {"head_size": size, "dental_metal": float(n_metal), "skull_base": base}


def skull_base_clutter(
    rng: np.random.Generator,
    skull: Frame,
    s: float,
    fm_w: float,
    cortical: float,
    cortical_mm: float,
    atlas_top: float = C1_MASS_HALF_HEIGHT,
) -> list[Part]:
    """3-10 bony blobs of random size, place and density in the skull base, above the atlas and off the foramen
    magnum (and beside C1's transverse processes, where the mastoid tips reach down).

    Why: domain randomisation of the skull base's shape (SynthSeg's lesson). A segmenter that has seen one skull
    base shape names as the atlas whatever real bone sits at the top of the column; with the skull base varied
    beyond what real ones vary, the atlas must be told by its place on C2 and around the dens.
    """
    blobs: list[Primitive] = []
    for _ in range(int(rng.integers(3, 11))):
        r = rng.uniform(3.0, 11.0, size=3)
        u, v = float(rng.uniform(-58.0, 58.0)), float(rng.uniform(-32.0, 32.0))
        if math.hypot(u, v - 14.5) < 17.0 + max(r[0], r[1]):
            continue  # the foramen magnum stays open
        # above the atlas, lower only beside its transverse processes
        floor = -8.0 if abs(u) - r[0] > 42.0 else atlas_top + 4.5
        w = float(rng.uniform(floor + r[2], fm_w / s + 35.0))
        blobs.append(Ellipsoid((u * s, v * s, w * s), (r[0] * s, r[1] * s, r[2] * s)))
    dense, inner = float(rng.uniform(0.7, 1.5)), float(rng.uniform(150.0, 1000.0))
    if not blobs:
        return []
    return [Part("skull base clutter", skull, blobs, [], 0, cortical * dense, inner, cortical_mm * 2.0)]


def draw_junction(rng: np.random.Generator) -> Junction:
    """Atlas and axis proportions drawn well beyond the adult mean: lateral masses 0.8-1.6 x as tall (the
    foramen magnum and the condyles rise with them), arches 0.55-1.6 x as thick, the dens 2-8 mm above the
    atlas's centre.

    Why: on a real neck at 3-5 mm the generated-data segmenter named the atlas "C2"; one fixed atlas lets it learn
    the atlas's look, a varied one only its place (SynthSeg's lesson). Alone it did not move that real neck's
    names (docs/real_ct.md, session 19).
    """
    height = float(rng.uniform(0.8, 1.6))
    top = C1_MASS_HALF_HEIGHT * height  # the lateral masses' top above C1's centre: Junction.atlas_top
    lift = top + float(rng.uniform(3.5, 6.0))  # the C1-C2 joint stays 1.5-4 mm open
    return Junction(
        lateral_mass=(float(rng.uniform(0.85, 1.35)), float(rng.uniform(0.85, 1.3)), height),
        ring=float(rng.uniform(0.92, 1.15)),
        anterior_arch=float(rng.uniform(0.8, 1.6)),
        posterior_arch=float(rng.uniform(0.55, 1.5)),
        transverse=float(rng.uniform(0.7, 1.25)),
        lift_mm=lift,
        dens_mm=lift + float(rng.uniform(2.0, 8.0)),
        dens_width=float(rng.uniform(0.85, 1.2)),
        foramen_mm=top + float(rng.uniform(6.0, 11.0)),
    )


def shifted(frame: Frame, up: float, forward: float = 0.0) -> Frame:
    """The frame moved ``up`` mm along its w axis and ``forward`` mm anteriorly (along -v)."""
    return Frame(frame.centre + frame.R[:, 2] * up - frame.R[:, 1] * forward, frame.R)


def neighbour_frames(
    rng: np.random.Generator, frames: dict[str, Frame], s: float
) -> tuple[Frame, Frame, dict[str, float]]:
    """Frames of the mandible and the hyoid, moved off C2 and C3: in real CT the mandible hangs from the skull, so
    head extension (a radiotherapy mask) lifts it to C1 and flexion drops it to C3, and the hyoid rides between C2
    and C4. A segmenter that named levels by what lies in front of them would count wrong on such necks."""
    lift = float(rng.uniform(-8.0, 26.0)) * s
    forward = float(rng.uniform(-4.0, 10.0)) * s
    hyoid = float(rng.uniform(-10.0, 12.0)) * s
    shifts = {"jaw_lift_mm": lift, "jaw_forward_mm": forward, "hyoid_lift_mm": hyoid}
    return shifted(frames["C2"], lift, forward), shifted(frames["C3"], hyoid), shifts


def larynx_parts(rng: np.random.Generator, frames: dict[str, Frame], s: float) -> list[Part]:
    """Thyroid cartilage (a V open posteriorly, C4-C6) and cricoid ring (C6), calcified to a random degree, a
    level higher or lower from one neck to the next."""
    hu = float(rng.uniform(80, 500))
    up = float(rng.uniform(-12.0, 12.0)) * s
    moved = {k: shifted(frames[k], up) for k in ("C5", "C6")}
    thyroid: list[Primitive] = []
    for side in (-1.0, 1.0):
        thyroid.append(
            Bar(
                (side * 2.0 * s, -40.0 * s, 4.0 * s),
                (side * 17.0 * s, -26.0 * s, 4.0 * s),
                1.1 * s,
                11.0 * s,
                round=0.8,
            )
        )
    ring = [(11.0 * math.cos(a) * s, -28.0 * s + 11.0 * math.sin(a) * s) for a in np.linspace(0, 2 * math.pi, 13)]
    cricoid: list[Primitive] = [
        Bar((p[0], p[1], 0.0), (q[0], q[1], 0.0), 1.3 * s, (3.0 if q[1] < -28.0 * s else 7.0) * s, round=0.8)
        for p, q in itertools.pairwise(ring)
    ]
    return [
        Part("thyroid cartilage", moved["C5"], thyroid, [], 0, hu + 150.0, hu, 0.8),
        Part("cricoid cartilage", moved["C6"], cricoid, [], 0, hu + 150.0, hu, 0.8),
    ]


def rib_parts(frames: dict[str, Frame], s: float, cortical: float, cancellous: float, cortical_mm: float) -> list[Part]:
    """Ribs T3-T10: T2's curve widened and dropped more steeply down the chest."""
    base = [(31.0, 12.0), (46.0, 14.0), (64.0, -4.0), (71.0, -34.0), (66.0, -64.0), (50.0, -84.0)]
    parts = []
    for k in range(3, 11):
        f = min(1.0 + 0.11 * (k - 2), 1.6)
        pts = [(base[0][0], base[0][1])] + [(u * f, v * (0.9 + 0.1 * f)) for u, v in base[1:]]
        drop = 36.0 + 9.0 * (k - 2)
        rib = rib_bars(pts, drop, s, 5.5)
        parts.append(Part(f"ribs T{k}", frames[f"T{k}"], rib, [], 0, cortical * 0.9, cancellous, cortical_mm))
    return parts


def shoulder_parts(
    t1: Frame, s: float, half_width: float, cortical: float, cancellous: float, cortical_mm: float
) -> list[Part]:
    """Humeral heads and shafts (arms down) and scapulae (blade, spine, glenoid) in T1's frame; ``half_width`` is
    the shoulders' soft-tissue half width (mm), which places the humeral heads."""
    hw = half_width - 32.0
    prims: list[Primitive] = []
    for side in (-1.0, 1.0):
        prims += [
            Ellipsoid((side * hw, 5.0 * s, -5.0 * s), (22.0 * s, 22.0 * s, 24.0 * s)),  # humeral head
            Bar((side * hw, 5.0 * s, -110.0 * s), (side * hw, 5.0 * s, -110.0 * s), 11.0 * s, 90.0 * s, round=3.0),
            Bar((side * 45.0 * s, 62.0 * s, -40.0 * s), (side * (hw - 15.0), 30.0 * s, -40.0 * s), 2.5 * s, 50.0 * s),
            Bar((side * 55.0 * s, 66.0 * s, 5.0 * s), (side * (hw - 10.0), 25.0 * s, 15.0 * s), 4.0 * s, 4.0 * s),
            Ellipsoid((side * (hw - 24.0), 10.0 * s, -5.0 * s), (8.0 * s, 12.0 * s, 14.0 * s)),  # glenoid
        ]
    return [Part("shoulders", t1, prims, [], 0, cortical, cancellous, cortical_mm * 1.3)]


def couch_tubes(rng: np.random.Generator, x: float, y_back: float, z_range: tuple[float, float]) -> list[Tube]:
    """The scanner couch under the patient's back (drawn first, so the patient paints over it): a thin curved top
    plate and, a few centimetres lower, its base; each the lower arc of a wide ring, air inside (the rest of the
    ring lies outside any field of view)."""
    tubes = []
    r = float(rng.uniform(350, 700))  # curvature radius of the top (flat-ish to cradle-shaped)
    y = y_back + float(rng.uniform(0, 6))
    hu = float(rng.uniform(-300, 200))
    z = np.array(z_range)
    top, base = ("couch", 0.0, float(rng.uniform(2, 5))), ("couch base", float(rng.uniform(25, 60)), 3.0)
    for name, dy, th in (base, top):  # the base first: the top's air inside would erase it
        c = y + dy + th - r
        tubes.append(
            Tube(
                name,
                z,
                np.full(2, x),
                np.full(2, c),
                np.full(2, r),
                np.full(2, r),
                np.full(2, r),
                hu,
                inner=(th, -1000.0),
                z_range=z_range,
                tissue=TISSUES["air"],
                inner_tissue=TISSUES["air"],
            )
        )
    return tubes


def trunk_tubes(
    rng: np.random.Generator,
    frames: dict[str, Frame],
    skull: Frame,
    s: float,
    fm_w: float,
    jaw: float,
    habitus: float,
    jaw_frame: Frame,
) -> list[Tube]:
    """Face (around the mandible and teeth, in ``jaw_frame``), head outline (an ellipsoid closing at the vertex),
    lungs T1-T11, liver T10-L2."""
    tubes = []
    chin = jaw_frame.to_world((0.0, -48.0 * s, jaw - 16.0 * s))
    top = skull.to_world((0.0, -45.0 * s, fm_w + 45.0 * s))
    low = min(
        jaw_frame.to_world((u * s, v * s, jaw - 24.0 * s))[2] for u, v in ((0.0, -80.0), (46.0, -16.0), (-46.0, -16.0))
    )
    zf = np.array([low, (chin[2] + top[2]) / 2, top[2]])
    fat = float(rng.uniform(-110, -70))
    tubes.append(
        Tube(
            "face",
            zf,
            np.array([chin[0], (chin[0] + top[0]) / 2, top[0]]),
            np.array([chin[1], (chin[1] + top[1]) / 2, top[1]]),
            np.array([48.0, 58.0, 62.0]) * s * max(habitus, 0.9),
            np.array([42.0, 48.0, 48.0]) * s * max(habitus, 0.9),
            np.array([40.0, 45.0, 45.0]) * s,
            fat,
            inner=(float(rng.uniform(3.0, 8.0)), 40.0),
            z_range=(float(zf[0]), float(zf[-1])),
            tissue=TISSUES["fat"],
        )
    )
    c = skull.to_world((0.0, 10.0 * s, fm_w + 62.0 * s))
    rz, rx, ry = 70.0 * s + 7.0, 68.0 * s + 6.0, 88.0 * s + 7.0
    z0 = float(skull.to_world((0.0, 0.0, fm_w))[2])
    z = np.linspace(z0, float(c[2]) + rz, 24)
    t = np.clip((z - c[2]) / rz, 0.0, 0.999)
    k = np.sqrt(1.0 - t * t)
    tubes.append(
        Tube(
            "head",
            z,
            np.full_like(z, c[0]),
            np.full_like(z, c[1]),
            rx * k,
            ry * k,
            ry * k,
            fat,
            inner=(float(rng.uniform(2.5, 5.0)), 40.0),
            z_range=(z0, float(z[-1])),
            tissue=TISSUES["fat"],
        )
    )
    levels = [f"T{i}" for i in range(1, 12)]
    zc = np.array([frames[v].centre[2] for v in levels])[::-1]
    bx = np.array([frames[v].centre[0] for v in levels])[::-1]
    by = np.array([frames[v].centre[1] for v in levels])[::-1]
    prof = np.array([0.35, 0.6, 0.8, 0.92, 1.0, 1.0, 1.0, 0.95, 0.85, 0.6, 0.3])[::-1]
    zc = np.concatenate([zc, [zc[-1] + 15.0]])
    bx, by, prof = np.append(bx, bx[-1]), np.append(by, by[-1]), np.append(prof, 0.2)
    lung_hu = float(rng.uniform(-880, -790))
    for side in (-1.0, 1.0):
        tubes.append(
            Tube(
                "lung",
                zc,
                bx + side * (22.0 + 45.0 * prof) * s,
                by - 22.0 * s,
                50.0 * prof * s,
                62.0 * prof * s,
                58.0 * prof * s,
                lung_hu,
                z_range=(float(zc[0]), float(zc[-1])),
                tissue=TISSUES["lung"],
            )
        )
    zl = np.array([frames[v].centre[2] for v in ("L2", "T12", "T10")])
    xl = np.array([frames[v].centre[0] for v in ("L2", "T12", "T10")])
    yl = np.array([frames[v].centre[1] for v in ("L2", "T12", "T10")])
    tubes.append(
        Tube(
            "liver",
            zl,
            xl - 55.0 * s,
            yl - 45.0 * s,
            np.array([40.0, 75.0, 70.0]) * s,
            np.array([45.0, 70.0, 65.0]) * s,
            np.array([35.0, 55.0, 50.0]) * s,
            float(rng.uniform(50, 70)),
            z_range=(float(zl[0]), float(zl[-1])),
        )
    )
    return tubes
