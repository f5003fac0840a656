"""Is there a cervical spine here, and which part? Anatomical plausibility of a C1..C7 label map.

Why: a segmenter trained on necks labels whatever bone it sees. On an abdomen it calls lumbar vertebrae "C5", on a
lumbar cut-out it cuts one lumbar vertebra into pieces labelled "C2".."C6", and every such label would get a fracture
probability. A radiologist rejects these at a glance for reasons that need no network. Each check below is one of them:

- **Bone** (``min_mean_hu``): a vertebra is bone; its mean HU is far above soft tissue.
- **Size of a whole vertebra** (``min_volume_ml``, ``max_volume_ml``): a lumbar vertebra is several times larger than
  any cervical one, and a piece far smaller than a vertebra that lies whole inside the field of view is a fragment.
- **Stacked, a vertebra apart** (``min_step_mm``, ``max_step_mm``, ``max_offset_mm``): C1..C7 lie one below the
  other, each a vertebra's height (disc included) below the last, in a column.
- **A smooth column** (``max_bend_deg``): the cervical spine curves gently (lordosis, flexion, the C1-C2 junction),
  so the direction from one level to the next turns by a few tens of degrees at most. Pieces of one bone labelled as
  successive levels zig-zag or sit side by side at one height, turning by a right angle or more.
- **Each vertebra encircles the spinal canal** (``min_canal_mm2``): the body in front and the arch behind close a
  ring around the canal (about 15 x 20 mm in an adult neck). At least one level of a cervical spine has to show that
  ring, in one of its axial slices or in its outline seen along the body axis; pieces of a vertebra (its body, a
  process, a rim) enclose no canal. It is asked of one level and not of every one because a network does not always
  close the thin arch of every level on a coarse CT.
- **More than one level, not all cut off** (``min_levels``): a single blob is not a spine, and at least one level of
  it must lie whole inside the field of view.

The checks apply to the cleaned mask; the labels that fail are dropped, each with a reason, and the study is
decided to hold a cervical spine or not. Each vertebra ends up ``present`` (and possibly ``cut_off`` by the field of
view) or absent with a ``reason``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from cspine.io.volume import Volume
from cspine.labels import CERVICAL, CERVICAL_VALUES

#: What the study-level decision is called in result.json.
SPINE_PRESENT, SPINE_ABSENT = "present", "absent"
NO_SPINE_MESSAGE = "no cervical spine found in the field of view"


@dataclass(frozen=True)
class PresenceConfig:
    """Anatomical limits a labelled vertebra must meet to count as a cervical vertebra (why each: the module doc).

    Attributes:
        min_mean_hu: mean HU inside the label; less is soft tissue (cancellous bone with its cortex is 200-500).
        max_volume_ml: larger than any adult cervical vertebra with its posterior elements; a lumbar one is
            several times this.
        min_volume_ml: smaller than any cervical vertebra the field of view holds whole (a cut-off one may be
            smaller and is not judged by size).
        min_step_mm, max_step_mm: centroid distance between two consecutive levels (per level between them).
        max_offset_mm: in-plane distance of a level's centroid from its neighbours' (the spine is a column).
        max_bend_deg: largest turn between the steps into and out of a level (centroid to centroid). Adult necks
            turn by up to about 30 degrees per level (the C1-C2 junction most); 75 leaves room for a label cut by
            the field of view, whose centroid moves off the column.
        min_canal_mm2: area of the hole a level's label must enclose, in one of its axial slices or in its outline
            along the body axis, for it to show the spinal canal (an adult cervical bony canal is 150-300 mm2, and
            stenosis narrows it at a few levels, not all; a transverse foramen, the next largest hole in a cervical
            vertebra, is about 30).
        min_levels: fewer plausible levels in one chain means no cervical spine (a single blob is not a spine);
            at least one of them must lie whole inside the field of view.
    """

    min_mean_hu: float = 100.0
    max_volume_ml: float = 40.0
    min_volume_ml: float = 1.5
    min_step_mm: float = 7.0
    max_step_mm: float = 35.0
    max_offset_mm: float = 30.0
    max_bend_deg: float = 75.0
    min_canal_mm2: float = 60.0
    min_levels: int = 2


def _largest_hole(label: np.ndarray, plane: list[int], structure: np.ndarray | None) -> int:
    """Pixels of the largest background piece that ``label`` encloses within planes spanned by the ``plane`` axes
    (a piece that reaches the box's edge in that plane is outside, not a hole). One labelling pass, no filling."""
    pieces, n = ndimage.label(~label, structure=structure)
    if n == 0:
        return 0
    outside = np.zeros(n + 1, dtype=bool)
    for axis in plane:
        for end in (0, -1):
            outside[np.take(pieces, end, axis=axis)] = True
    sizes = np.bincount(pieces.ravel(), minlength=n + 1)
    sizes[outside] = 0  # piece 0 is the label itself
    return int(sizes.max())


def _canal_mm2(local: np.ndarray, vol: Volume) -> float:
    """Largest hole (mm2) the label ``local`` (its bounding box) encloses in an axial slice or in its axial outline.

    "Axial" is the grid axis closest to the patient's body axis (LPS z); a hole is background that the label
    surrounds within that plane (the spinal canal of a whole vertebra).
    """
    axis = int(np.argmax(np.abs(vol.affine[2, :3])))
    plane = [k for k in range(3) if k != axis]
    pixel_mm2 = float(np.linalg.norm(np.cross(vol.affine[:3, plane[0]], vol.affine[:3, plane[1]])))
    in_plane = ndimage.generate_binary_structure(3, 1)
    in_plane[tuple(slice(None) if k != axis else [0, 2] for k in range(3))] = False
    slices = _largest_hole(local, plane, in_plane)
    outline = _largest_hole(local.any(axis=axis), [0, 1], None)
    return max(slices, outline) * pixel_mm2


def _level_facts(mask: np.ndarray, vol: Volume) -> dict[int, dict[str, Any]]:
    """Per present cervical value: volume (ml), mean HU inside, centroid in LPS mm, whether it touches the edge, and
    the largest spinal-canal-like hole it encloses (mm2). All from the label's bounding box."""
    voxel_ml = float(abs(np.linalg.det(vol.affine[:3, :3]))) / 1000.0
    objects = ndimage.find_objects(mask)
    facts: dict[int, dict[str, Any]] = {}
    for v in CERVICAL_VALUES:
        sl = objects[v - 1] if v <= len(objects) else None
        if sl is None:
            continue
        local = mask[sl] == v
        n = int(local.sum())
        if n == 0:
            continue
        centroid = np.array(ndimage.center_of_mass(local)) + [s.start for s in sl]
        facts[v] = {
            "volume_ml": n * voxel_ml,
            "mean_hu": float(vol.array[sl][local].mean()),
            "lps": vol.index_to_patient(centroid)[0],
            "cut_off": any(s.start == 0 or s.stop == size for s, size in zip(sl, mask.shape, strict=True)),
            "canal_mm2": _canal_mm2(local, vol),
        }
    return facts


def _linked(a: int, b: int, facts: dict[int, dict[str, Any]], cfg: PresenceConfig) -> bool:
    """Level ``b`` lies below ``a``, spaced and aligned like the ``b - a`` vertebrae between them."""
    d = facts[b]["lps"] - facts[a]["lps"]
    gap = b - a
    step = float(np.linalg.norm(d))
    in_plane = float(np.hypot(d[0], d[1]))
    below = d[2] < 0  # LPS z grows superior: a later level lies lower
    return below and cfg.min_step_mm * gap <= step <= cfg.max_step_mm * gap and in_plane <= cfg.max_offset_mm * gap


def _bend_deg(a: int, b: int, c: int, facts: dict[int, dict[str, Any]]) -> float:
    """Angle (degrees) between the steps a -> b and b -> c."""
    u = facts[b]["lps"] - facts[a]["lps"]
    w = facts[c]["lps"] - facts[b]["lps"]
    cos = float(np.dot(u, w) / (np.linalg.norm(u) * np.linalg.norm(w)))
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def _is_column(chain: tuple[int, ...], facts: dict[int, dict[str, Any]], cfg: PresenceConfig) -> bool:
    """Consecutive levels stacked a vertebra apart, and the column turning smoothly."""
    return all(_linked(a, b, facts, cfg) for a, b in itertools.pairwise(chain)) and all(
        _bend_deg(a, b, c, facts) <= cfg.max_bend_deg for a, b, c in zip(chain, chain[1:], chain[2:], strict=False)
    )


def _best_chain(levels: list[int], facts: dict[int, dict[str, Any]], cfg: PresenceConfig) -> tuple[list[int], bool]:
    """The longest run of levels (in label order) that forms a cervical spine, and whether a column was found that
    failed only for want of a canal (which decides the reason its levels are dropped with).

    Every subset is tried (at most 2^7): a column of at least ``min_levels`` with one level whole in view and one
    showing the canal. Among the longest, the one with the most labelled volume (whole vertebrae over fragments).
    """
    column_without_canal = False
    for size in range(len(levels), max(cfg.min_levels, 1) - 1, -1):
        found = []
        for chain in itertools.combinations(levels, size):
            if all(facts[v]["cut_off"] for v in chain) or not _is_column(chain, facts, cfg):
                continue
            if max(facts[v]["canal_mm2"] for v in chain) < cfg.min_canal_mm2:
                column_without_canal = True
                continue
            found.append(chain)
        if found:
            return list(max(found, key=lambda c: sum(facts[v]["volume_ml"] for v in c))), column_without_canal
    return [], column_without_canal


def check_presence(
    mask: np.ndarray, vol: Volume, cfg: PresenceConfig | None = None
) -> tuple[np.ndarray, dict[str, Any], list[str]]:
    """Drop C1..C7 labels that cannot be cervical vertebrae; decide whether a cervical spine is in view.

    Args:
        mask: uint8 label map on ``vol``'s grid (1..7 = C1..C7; other values are left alone).
        vol: the CT the mask was made from (HU and geometry).

    Returns:
        (mask with implausible cervical labels cleared, {"cervical_spine": "present"|"absent",
        "rejected": {name: reason}}, warnings).
    """
    cfg = cfg or PresenceConfig()
    facts = _level_facts(mask, vol)
    rejected: dict[str, str] = {}
    for v, f in facts.items():
        name = CERVICAL[v - 1]
        if f["mean_hu"] < cfg.min_mean_hu:
            rejected[name] = f"mean {f['mean_hu']:.0f} HU inside, not bone (< {cfg.min_mean_hu:.0f})"
        elif f["volume_ml"] > cfg.max_volume_ml:
            rejected[name] = f"{f['volume_ml']:.0f} ml, larger than a cervical vertebra (> {cfg.max_volume_ml:.0f})"
        elif f["volume_ml"] < cfg.min_volume_ml and not f["cut_off"]:
            rejected[name] = f"{f['volume_ml']:.1f} ml whole in view, smaller than a cervical vertebra"
    candidates = [v for v in sorted(facts) if CERVICAL[v - 1] not in rejected]
    chain, column_without_canal = _best_chain(candidates, facts, cfg)
    for v in candidates:
        if v in chain:
            continue
        if chain:
            why = "out of line with the levels around it"
        elif column_without_canal:
            why = f"no level stacked with it encloses a spinal canal (>= {cfg.min_canal_mm2:.0f} mm2): bone pieces"
        else:
            why = "no other cervical level stacked with it"
        rejected[CERVICAL[v - 1]] = why
    out = mask
    if rejected:
        out = mask.copy()
        drop = np.zeros(256, dtype=bool)
        drop[[CERVICAL.index(n) + 1 for n in rejected]] = True
        out[drop[out]] = 0
    status = SPINE_PRESENT if chain else SPINE_ABSENT
    warnings = [f"{name} label dropped: {why}" for name, why in sorted(rejected.items())]
    if status == SPINE_ABSENT:
        warnings.insert(0, NO_SPINE_MESSAGE)
    return out, {"cervical_spine": status, "rejected": rejected}, warnings
