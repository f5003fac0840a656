"""Name the levels by anatomy: the first vertebra under the cranial cavity is C1, the one under C6 is C7.

Why: the coarse network names levels by what it learned from generated necks. On a real head-and-neck CT
(OpenKBP pt2) every segmenter trained here took the skull base above the atlas for "C1", named the atlas "C2" and
every level below one too low; the generator changes of sessions 11-21 did not move it, and which reading the
network gives even depends on where its stride grid falls (docs/real_ct.md). A radiologist does not count that
way: the atlas is by definition the first vertebra under the foramen magnum, where the canal leaves the cranial
cavity. That needs no network, only the skull, so it is checked here on the image:

- **A piece is part of its vertebra**: a small level lying close to a neighbour in the column is merged into it
  first (the network split a real atlas into a 2 ml "C1" over its "C2"; real neighbouring levels lie 11 mm and more
  apart), and so are two levels at one height (a vertebra split front from back), so that the rules below see
  vertebrae.
- **The cranial cavity's floor over the canal** (:func:`cavity_floor`): the foramen magnum is where the spinal
  canal opens into the posterior fossa. The canal is found in the second-highest level's slices (:func:`find_canal`:
  a small region enclosed by bone behind the level's centroid); going up from there, the floor is the lowest axial
  slice where a region of brain density (``cavity_hu``) and of at least ``min_cavity_mm2``, enclosed by bone, lies
  over the canal, with another such slice within ``run_mm`` above it. "Enclosed" is judged by rays: bone within
  reach in all but one of 16 directions, which sees over the gaps a coarse scan leaves in a thin occipital wall.
  The canal (a vertebra's ring, under 1000 mm2) and the neck's soft tissue (rays escape) are not cavity; nor is
  brain-density tissue that an occiput drawn down behind a tilted neck encloses behind C1 and C2 (not over the
  canal). The floor lies 3-15 mm above the foramen magnum on OpenKBP pt2 turned by up to 20 degrees in the scanner
  (docs/real_ct.md, session 23).
- **Nothing labelled above that floor is a vertebra**: such a label is skull base and is cleared, unless it lies
  only a few mm above it and holds a vertebra's volume (the atlas of a head tilted back: ``atlas_above_mm``); and
  the voxels of any level above the floor are cleared (the network's atlas reaches up into the skull base, on a
  head tilted back by 27-54 mm over the foramen magnum, which lifts its centroid over it).
- **A level right under the floor is the atlas**: when the highest level left lies less than ``atlas_mm`` under the
  floor and is not named C1, the column is renamed from it: that level C1, the next one down C2, and so on by
  height, whatever the network's numbers (it skips names on a real head CT ending in the axis). The atlas's
  centroid lies 9-24 mm under the floor on the real necks here (OpenKBP pt2 turned, the Slicer neck) and the
  axis's 35-55 mm, so ``atlas_mm`` tells them apart.
- **The vertebra under C6 is C7** (with or without a skull): when the column's names stop before C7 while the
  network's "other vertebra" class holds a vertebra right under the last named level (it took it for T1: on
  OpenKBP pt2 once the atlas is C1, and at some of the network's grid phases), the largest piece of "other" a
  level's step under that level, near the column's axis, takes the next name, and so on down to C7 (OpenKBP pt2
  tilted chin-down, its column renamed from the skull, ends at C5). A lowest level lying much more than a step
  under the one above it is not the next level but a vertebra further down, and becomes "other".

A CT with no skull in view, or one whose top level already is C1 under the floor, keeps the network's names above;
when its column reaches the top of the field of view, a warning says that those names could not be checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from itertools import pairwise

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
        rays, open_rays, reach_mm: a pixel is enclosed by bone when bone lies within ``reach_mm`` along all but
            ``open_rays`` of ``rays`` directions in its axial plane. A coarse scan leaves the thin posterior fossa's
            wall with gaps (foramina, partial volume) that a region fill would leak through; rays see over them.
        tissue_hu: a pixel of the cavity is neither bone nor air.
        min_cavity_mm2: smallest enclosed area that counts as cranial cavity (the atlas's canal is under 800 mm2).
        cavity_hu: mean HU range of the enclosed region (brain; excludes air-filled sinuses and lung).
        canal_mm2: area range of the canal, an enclosed region inside a vertebra's ring (20-400 mm2 of it are
            enclosed at the real necks' 3-5 mm pixels).
        canal_behind_mm, canal_reach_mm: the canal is the enclosed region whose centroid is nearest the point this
            far behind the level's centroid, and it lies within this of that point (a body's centroid is in front
            of the canal, a ring's in front of its centre).
        canal_slab_mm: the canal is looked for in the slices this close to the level's centroid.
        floor_mm: the cavity must come this close to the canal's centre carried straight up: where it opens over
            the canal is the foramen magnum. (The cavity's lowest part behind the canal, the occipital bone's
            inner table, moves up and down with the head's tilt in the scanner, and an occiput drawn down behind a
            flexed or extended neck encloses brain-density tissue behind C1 and C2, but not over the canal.)
        run_mm, run_hits: the floor is a slice with cavity that has this many (itself included) within this far
            above it: one slice alone may be a chance enclosure, and at 4-5 mm pixels the thin occipital wall
            closes only in some slices of the posterior fossa.
        atlas_mm: a highest level whose centroid lies less than this under the floor is the atlas.
        atlas_above_mm, atlas_ml: a label whose centroid lies less than ``atlas_above_mm`` above the floor and
            that holds at least ``atlas_ml`` is not skull base but a vertebra, the atlas: the floor is found a few
            mm above the foramen magnum, and with the head tilted back in the scanner the network's atlas rides up
            to it (the skull-base pieces the network labels are fragments of 2-6 ml).
        box_mm: half-width of the in-plane box around the canal searched for the cavity (the rays reach out of a
            posterior fossa about 110 mm wide).
        above_mm: how far the search for the floor goes up from the second-highest level's centroid.
        grid_mm: in-plane and slice step of the search (bone is max-pooled to it, so thin walls survive).
        min_next_ml: a piece of "other vertebra" smaller than this does not become the next level, and a level
            smaller than this does not count as named (fragments).
        next_radius_mm: the next level is looked for this close (in-plane) to the column's axis carried on from
            the last two levels (a lower cervical vertebra reaches about 30 mm out to its transverse processes).
        max_step_mm: two named levels further apart in height than this are not neighbours, and give no step to
            look for the next level by (neighbouring levels lie 11-30 mm apart; an untrained network's scattered
            labels gave steps spanning the whole volume).
        max_gap_steps: a lowest level further under the one above it than this many of the step above is a
            vertebra further down, not the next level (the network put "C7" on T2 at some grid phases).
        piece_share, piece_mm: a level (not the lowest) holding less than ``piece_share`` of the volume of its
            nearest neighbour in the column, whose centroid lies less than ``piece_mm`` from that neighbour's, is a
            piece of that vertebra (neighbouring levels' centroids lie 11-30 mm apart on the real necks here).
        same_height_mm: two levels (of any size, the lowest included, neither cut by the field of view) whose
            centroids lie less than this apart in height are one vertebra split front from back, named by the upper
            of the two names (the levels under it follow from it; the network split C6 so on OpenKBP pt2 tilted 20
            degrees chin-down in the scanner).
        skull_view_mm: with no floor found, a highest level reaching less than this under the top of the field of
            view has no skull in view to be named from, and the names are flagged as the network's own count: on
            OpenKBP pt2 cut 5 mm over the foramen magnum or lower the network's names were one or more levels off,
            its top level 0-3 mm under the cut (benchmarks/openkbp_variants.py); on generated necks whose floor is
            not found the column stops 11 mm or more under the top, and the network's names are right.
    """

    bone_hu: float = 200.0
    rays: int = 16
    open_rays: int = 1
    reach_mm: float = 80.0
    tissue_hu: tuple[float, float] = (-100.0, 150.0)
    min_cavity_mm2: float = 1200.0
    cavity_hu: tuple[float, float] = (-20.0, 100.0)
    canal_mm2: tuple[float, float] = (40.0, 1000.0)
    canal_behind_mm: float = 12.0
    canal_reach_mm: float = 15.0
    canal_slab_mm: float = 6.0
    floor_mm: float = 6.0
    run_mm: float = 10.0
    run_hits: int = 2
    atlas_mm: float = 25.0
    atlas_above_mm: float = 8.0
    atlas_ml: float = 10.0
    box_mm: float = 100.0
    above_mm: float = 80.0
    grid_mm: float = 2.0
    min_next_ml: float = 1.0
    next_radius_mm: float = 30.0
    max_gap_steps: float = 1.6
    max_step_mm: float = 40.0
    skull_view_mm: float = 10.0
    piece_share: float = 0.3
    piece_mm: float = 10.0
    same_height_mm: float = 6.0


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


