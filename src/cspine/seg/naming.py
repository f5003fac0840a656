"""Name the levels by anatomy: the first vertebra under the cranial cavity is C1, the one under C6 is C7.

Why: the coarse network names levels by what it learned from generated necks. On a real head-and-neck CT
(OpenKBP pt2) every segmenter trained here took the skull base above the atlas for "C1", named the atlas "C2" and
every level below one too low; the generator changes of sessions 11-21 did not move it, and which reading the
network gives even depends on where its stride grid falls (docs/real_ct.md). A radiologist does not count that
way: the atlas is by definition the first vertebra under the foramen magnum, where the canal leaves the cranial
cavity. That needs no network, only the skull, so it is checked here on the image:

- **The cranial cavity's floor over the column** (:func:`cavity_floor`): going up from the column, the lowest
  axial slice where a region of brain density (``cavity_hu``) and of at least ``min_cavity_mm2``, enclosed by bone
  (gaps of up to 2 x ``close_mm`` bridged, as a coarse scan leaves them in a thin skull), comes within ``axis_mm``
  of the column's axis, with another such slice within ``run_mm`` above it. The posterior fossa is that region;
  the canal under it (a vertebra's ring, under 800 mm2) and the neck's soft tissue (not enclosed) are not. It lies
  a few mm to a centimetre above the foramen magnum on the two real necks here (docs/real_ct.md, session 22).
- **Nothing labelled above that floor is a vertebra**: such a label is skull base and is cleared.
- **A level right under the floor is the atlas**: when the highest level left lies less than ``atlas_mm`` under the
  floor and is not named C1, the column is renamed from it (that level C1, the next C2, ...). The atlas's centroid
  lies 5-15 mm under the foramen magnum and the axis's 25-35 mm, so ``atlas_mm`` tells them apart.
- **The vertebra under C6 is C7** (with or without a skull): when the column's names stop before C7 while the
  network's "other vertebra" class holds a vertebra right under the last named level (it took it for T1: on
  OpenKBP pt2 once the atlas is C1, and at some of the network's grid phases), the largest piece of "other" a
  level's step under that level, near the column's axis, takes the next name. A lowest level lying much more than
  a step under the one above it is not the next level but a vertebra further down, and becomes "other".

A CT with no skull in view, or one whose top level already is C1 under the floor, keeps the network's names above.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cspine.io.volume import Volume
from cspine.labels import label_name
from cspine.seg.config import OTHER_VALUE
from cspine.seg.grid import GridMap, make_gridmap
from cspine.seg.postprocess import label_box


@dataclass(frozen=True)
class NamingConfig:
    """Limits for finding the cranial cavity's floor, naming the atlas from it, and taking the next level from
    "other vertebra" (why each: the module doc).

    Attributes:
        bone_hu: bone, for the cavity's wall (a thin skull at 4-5 mm pixels still reads several hundred HU).
        close_mm: gaps in the wall up to twice this are bridged (foramina, partial volume).
        min_cavity_mm2: smallest enclosed area that counts as cranial cavity (the atlas's canal is under 800 mm2).
        cavity_hu: mean HU range of the enclosed region (brain; excludes air-filled sinuses and lung).
        axis_mm: the cavity must come this close (in-plane) to the column's axis.
        run_mm, run_hits: the floor is a slice with cavity that has this many (itself included) within this far
            above it: one slice alone may be a chance enclosure, and at 4-5 mm pixels the thin occipital wall
            closes only in some slices of the posterior fossa.
        atlas_mm: a highest level whose centroid lies less than this under the floor is the atlas.
        box_mm: half-width of the in-plane box around the axis searched for the cavity (the posterior fossa is
            about 110 mm wide).
        above_mm: how far the search for the floor goes up from the second-highest level's centroid.
        grid_mm: in-plane and slice step of the search (bone is max-pooled to it, so thin walls survive).
        min_next_ml: a piece of "other vertebra" smaller than this does not become the next level, and a level
            smaller than this does not count as named (fragments).
        next_radius_mm: the next level is looked for this close (in-plane) to the column's axis carried on from
            the last two levels (a lower cervical vertebra reaches about 30 mm out to its transverse processes).
        max_gap_steps: a lowest level further under the one above it than this many of the step above is a
            vertebra further down, not the next level (the network put "C7" on T2 at some grid phases).
    """

    bone_hu: float = 200.0
    close_mm: float = 6.0
    min_cavity_mm2: float = 1200.0
    cavity_hu: tuple[float, float] = (-20.0, 100.0)
    axis_mm: float = 20.0
    run_mm: float = 10.0
    run_hits: int = 2
    atlas_mm: float = 20.0
    box_mm: float = 100.0
    above_mm: float = 80.0
    grid_mm: float = 2.0
    min_next_ml: float = 1.0
    next_radius_mm: float = 30.0
    max_gap_steps: float = 1.6


@dataclass(frozen=True)
class _Level:
    height: float  # mm along the canonical superior axis
    yx: np.ndarray  # in-plane centroid (mm, canonical posterior / left axes)
    ml: float


def _levels(cbox: np.ndarray, corner: np.ndarray, spacing: np.ndarray) -> dict[int, _Level]:
    """Centroid and volume of each C1..C7 label of ``cbox`` (a canonical view of the mask's box whose first voxel
    is canonical index ``corner``), in canonical mm."""
    idx = np.nonzero((cbox >= 1) & (cbox <= 7))
    lab = cbox[idx]
    count = np.bincount(lab, minlength=8)
    sums = np.array([np.bincount(lab, weights=i, minlength=8) for i in idx]).T  # (value, axis)
    out: dict[int, _Level] = {}
    for v in np.flatnonzero(count):
        mm = (sums[v] / count[v] + corner) * spacing
        out[int(v)] = _Level(float(mm[0]), mm[1:], float(count[v] * np.prod(spacing) / 1000.0))
    return out


def _canonical_corner(box: tuple[slice, ...], gm: GridMap) -> np.ndarray:
    """Canonical index of the first voxel of ``gm.to_canonical(mask[box])``."""
    axes = enumerate(zip(gm.perm, gm.flip, strict=True))
    return np.array([gm.shape[a] - box[p].stop if flip else box[p].start for a, (p, flip) in axes])


def _block(a: np.ndarray, f: tuple[int, int], how: str) -> np.ndarray:
    """Max- or mean-pool the last two axes by integer factors (the edge remainder is dropped)."""
    h, w = a.shape[-2] // f[0] * f[0], a.shape[-1] // f[1] * f[1]
    b = a[..., :h, :w].reshape(*a.shape[:-2], h // f[0], f[0], w // f[1], f[1])
    return b.max(axis=(-3, -1)) if how == "max" else b.mean(axis=(-3, -1))


def cavity_floor(
    chu: np.ndarray, spacing: np.ndarray, axis_yx: np.ndarray, from_mm: float, cfg: NamingConfig
) -> float | None:
    """Height (mm, canonical) of the cranial cavity's floor over ``axis_yx``, searched upwards from ``from_mm``.

    ``chu``: HU in canonical orientation (superior, posterior, left axes); ``spacing`` its voxel size (mm). None
    when no cavity is found (no skull in view).
    """
    f = (max(1, round(cfg.grid_mm / spacing[1])), max(1, round(cfg.grid_mm / spacing[2])))
    px = spacing[1:] * np.asarray(f)
    centre = axis_yx / spacing[1:]
    half = cfg.box_mm / spacing[1:]
    lo = np.maximum(np.floor(centre - half), 0).astype(int)
    hi = np.minimum(np.ceil(centre + half), chu.shape[1:]).astype(int)
    if np.any(hi - lo < 2 * np.asarray(f)):
        return None
    axis = (axis_yx / spacing[1:] - lo) / np.asarray(f)
    step = max(1, round(cfg.grid_mm / spacing[0]))
    z0 = max(0, int(np.floor(from_mm / spacing[0])))
    z1 = min(chu.shape[0], int(np.ceil((from_mm + cfg.above_mm) / spacing[0])) + 1)
    radius = max(1, round(cfg.close_mm / float(px.min())))
    disk = ndimage.iterate_structure(ndimage.generate_binary_structure(2, 1), radius)
    yy, xx = np.mgrid[0 : (hi[0] - lo[0]) // f[0], 0 : (hi[1] - lo[1]) // f[1]]
    near = np.hypot((yy - axis[0]) * px[0], (xx - axis[1]) * px[1]) <= cfg.axis_mm
    zs = range(z0, z1, step)
    px_mm2 = float(np.prod(px))
    hits = np.array([_cavity_near(chu[z, lo[0] : hi[0], lo[1] : hi[1]], f, px_mm2, disk, near, cfg) for z in zs])
    run = max(1, round(cfg.run_mm / (step * spacing[0]))) + 1
    for i, z in enumerate(zs):
        if hits[i] and hits[i : i + run].sum() >= cfg.run_hits:
            return float(z * spacing[0])
    return None


def _cavity_near(
    plane: np.ndarray, f: tuple[int, int], px_mm2: float, disk: np.ndarray, near: np.ndarray, cfg: NamingConfig
) -> bool:
    """Does a region of brain density enclosed by bone, large enough for the cranial cavity, reach ``near``? (``near``
    and ``disk`` are on the plane pooled by ``f``, whose pixels are ``px_mm2`` in area.)"""
    plane = np.asarray(plane, dtype=np.float32)
    wall = ndimage.binary_closing(_block(plane > cfg.bone_hu, f, "max"), disk)
    cavity = ndimage.binary_fill_holes(wall) & ~wall
    parts, _ = ndimage.label(cavity)
    touching = np.unique(parts[near & cavity])
    if not len(touching):
        return False
    hu = _block(plane, f, "mean")
    for k in touching:
        part = parts == k
        if part.sum() * px_mm2 >= cfg.min_cavity_mm2 and cfg.cavity_hu[0] <= hu[part].mean() <= cfg.cavity_hu[1]:
            return True
    return False


def name_levels(
    mask: np.ndarray, vol: Volume, cfg: NamingConfig | None = None, box: tuple[slice, ...] | None = None
) -> list[str]:
    """Rename ``mask``'s C1..C7 in place by anatomy (the module doc); the changes, in words.

    ``box``: the box of the mask's nonzero voxels when the caller has it (the centroids and relabelling run on it).
    """
    cfg = cfg or NamingConfig()
    box = box or label_box(mask)
    if box is None:
        return []
    sub = mask[box]
    gm = make_gridmap(vol.shape, vol.affine, (1.0, 1.0, 1.0))
    spacing = np.asarray(gm.spacing, dtype=np.float64)
    levels = _levels(gm.to_canonical(sub), _canonical_corner(box, gm), spacing)
    if len(levels) < 2:
        return []
    lut = np.arange(256, dtype=mask.dtype)
    changes = _from_skull(gm.to_canonical(vol.array), spacing, levels, lut, cfg)
    if changes:
        sub[...] = lut[sub]
        levels = {int(lut[v]): lv for v, lv in levels.items() if lut[v]}
    named = sorted(v for v, lv in levels.items() if lv.ml >= cfg.min_next_ml)
    if len(named) >= 3 and named[-1] - named[-3] == 2:
        a, b, c = (levels[v] for v in named[-3:])
        if b.height - c.height > cfg.max_gap_steps * (a.height - b.height):
            sub[sub == named[-1]] = OTHER_VALUE
            changes.append(
                f"{label_name(named[-1])} is other vertebra: it lies {b.height - c.height:.0f} mm under "
                f"{label_name(named[-2])}, over {cfg.max_gap_steps:g} of the column's steps (a vertebra further down)"
            )
            named.pop()
    if named and named[-1] < 7 and named[-1] - 1 in levels:
        last = named[-1]
        changes += _next_from_other(gm.to_canonical(mask), spacing, levels[last - 1], levels[last], last + 1, cfg)
    return changes


def _from_skull(
    chu: np.ndarray, spacing: np.ndarray, levels: dict[int, _Level], lut: np.ndarray, cfg: NamingConfig
) -> list[str]:
    """Skull-base labels cleared and the column renamed from the atlas, written into ``lut`` (value -> new value)."""
    top = sorted(levels, key=lambda v: -levels[v].height)[:2]
    axis = np.mean([levels[v].yx for v in top], axis=0)
    floor = cavity_floor(chu, spacing, axis, levels[top[1]].height, cfg)
    if floor is None:
        return []
    changes = []
    below = {}
    for v, lv in levels.items():
        if lv.height > floor:
            lut[v] = 0
            changes.append(
                f"{label_name(v)} removed: it lies {lv.height - floor:.0f} mm above the floor of the cranial "
                "cavity (skull base, not a vertebra)"
            )
        else:
            below[v] = lv
    if not below or min(below) == 1 or floor - below[min(below)].height >= cfg.atlas_mm:
        return changes
    shift = min(below) - 1
    for v in below:
        lut[v] = v - shift
    names = sorted(below)
    changes.append(
        f"levels renamed from the skull: the highest lies {floor - below[names[0]].height:.0f} mm under the floor "
        f"of the cranial cavity, so it is C1 (the network's {label_name(names[0])}..{label_name(names[-1])} are "
        f"{label_name(names[0] - shift)}..{label_name(names[-1] - shift)})"
    )
    return changes


def _next_from_other(
    cmask: np.ndarray, spacing: np.ndarray, upper: _Level, last: _Level, value: int, cfg: NamingConfig
) -> list[str]:
    """The largest piece of "other vertebra" one level's step under the last named level (``last``, with the level
    ``upper`` above it giving the step), near the column's axis, becomes level ``value``."""
    step = upper.height - last.height
    if step <= 0:
        return []
    centre = last.yx + (last.yx - upper.yx)
    z_lo = max(0, int(np.floor((last.height - 1.5 * step) / spacing[0])))
    z_hi = max(0, int(np.ceil((last.height - 0.5 * step) / spacing[0])))
    view = cmask[z_lo:z_hi]
    yy, xx = np.ogrid[0 : view.shape[1], 0 : view.shape[2]]
    near = np.hypot(yy * spacing[1] - centre[0], xx * spacing[2] - centre[1]) <= cfg.next_radius_mm
    pieces, n = ndimage.label((view == OTHER_VALUE) & near[None])
    if not n:
        return []
    sizes = ndimage.sum(pieces > 0, pieces, range(1, n + 1))
    ml = float(sizes.max() * np.prod(spacing) / 1000.0)
    if ml < cfg.min_next_ml:
        return []
    view[pieces == 1 + int(np.argmax(sizes))] = value
    return [f"{label_name(value)} taken from the other-vertebra label under {label_name(value - 1)} ({ml:.1f} ml)"]
