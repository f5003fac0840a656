"""Is there a cervical spine here, and which part? Anatomical plausibility of a C1..C7 label map.

Why: a segmenter trained on necks labels whatever bone it sees. On an abdomen it calls lumbar vertebrae "C5", on a
lumbar cut-out "C1-C3", and every such label would get a fracture probability. A radiologist rejects these at a
glance for reasons that need no network: a cervical vertebra is bone (its mean HU is far above soft tissue), it is
small (lumbar vertebrae are several times larger), and C1..C7 stack one above the other, a vertebra's height apart,
along a roughly straight line. This module applies those checks to the cleaned mask, drops the labels that fail
(each with a reason), and decides whether the field of view holds a cervical spine at all.

Each vertebra ends up ``present`` (and possibly ``cut_off`` by the field of view) or absent with a ``reason``.
"""

from __future__ import annotations

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
    """Anatomical limits a labelled vertebra must meet to count as a cervical vertebra.

    Attributes:
        min_mean_hu: mean HU inside the label; less is soft tissue (cancellous bone with its cortex is 200-500).
        max_volume_ml: larger than any adult cervical vertebra with its posterior elements; a lumbar one is
            several times this.
        min_volume_ml: smaller than any cervical vertebra the field of view holds whole (a cut-off one may be
            smaller and is not judged by size).
        min_step_mm, max_step_mm: centroid distance between two consecutive levels (per level between them).
        max_offset_mm: in-plane distance of a level's centroid from its neighbours' (the spine is a column).
        min_levels: fewer plausible levels in one chain means no cervical spine (a single blob is not a spine);
            at least one of them must lie whole inside the field of view.
    """

    min_mean_hu: float = 100.0
    max_volume_ml: float = 40.0
    min_volume_ml: float = 1.5
    min_step_mm: float = 7.0
    max_step_mm: float = 35.0
    max_offset_mm: float = 30.0
    min_levels: int = 2


def _level_facts(mask: np.ndarray, vol: Volume) -> dict[int, dict[str, Any]]:
    """Per present cervical value: volume (ml), mean HU inside, centroid in LPS mm, whether it touches the edge."""
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
        }
    return facts


def _longest_chain(levels: list[int], facts: dict[int, dict[str, Any]], cfg: PresenceConfig) -> list[int]:
    """The longest run of levels (in label order) whose consecutive centroids are spaced and aligned like a spine."""

    def linked(a: int, b: int) -> bool:
        d = facts[b]["lps"] - facts[a]["lps"]
        gap = b - a
        step = float(np.linalg.norm(d))
        in_plane = float(np.hypot(d[0], d[1]))
        below = d[2] < 0  # LPS z grows superior: a later level lies lower
        return below and cfg.min_step_mm * gap <= step <= cfg.max_step_mm * gap and in_plane <= cfg.max_offset_mm * gap

    best: list[int] = []
    for start in range(len(levels)):
        chain = [levels[start]]
        for nxt in levels[start + 1 :]:
            if linked(chain[-1], nxt):
                chain.append(nxt)
        if len(chain) > len(best):
            best = chain
    return best


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
    chain = _longest_chain(candidates, facts, cfg)
    if len(chain) < cfg.min_levels or all(facts[v]["cut_off"] for v in chain):
        chain = []
    for v in candidates:
        if v not in chain:
            rejected[CERVICAL[v - 1]] = (
                "no other cervical level stacked with it" if not chain else "out of line with the levels around it"
            )
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