@dataclass(frozen=True)
class _PlaneBox:
    f: tuple[int, int]  # pooling factors
    px: np.ndarray  # pooled pixel size (mm)
    lo: np.ndarray  # first in-plane index of the box (unpooled)
    hi: np.ndarray
    rays: list[np.ndarray]

    def mm(self, pixel: np.ndarray) -> np.ndarray:
        """Pooled pixel index -> canonical in-plane mm (of the pooled pixel's centre)."""
        f = np.asarray(self.f)
        return (np.asarray(pixel) * f + (f - 1) / 2 + self.lo) * self.px / f

    def pixel(self, yx: np.ndarray) -> np.ndarray:
        """Canonical in-plane mm -> (fractional) pooled pixel index."""
        f = np.asarray(self.f)
        return (yx * f / self.px - self.lo - (f - 1) / 2) / f

    def enclosed(self, plane: np.ndarray, cfg: NamingConfig) -> tuple[np.ndarray, np.ndarray]:
        """Regions of soft tissue enclosed by bone (labelled) and the pooled HU of ``plane``, an unpooled canonical
        axial slice, in the box."""
        sub = np.asarray(plane[self.lo[0] : self.hi[0], self.lo[1] : self.hi[1]], dtype=np.float32)
        bone = _block(sub > cfg.bone_hu, self.f, "max")
        hu = _block(sub, self.f, "mean")
        soft = ~bone & (hu > cfg.tissue_hu[0]) & (hu < cfg.tissue_hu[1])
        parts, _ = ndimage.label(soft & (_enclosing_rays(bone, self.rays) >= cfg.rays - cfg.open_rays))
        return parts, hu


