"""Clean-up and description of vertebra label maps: one piece per vertebra, cranio-caudal order, FOV report.

Why: a network's argmax can leave specks, split a vertebra in two, or call C3 what lies above C2. Downstream
stages crop one box per vertebra, so each of C1..C7 must be one connected piece in the right order, and a
vertebra that the scan does not fully contain must be flagged (its fracture label cannot be trusted).
Works on project mask values (1..7 = C1..C7, anything else left alone except tiny specks), on any grid: the
cranio-caudal axis is taken from the affine.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from cspine.io.volume import Volume
from cspine.labels import CERVICAL, CERVICAL_VALUES, label_name
from cspine.seg.config import OTHER_VALUE, PostprocessConfig

_FULL = np.ones((3, 3, 3), dtype=bool)


def value_name(value: int) -> str:
    """Name of a mask value, including the segmenter's "other vertebra" value."""
    return "other" if value == OTHER_VALUE else label_name(value)


def superior_axis(affine: np.ndarray) -> tuple[int, int]:
    """(index axis closest to the patient's S direction, +1 if the index grows towards S else -1)."""
    s_component = affine[2, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    axis = int(np.argmax(np.abs(s_component)))
    return axis, (1 if s_component[axis] > 0 else -1)


def label_box(mask: np.ndarray, pad: int = 1) -> tuple[slice, slice, slice] | None:
    """The box of a label map's nonzero voxels grown by ``pad`` (clipped to the grid), or None when all are zero.

    Post-processing, the anatomical checks and the description run on this view instead of the whole grid: the
    vertebrae fill a fraction of a full-size study. With ``pad`` >= 1 a label touches the box's border only where
    it touches the grid's, so "cut off by the field of view" reads the same.
    """
    along_z = np.flatnonzero(mask.reshape(mask.shape[0], -1).max(axis=1))
    if not len(along_z):
        return None
    z0, z1 = int(along_z[0]), int(along_z[-1]) + 1
    plane = mask[z0:z1].max(axis=0)
    ys, xs = np.flatnonzero(plane.max(axis=1)), np.flatnonzero(plane.max(axis=0))
    lo, hi = (z0, int(ys[0]), int(xs[0])), (z1, int(ys[-1]) + 1, int(xs[-1]) + 1)
    return tuple(slice(max(0, a - pad), min(n, b + pad)) for a, b, n in zip(lo, hi, mask.shape, strict=True))  # type: ignore[return-value]


def _union_box(objects: list[tuple[slice, ...] | None], shape: tuple[int, ...]) -> tuple[slice, ...] | None:
    boxes = [o for o in objects if o is not None]
    if not boxes:
        return None
    return tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(len(shape)))


def keep_largest_components(mask: np.ndarray, values: tuple[int, ...] = CERVICAL_VALUES) -> list[str]:
    """In place: keep the largest 26-connected piece of each value; other pieces go to the neighbour they touch most.

    "Touch" counts shared faces; a piece that touches no kept labelled voxel becomes background. All pieces are
    handled together (the coordinates of their voxels, six neighbour look-ups each), so an untrained model's
    thousands of specks cost little more than a few, and only each value's own box is ever scanned. Returns
    notes on what moved.
    """
    return _keep_largest(mask, values)[0]


