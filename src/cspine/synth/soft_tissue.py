"""Soft tissues of the neck, slice by slice: outline, fat, muscle, spinal canal, vessels, thyroid and airway.

Part of :func:`cspine.synth.anatomy.build_anatomy`: each tissue is a :class:`~cspine.synth.parts.Tube` whose
centre and radii are interpolated along z from the vertebrae's frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cspine.synth.parts import TISSUES, Tube
from cspine.synth.shapes import Frame
from cspine.synth.vertebrae import LEVELS, canal_v
from cspine.synth.wide import LOWER_ORDER


@dataclass
class Neck:
    """The neck's tubes and what the rest of the anatomy reads from the outline (z samples, body centre x,
    neck centre and back radius y, base half-width ``rx0``, foramen magnum point ``fm``), and the drawn
    tissue parameters."""

    tubes: list[Tube]
    params: dict[str, float]
    zz: np.ndarray
    bx: np.ndarray
    ncy: np.ndarray
    ryb: np.ndarray
    rx0: float
    fm: np.ndarray


def smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def round_tube(name: str, zz: np.ndarray, x: np.ndarray, y: np.ndarray, rx: float, ry: float, hu: float, **kw) -> Tube:
    """A tube of constant radii (``ry`` front and back) along the neck."""
    return Tube(name, zz, x, y, np.full_like(zz, rx), np.full_like(zz, ry), np.full_like(zz, ry), hu, **kw)


def soft_tissues(
    rng: np.random.Generator,
    frames: dict[str, Frame],
    skull: Frame,
    s: float,
    fm_w: float,
    habitus: float,
    wide: bool,
) -> Neck:
    """Sample the soft tissues around the posed spine (``wide``: down to the lower thoracic levels)."""
    params: dict[str, float] = {}
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
    shoulder = smoothstep((z_c6 - zz) / max(z_c6 - z_t2, 1.0))
    head = smoothstep((zz - z_c1) / 40.0)
    chin = smoothstep((zz - (z_c3 - 5.0)) / 25.0)
    rx = rx0 + 95.0 * shoulder + 12.0 * head
    ryb = ryb0 + 12.0 * shoulder + 20.0 * head
    ryf = ryf0 + 14.0 * shoulder + 40.0 * chin
    if wide:  # the chest deepens below the shoulders (sternum 10-13 cm in front of the spine)
        ryf = ryf + float(rng.uniform(45, 80)) * habitus * smoothstep((z_t2 - zz) / 60.0)
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
        round_tube(
            "canal",
            zz,
            cnx,
            cny,
            10.5 * s,
            7.0 * s,
            float(rng.uniform(5, 20)),
            inner=(3.8 * s, float(rng.uniform(30, 40))),
            tissue=TISSUES["canal"],
            inner_tissue=TISSUES["canal"],
        )
    )
    contrast = bool(rng.random() < 0.2)
    params["contrast"] = float(contrast)
    art, ven = (float(rng.uniform(200, 400)), float(rng.uniform(120, 200))) if contrast else (45.0, 40.0)
    vessels = (("carotid", 12, 7, 3.4, 3.4, art), ("jugular", 21, 10, 5.5, 4.5, ven))  # name, dx, dy (mm), radii, HU
    for side in (-1.0, 1.0):
        for name, dx, dy, rx, ry, hu in vessels:
            x = bx + side * (air_rx + dx * s)
            tubes.append(round_tube(name, zz, x, air_y + dy * s, rx * s, ry * s, hu, tissue=TISSUES["vessel"]))
        tubes.append(
            round_tube(
                "thyroid",
                zz,
                bx + side * (air_rx + 3 * s),
                air_y - 1 * s,
                7.0 * s,
                8.0 * s,
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

    return Neck(tubes, params, zz, bx, ncy, ryb, rx0, fm)


__all__ = ["Neck", "round_tube", "smoothstep", "soft_tissues"]