def _plane_box(shape: tuple[int, ...], spacing: np.ndarray, yx: np.ndarray, cfg: NamingConfig) -> _PlaneBox | None:
    """The in-plane box within ``cfg.box_mm`` of ``yx`` (mm), pooled to about ``cfg.grid_mm`` pixels."""
    f = (max(1, round(cfg.grid_mm / spacing[1])), max(1, round(cfg.grid_mm / spacing[2])))
    centre = yx / spacing[1:]
    half = cfg.box_mm / spacing[1:]
    lo = np.maximum(np.floor(centre - half), 0).astype(int)
    hi = np.minimum(np.ceil(centre + half), shape[1:]).astype(int)
    if np.any(hi - lo < 2 * np.asarray(f)):
        return None
    px = spacing[1:] * np.asarray(f)
    return _PlaneBox(f, px, lo, hi, _ray_steps(px, cfg))


def find_canal(chu: np.ndarray, spacing: np.ndarray, level: _Level, cfg: NamingConfig) -> np.ndarray | None:
    """In-plane centre (canonical mm) of the spinal canal in ``level``'s slices, or None where no enclosed region
    of a canal's size lies behind its centroid (``chu``: canonical HU, ``spacing`` its voxel size)."""
    box = _plane_box(chu.shape, spacing, level.yx, cfg)
    if box is None:
        return None
    target = level.yx + np.array([cfg.canal_behind_mm, 0.0])
    found = []
    half = round(cfg.canal_slab_mm / spacing[0])
    centre = round(level.height / spacing[0])
    for z in range(
        max(0, centre - half), min(chu.shape[0], centre + half + 1), max(1, round(cfg.grid_mm / spacing[0]))
    ):
        parts, _ = box.enclosed(chu[z], cfg)
        if not parts.any():
            continue
        index = np.arange(1, parts.max() + 1)
        area = np.bincount(parts.ravel())[1:] * float(np.prod(box.px))
        yx = box.mm(np.array(ndimage.center_of_mass(parts > 0, parts, index)))
        dist = np.hypot(*(yx - target).T)
        fits = (area >= cfg.canal_mm2[0]) & (area <= cfg.canal_mm2[1]) & (dist <= cfg.canal_reach_mm)
        if fits.any():
            found.append(yx[np.flatnonzero(fits)[np.argmin(dist[fits])]])
    return np.median(found, axis=0) if found else None