def _keep_largest(
    mask: np.ndarray, values: tuple[int, ...] = CERVICAL_VALUES
) -> tuple[list[str], list[tuple[slice, ...] | None]]:
    """:func:`keep_largest_components`, also returning ``ndimage.find_objects(mask)`` of the result.

    Those boxes come without scanning the whole mask again: the given values all lie in their former union
    box (only that is scanned), every other label keeps its voxels plus the pieces handed to it.
    """
    objects = ndimage.find_objects(mask)
    coords: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    piece_value = [0]
    for v in values:
        if v > len(objects) or objects[v - 1] is None:
            continue
        sl = objects[v - 1]
        comp, n = ndimage.label(mask[sl] == v, structure=_FULL)
        if n <= 1:
            continue
        keep = int(np.argmax(np.bincount(comp.ravel())[1:])) + 1
        remap = np.zeros(n + 1, dtype=np.int64)
        others = [k for k in range(1, n + 1) if k != keep]
        remap[others] = np.arange(len(piece_value), len(piece_value) + len(others))
        where = np.nonzero((comp > 0) & (comp != keep))
        ids.append(remap[comp[where]])
        coords.append(np.stack(where, axis=1) + [s.start for s in sl])
        mask[sl][where] = 0
        piece_value += [v] * len(others)
    if len(piece_value) == 1:
        return [], objects
    n_pieces = len(piece_value)
    at, vox_id = np.concatenate(coords), np.concatenate(ids)
    pairs: list[np.ndarray] = []  # (piece id * 256 + touching kept value), one entry per touching face
    for axis in range(3):
        for k in (-1, 1):
            nb = at.copy()
            nb[:, axis] += k
            inside = (nb[:, axis] >= 0) & (nb[:, axis] < mask.shape[axis])
            touched = mask[nb[inside, 0], nb[inside, 1], nb[inside, 2]]
            sel = touched > 0
            pairs.append(vox_id[inside][sel] * 256 + touched[sel])
    target = most_touched(pairs, n_pieces)
    mask[at[:, 0], at[:, 1], at[:, 2]] = target[vox_id]
    notes = handover_notes(piece_value, target, np.bincount(vox_id, minlength=n_pieces))
    given = target[vox_id]
    box = _union_box([objects[v - 1] for v in values if v <= len(objects)], mask.shape)
    assert box is not None  # there were pieces
    inside = ndimage.find_objects(mask[box], max_label=max(values))
    after = list(objects)
    for v in values:
        if v <= len(objects):
            sl = inside[v - 1]
            after[v - 1] = (
                None
                if sl is None
                else tuple(slice(a.start + b.start, a.stop + b.start) for a, b in zip(sl, box, strict=True))
            )
    for v in np.unique(given).tolist():
        if v and v not in values:
            pts = at[given == v]
            extra = tuple(slice(int(a), int(b) + 1) for a, b in zip(pts.min(0), pts.max(0), strict=True))
            after[v - 1] = _union_box([objects[v - 1], extra], mask.shape)
    return notes, after


def most_touched(pairs: list[np.ndarray], n_pieces: int) -> np.ndarray:
    """Per piece id, the kept value it shares most faces with (0: none), from (piece id * 256 + value) entries."""
    keys, counts = np.unique(np.concatenate(pairs), return_counts=True)
    pid, touching = keys // 256, keys % 256
    order = np.lexsort((-counts, pid))  # per piece, the most touched value first
    first = np.r_[True, pid[order][1:] != pid[order][:-1]] if len(order) else np.zeros(0, bool)
    target = np.zeros(n_pieces, dtype=np.uint8)  # pieces touching nothing kept -> background
    target[pid[order][first]] = touching[order][first]
    return target