def cavity_floor(
    chu: np.ndarray, spacing: np.ndarray, canal_yx: np.ndarray, from_mm: float, cfg: NamingConfig
) -> float | None:
    """Height (mm, canonical) of the cranial cavity's floor over the canal at ``canal_yx``, searched upwards from
    ``from_mm``: the foramen magnum.

    ``chu``: HU in canonical orientation (superior, posterior, left axes); ``spacing`` its voxel size (mm). None
    when no cavity is found (no skull in view).
    """
    box = _plane_box(chu.shape, spacing, canal_yx, cfg)
    if box is None:
        return None
    canal = box.pixel(canal_yx)
    yy, xx = np.mgrid[0 : (box.hi[0] - box.lo[0]) // box.f[0], 0 : (box.hi[1] - box.lo[1]) // box.f[1]]
    over = np.hypot((yy - canal[0]) * box.px[0], (xx - canal[1]) * box.px[1]) <= cfg.floor_mm
    step = max(1, round(cfg.grid_mm / spacing[0]))
    z0 = max(0, int(np.floor(from_mm / spacing[0])))
    zs = range(z0, min(chu.shape[0], int((from_mm + cfg.above_mm) / spacing[0]) + 1), step)
    run = max(1, round(cfg.run_mm / (step * spacing[0]))) + 1

    @cache
    def hit(i: int) -> bool:
        parts, hu = box.enclosed(chu[zs[i]], cfg)
        found = np.unique(parts[over])
        for k in found[found > 0]:
            part = parts == k
            big = part.sum() * float(np.prod(box.px)) >= cfg.min_cavity_mm2
            if big and cfg.cavity_hu[0] <= hu[part].mean() <= cfg.cavity_hu[1]:
                return True
        return False

    for i, z in enumerate(zs):
        if hit(i) and sum(hit(j) for j in range(i, min(i + run, len(zs)))) >= cfg.run_hits:
            return float(z * spacing[0])
    return None


def _ray_steps(px: np.ndarray, cfg: NamingConfig) -> list[np.ndarray]:
    """Per direction (``cfg.rays`` evenly spaced in the plane), the distinct pixel offsets (dy, dx) out to
    ``cfg.reach_mm`` on a grid of pixel size ``px``."""
    out = []
    for angle in np.arange(cfg.rays) * 2 * np.pi / cfg.rays:
        r = np.arange(1, cfg.reach_mm / float(px.min()) + 1) * float(px.min())
        steps = np.rint(np.c_[r * np.sin(angle) / px[0], r * np.cos(angle) / px[1]]).astype(int)
        out.append(np.unique(steps[np.any(steps != 0, axis=1)], axis=0))
    return out


def _enclosing_rays(bone: np.ndarray, rays: list[np.ndarray]) -> np.ndarray:
    """Per pixel, in how many of the ray directions bone lies within reach."""
    h, w = bone.shape
    count = np.zeros(bone.shape, dtype=np.int16)
    for steps in rays:
        hit = np.zeros_like(bone)
        for dy, dx in steps:
            if abs(dy) < h and abs(dx) < w:
                hit[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] |= bone[
                    max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)
                ]
        count += hit
    return count


def name_levels(
    mask: np.ndarray, vol: Volume, cfg: NamingConfig | None = None, box: tuple[slice, ...] | None = None
) -> list[str]:
    """Rename ``mask``'s C1..C7 in place by anatomy (the module doc); the changes, in words, and a warning when the
    names could not be checked against a skull that the field of view cuts off.

    ``box``: the box of the mask's nonzero voxels when the caller has it (the centroids and relabelling run on it).
    """
    cfg = cfg or NamingConfig()
    box = box or label_box(mask)
    if box is None:
        return []
    sub = mask[box]
    gm = make_gridmap(vol.shape, vol.affine, (1.0, 1.0, 1.0))
    spacing = np.asarray(gm.spacing, dtype=np.float64)
    corner = _canonical_corner(box, gm)
    cbox = gm.to_canonical(sub)  # a view: relabelling sub shows in it
    levels = _levels(cbox, corner, spacing)
    if len(levels) < 2:
        return []
    lut = np.arange(256, dtype=mask.dtype)
    ends = [cbox[i] for i, at in ((0, corner[0] == 0), (-1, corner[0] + cbox.shape[0] == gm.shape[0])) if at]
    cut = {int(v) for end in ends for v in np.unique(end)}
    merged = _merge_pieces(levels, lut, cfg, cut)
    if merged:
        sub[...] = lut[sub]
        levels = _levels(cbox, corner, spacing)
        lut = np.arange(256, dtype=mask.dtype)
    changes, floor = _from_skull(gm.to_canonical(vol.array), spacing, levels, lut, cfg)
    if changes:
        sub[...] = lut[sub]
        levels = {int(lut[v]): lv for v, lv in levels.items() if lut[v]}
    changes = merged + changes
    if floor is not None and (cleared := _clear_above(cbox, corner, spacing, floor)):
        changes.append(cleared)
        levels = _levels(cbox, corner, spacing)
    if floor is None and (note := _no_skull_note(cbox, corner, gm.shape[0], spacing, cfg)):
        changes.append(note)
    named = sorted(_solid(levels, cfg))
    if len(named) >= 3 and named[-1] - named[-3] == 2:
        a, b, c = (levels[v] for v in named[-3:])
        if b.height - c.height > cfg.max_gap_steps * (a.height - b.height):
            sub[sub == named[-1]] = OTHER_VALUE
            changes.append(
                f"{label_name(named[-1])} is other vertebra: it lies {b.height - c.height:.0f} mm under "
                f"{label_name(named[-2])}, over {cfg.max_gap_steps:g} of the column's steps (a vertebra further down)"
            )
            named.pop()
    cmask = gm.to_canonical(mask)
    while named and named[-1] < 7 and named[-1] - 1 in levels:
        last = named[-1]
        taken = _next_from_other(cmask, spacing, levels[last - 1], levels[last], last + 1, cfg)
        if taken is None:
            break
        changes.append(taken[0])
        levels[last + 1] = taken[1]
        named.append(last + 1)
    return changes