def handover_notes(piece_value: list[int], target: np.ndarray, sizes: np.ndarray) -> list[str]:
    """One note per value: how many extra pieces it had, how many voxels went to which neighbour or away."""
    values_of = np.asarray(piece_value, dtype=np.int64)[1:]
    key = values_of * 256 + target[1:]
    uniq, n_by_key = np.unique(key, return_counts=True)
    vox_by_key = np.bincount(np.searchsorted(uniq, key), weights=sizes[1:], minlength=len(uniq))
    notes = []
    for v in np.unique(values_of):
        sel = (uniq // 256) == v
        parts = [
            f"{int(vox)} voxels to {value_name(int(k % 256))}" if k % 256 else f"{int(vox)} voxels removed"
            for k, vox in zip(uniq[sel], vox_by_key[sel], strict=True)
        ]
        notes.append(f"{value_name(int(v))}: {int(n_by_key[sel].sum())} extra piece(s): {', '.join(parts)}")
    return notes


def fix_order(
    mask: np.ndarray,
    affine: np.ndarray,
    values: tuple[int, ...] = CERVICAL_VALUES,
    min_share: float = 0.25,
    origin: tuple[int, ...] = (0, 0, 0),
    objects: list[tuple[slice, ...] | None] | None = None,
    beside_mm: float = 60.0,
) -> list[str]:
    """In place: relabel the present vertebrae so their centroids run superior -> inferior in label order.

    The set of present labels is kept; only which piece carries which label changes (C3 above C2 -> swapped).
    A label much smaller than the others (under ``min_share`` of their median volume) that is out of line with
    them is a stray piece, not a vertebra: it is removed rather than allowed to shift every level below it by
    one (a 0.1 ml "C7" speck above C4 would otherwise relabel C4..C7 on a real neck). So is a label whose centroid
    lies more than ``beside_mm`` in-plane from the column's, the label with the most volume within ``beside_mm``
    around it (whole vertebrae outweigh pieces; a level lies within 30 mm of its neighbours, and a curved neck
    within about that of its middle): bone beside the neck, such as a shoulder the network called "C7" on a real
    neck CT turned in the scanner, or ribs and a scapula it called "C1".."C4" beside a real chest CT's C7, which
    ordered by height would have made it C1. ``origin``: where
    ``mask`` (a box of the grid ``affine`` maps) starts; ``objects``: ``ndimage.find_objects(mask)`` when known
    (updated in place: a removed label's entry becomes None, relabelled ones swap entries).
    """
    objects = ndimage.find_objects(mask) if objects is None else objects
    world, size, plane = {}, {}, {}
    for v in values:
        if v > len(objects) or objects[v - 1] is None:
            continue
        sl = objects[v - 1]
        hit = mask[sl] == v
        size[v] = int(hit.sum())
        centroid = np.array(ndimage.center_of_mass(hit)) + [s.start + o for s, o in zip(sl, origin, strict=True)]
        lps = affine[:3, :3] @ centroid + affine[:3, 3]
        world[v], plane[v] = float(lps[2]), lps[:2]  # LPS z: larger = more superior
    notes = []
    apart = {(u, v): float(np.linalg.norm(plane[u] - plane[v])) for u in world for v in world}
    anchor = max(world, key=lambda u: sum(size[v] for v in world if apart[u, v] <= beside_mm), default=0)
    for v in [v for v in world if apart[anchor, v] > beside_mm]:
        sl = objects[v - 1]
        mask[sl][mask[sl] == v] = 0
        objects[v - 1] = None
        del world[v]
        notes.append(f"removed {value_name(v)}: it lies {apart[anchor, v]:.0f} mm beside the column")
    if world:
        floor = min_share * float(np.median([size[v] for v in world]))
        big = [v for v in world if size[v] >= floor]
        for v in [v for v in world if size[v] < floor]:
            line = sorted([*big, v])
            if sorted(line, key=lambda u: -world[u]) != line:
                sl = objects[v - 1]
                mask[sl][mask[sl] == v] = 0
                objects[v - 1] = None
                del world[v]
                notes.append(f"removed {value_name(v)}: a stray piece out of cranio-caudal order")
    present = sorted(world)
    by_height = sorted(present, key=lambda v: -world[v])
    if by_height == present:
        return notes
    lut = np.arange(256, dtype=np.uint8)
    for old, new in zip(by_height, present, strict=True):
        lut[old] = new
    box = _union_box([objects[v - 1] for v in present], mask.shape)
    assert box is not None
    mask[box] = lut[mask[box]]
    boxes = {v: objects[v - 1] for v in present}
    for old, new in zip(by_height, present, strict=True):
        objects[new - 1] = boxes[old]
    moved = [f"{value_name(o)}->{value_name(n)}" for o, n in zip(by_height, present, strict=True) if o != n]
    return [*notes, f"relabelled {', '.join(moved)} (out of cranio-caudal order)"]


def remove_small(
    mask: np.ndarray, voxel_mm3: float, min_volume_mm3: float, objects: list[tuple[slice, ...] | None] | None = None
) -> list[str]:
    """In place: drop labels (all values) whose total volume is below ``min_volume_mm3``.

    ``objects``: ``ndimage.find_objects(mask)`` when the caller has it (a removed label's entry becomes None).
    """
    notes = []
    objects = ndimage.find_objects(mask) if objects is None else objects
    for v, sl in enumerate(objects, start=1):
        if sl is None:
            continue
        region = mask[sl]  # a view: only the label's bounding box is scanned (full-size studies are 100 M voxels)
        hit = region == v
        volume = int(hit.sum()) * voxel_mm3
        if volume < min_volume_mm3:
            region[hit] = 0
            objects[v - 1] = None
            notes.append(f"removed {value_name(v)}: {volume:.0f} mm3 < {min_volume_mm3:.0f} mm3")
    return notes


def postprocess(
    mask: np.ndarray, affine: np.ndarray, cfg: PostprocessConfig | None = None
) -> tuple[np.ndarray, list[str], list[str]]:
    """Clean a label map on any grid: largest piece per vertebra, order fix, specks removed.

    Args:
        mask: uint8 project values (1..7 = C1..C7; other values are kept, specks removed).
        affine: index -> LPS (mm) of the mask's grid.

    Returns:
        (cleaned copy, warnings, cleanup). Warnings are the changes a reader must know of: a whole vertebra
        removed as too small, labels reordered. Cleanup is the routine part, stray pieces handed to their
        neighbour or dropped: a network leaves a few on almost every study, and printed as warnings they buried
        the ones that matter (seven lines on every demo prediction).
    """
    out = np.zeros(mask.shape, dtype=np.uint8)
    box = label_box(mask)
    if box is None:
        return out, [], []
    out[box] = mask[box]
    warnings, cleanup, _ = clean_box(out[box], affine, tuple(s.start for s in box), cfg)
    return out, warnings, cleanup


def clean_box(
    sub: np.ndarray, affine: np.ndarray, origin: tuple[int, ...], cfg: PostprocessConfig | None = None
) -> tuple[list[str], list[str], list[tuple[slice, ...] | None]]:
    """:func:`postprocess` in place on ``sub``, the box of a label map starting at ``origin`` that holds every
    labelled voxel (:func:`label_box`). Returns (warnings, cleanup, ``ndimage.find_objects(sub)`` after it)."""
    cfg = cfg or PostprocessConfig()
    voxel = float(abs(np.linalg.det(affine[:3, :3])))
    cleanup, objects = _keep_largest(sub) if cfg.keep_largest else ([], ndimage.find_objects(sub))
    warnings = remove_small(sub, voxel, cfg.min_volume_mm3, objects)
    if cfg.fix_order:
        warnings += fix_order(sub, affine, origin=origin, objects=objects)
    return warnings, cleanup, objects


def describe(
    mask: np.ndarray,
    vol: Volume,
    box: tuple[slice, ...] | None = None,
    objects: list[tuple[slice, ...] | None] | None = None,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Per vertebra C1..C7: present, voxels, volume, slices, instance numbers, bbox, centroids, FOV cut-off.

    Returns (vertebrae, warnings). ``slices`` are the first and last index along the volume's axis 0 (the DICOM
    slice axis); ``instance_numbers`` are the InstanceNumbers of those two slices (RSNA slice_number);
    ``bbox_zyx`` is [start, stop) per axis, ready for :func:`cspine.io.volume.crop`. ``box``: a box holding
    every labelled voxel (:func:`label_box`, found when not given); only it is scanned, and not even that when
    ``objects`` (``ndimage.find_objects(mask[box])``) is given.
    """
    if mask.shape != vol.shape:
        raise ValueError(f"mask shape {mask.shape} differs from volume shape {vol.shape}")
    voxel = float(abs(np.linalg.det(vol.affine[:3, :3])))
    s_axis, s_sign = superior_axis(vol.affine)
    box = box or label_box(mask)
    origin = [s.start for s in box] if box else [0, 0, 0]
    objects = [
        None if sl is None else tuple(slice(s.start + o, s.stop + o) for s, o in zip(sl, origin, strict=True))
        for sl in (objects if objects is not None else ndimage.find_objects(mask[box]) if box else [])
    ]
    out: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    for name, v in zip(CERVICAL, CERVICAL_VALUES, strict=True):
        sl = objects[v - 1] if v <= len(objects) else None
        if sl is None:
            out[name] = {"present": False, "voxels": 0, "volume_ml": 0.0, "cut_off": False}
            warnings.append(f"{name} not found")
            continue
        local = mask[sl] == v
        n = int(local.sum())
        start = [s.start for s in sl]
        stop = [s.stop for s in sl]
        centroid = np.array(ndimage.center_of_mass(local)) + np.array(start)
        sides: list[str] = []
        for axis in range(3):
            touched = []
            if start[axis] == 0:
                touched.append(_side(axis, low=True, s_axis=s_axis, s_sign=s_sign))
            if stop[axis] == mask.shape[axis]:
                touched.append(_side(axis, low=False, s_axis=s_axis, s_sign=s_sign))
            sides += [t for t in touched if t not in sides]
        z0, z1 = start[0], stop[0] - 1
        inst = vol.instance_numbers
        out[name] = {
            "present": True,
            "voxels": n,
            "volume_ml": round(n * voxel / 1000.0, 3),
            "slices": [int(z0), int(z1)],
            "instance_numbers": [int(inst[z0]), int(inst[z1])] if len(inst) else None,
            "bbox_zyx": [[int(a) for a in start], [int(b) for b in stop]],
            "centroid_zyx": [round(float(c), 2) for c in centroid],
            "centroid_lps": [round(float(c), 2) for c in vol.index_to_patient(centroid)[0]],
            "cut_off": bool(sides),
            "cut_off_sides": sides,
        }
        if sides:
            warnings.append(f"{name} cut off by the field of view ({', '.join(sides)} edge)")
    return out, warnings


def _side(axis: int, low: bool, s_axis: int, s_sign: int) -> str:
    if axis == s_axis:
        return "inferior" if low == (s_sign > 0) else "superior"
    return "in-plane"