def _merge_pieces(levels: dict[int, _Level], lut: np.ndarray, cfg: NamingConfig, cut: set[int]) -> list[str]:
    """Levels that are pieces of one vertebra merged in ``lut``; the changes in words. A level (not the lowest,
    which the field of view may cut) that is a small piece lying close to a neighbour in the column is part of that
    vertebra (the network split OpenKBP pt2's atlas so, a 2 ml "C1" 4-8 mm over its "C2", when the field of view
    starts 0-10 mm over the foramen magnum, and left 1 ml pieces between the atlas and the axis of a head CT that
    ends in C2). Of the levels left, two at one height (``same_height_mm``), neither of them ``cut`` by the first or
    last slice, are one vertebra split front from back (a cut level's centroid moves to the cut: on the Slicer neck
    C7's facet tips, in the lowest slices, lie 3 mm under the centroid of C6, whose body the same slice cuts)."""
    column = sorted(_solid(levels, cfg), key=lambda v: -levels[v].height)
    changes: list[str] = []
    targets: set[int] = set()
    for i, v in enumerate(column[:-1]):
        height = levels[v].height
        near = min(column[max(0, i - 1) : i] + column[i + 1 : i + 2], key=lambda u: abs(levels[u].height - height))
        gap = abs(levels[near].height - height)
        if v in targets or lut[near] != near or levels[v].ml > cfg.piece_share * levels[near].ml or gap >= cfg.piece_mm:
            continue
        lut[v] = near
        targets.add(near)
        changes.append(
            f"{label_name(v)} ({levels[v].ml:.1f} ml) merged into {label_name(near)}: its centroid lies {gap:.0f} mm "
            "from it, a piece of the same vertebra (neighbouring levels lie 11 mm and more apart)"
        )
    for a, b in pairwise([v for v in column if lut[v] == v]):
        gap = levels[a].height - levels[b].height
        if lut[a] != a or gap >= cfg.same_height_mm or {a, b} & cut:
            continue
        keep, gone = sorted((a, b))
        lut[gone] = keep
        changes.append(
            f"{label_name(gone)} ({levels[gone].ml:.1f} ml) merged into {label_name(keep)}: their centroids lie "
            f"{gap:.0f} mm apart in height, one vertebra (neighbouring levels lie 11 mm and more apart)"
        )
    return changes


def _solid(levels: dict[int, _Level], cfg: NamingConfig) -> list[int]:
    """The levels that hold a vertebra's volume (``min_next_ml``), not a speck."""
    return [v for v, lv in levels.items() if lv.ml >= cfg.min_next_ml]


def _no_skull_note(cbox: np.ndarray, corner: np.ndarray, top: int, spacing: np.ndarray, cfg: NamingConfig) -> str:
    """A warning when the highest level reaches within ``skull_view_mm`` of the field of view's top (``top``
    canonical slices): no skull above it to count from, so the names are the network's own count ("" otherwise)."""
    rows = np.flatnonzero(((cbox >= 1) & (cbox <= 7)).any(axis=(1, 2)))
    if not len(rows):
        return ""
    gap = (top - 1 - corner[0] - rows[-1]) * spacing[0]
    if gap >= cfg.skull_view_mm:
        return ""
    return (
        f"names not checked against the skull: the highest level reaches {gap:.0f} mm under the top of the field "
        "of view and no cranial cavity is found over the canal; they are the network's own count, which on a real "
        "neck CT starting at the skull base or under it has been one to three levels off"
    )


def _clear_above(cbox: np.ndarray, corner: np.ndarray, spacing: np.ndarray, floor: float) -> str:
    """Clear the C1..C7 voxels of ``cbox`` (a canonical view of the mask's box whose first voxel is canonical index
    ``corner``) that lie above ``floor`` (canonical mm): skull base a level's label reached into. The change in
    words ("" when none)."""
    top = cbox[max(0, int(np.floor(floor / spacing[0])) + 1 - int(corner[0])) :]
    cut = (top >= 1) & (top <= 7)
    if not cut.any():
        return ""
    ml = np.bincount(top[cut], minlength=8) * float(np.prod(spacing)) / 1000.0
    top[cut] = 0
    parts = ", ".join(f"{label_name(v)} {ml[v]:.1f} ml" for v in np.flatnonzero(ml))
    return f"cleared above the floor of the cranial cavity (skull base, not vertebra): {parts}"


def _from_skull(
    chu: np.ndarray, spacing: np.ndarray, levels: dict[int, _Level], lut: np.ndarray, cfg: NamingConfig
) -> tuple[list[str], float | None]:
    """Skull-base labels cleared and the column renamed from the atlas, written into ``lut`` (value -> new value);
    the changes in words and the cranial cavity's floor (None when not found)."""
    solid = _solid(levels, cfg)
    second = levels[sorted(solid if len(solid) >= 2 else levels, key=lambda v: -levels[v].height)[1]]
    canal = find_canal(chu, spacing, second, cfg)
    floor = None if canal is None else cavity_floor(chu, spacing, canal, second.height, cfg)
    if floor is None:
        return [], None
    changes = []
    below = {}
    for v, lv in levels.items():
        if lv.height > floor and not (lv.height - floor < cfg.atlas_above_mm and lv.ml >= cfg.atlas_ml):
            lut[v] = 0
            changes.append(
                f"{label_name(v)} removed: it lies {lv.height - floor:.0f} mm above the floor of the cranial "
                "cavity (skull base, not a vertebra)"
            )
        else:
            below[v] = lv
    column = sorted(_solid(below, cfg), key=lambda v: -below[v].height)
    # a C1 label under the floor, even a speck, is the network's own atlas: its names stand (the Slicer neck's axis,
    # at one of the network's grid phases, lies as close under the floor as an atlas does, with a 0.9 ml "C1" over it)
    if not column or 1 in below or floor - below[column[0]].height >= cfg.atlas_mm:
        return changes, floor
    names = {v: k for k, v in enumerate(column, 1)}  # at most seven: the values are 1..7
    shift = column[0] - 1
    for v in below:  # specks keep their place in the network's count where that name is free
        lut[v] = names.get(v, v - shift if 1 <= v - shift <= 7 and v - shift not in names.values() else 0)
    changes.append(
        f"levels renamed from the skull: the highest lies {floor - below[column[0]].height:.0f} mm under the floor "
        f"of the cranial cavity, so it is C1, and the levels under it follow in order (the network's "
        f"{', '.join(label_name(v) for v in column)} are {', '.join(label_name(int(lut[v])) for v in column)})"
    )
    return changes, floor


def _next_from_other(
    cmask: np.ndarray, spacing: np.ndarray, upper: _Level, last: _Level, value: int, cfg: NamingConfig
) -> tuple[str, _Level] | None:
    """The largest piece of "other vertebra" one level's step under the last named level (``last``, with the level
    ``upper`` above it giving the step), near the column's axis, becomes level ``value``: the change in words and
    the new level (None when there is no such piece)."""
    step = upper.height - last.height
    if not 0 < step <= cfg.max_step_mm:
        return None
    centre = last.yx + (last.yx - upper.yx)
    z_lo = max(0, int(np.floor((last.height - 1.5 * step) / spacing[0])))
    z_hi = max(0, int(np.ceil((last.height - 0.5 * step) / spacing[0])))
    view = cmask[z_lo:z_hi]
    yy, xx = np.ogrid[0 : view.shape[1], 0 : view.shape[2]]
    near = np.hypot(yy * spacing[1] - centre[0], xx * spacing[2] - centre[1]) <= cfg.next_radius_mm
    pieces, n = ndimage.label((view == OTHER_VALUE) & near[None])
    if not n:
        return None
    sizes = ndimage.sum(pieces > 0, pieces, range(1, n + 1))
    ml = float(sizes.max() * np.prod(spacing) / 1000.0)
    if ml < cfg.min_next_ml:
        return None
    piece = pieces == 1 + int(np.argmax(sizes))
    view[piece] = value
    mm = (np.argwhere(piece).mean(axis=0) + np.array([z_lo, 0, 0])) * spacing
    taken = f"{label_name(value)} taken from the other-vertebra label under {label_name(value - 1)} ({ml:.1f} ml)"
    return taken, _Level(float(mm[0]), mm[1:], ml)
