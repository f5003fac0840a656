"""The anatomical plausibility check: what is and is not a cervical spine."""

from __future__ import annotations

import numpy as np
import pytest

from cspine.io.volume import Volume
from cspine.seg.presence import NO_SPINE_MESSAGE, PresenceConfig, check_presence


def _spine(
    step_mm: float = 16.0,
    hu: int = 400,
    radius_mm: float = 9.0,
    shift_mm: tuple[float, ...] = (),
    levels: int = 7,
    top_mm: float = 130.0,
) -> tuple[Volume, np.ndarray]:
    """A 1 mm grid, index (z, y, x) -> LPS (x, y, z): bone balls labelled C1.. a vertebra's height apart downwards."""
    shape = (140, 80, 80)
    affine = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    zz, yy, xx = np.indices(shape)
    arr = np.full(shape, 40, dtype=np.int16)
    mask = np.zeros(shape, dtype=np.uint8)
    for k in range(levels):
        cz = top_mm - k * step_mm
        cx = 40 + (shift_mm[k] if k < len(shift_mm) else 0)
        ball = (zz - cz) ** 2 + (yy - 40) ** 2 + (xx - cx) ** 2 <= radius_mm**2
        arr[ball] = hu
        mask[ball] = k + 1
    return Volume(arr, (1.0, 1.0, 1.0), affine), mask


def test_a_plausible_spine_is_kept_whole() -> None:
    vol, mask = _spine()
    out, info, warnings = check_presence(mask, vol)
    assert info["cervical_spine"] == "present" and not info["rejected"] and not warnings
    assert np.array_equal(out, mask)


def test_soft_tissue_labels_are_no_spine() -> None:
    vol, mask = _spine(hu=40)
    out, info, warnings = check_presence(mask, vol)
    assert info["cervical_spine"] == "absent"
    assert warnings[0] == NO_SPINE_MESSAGE and not out.any()
    assert all("not bone" in why for why in info["rejected"].values())


def test_lumbar_sized_vertebrae_are_no_spine() -> None:
    vol, mask = _spine(step_mm=38.0, radius_mm=22.0, levels=3, top_mm=110.0)  # 45 ml each, as in a lumbar cut-out
    _, info, _ = check_presence(mask, vol)
    assert info["cervical_spine"] == "absent"
    assert any("larger than a cervical vertebra" in why for why in info["rejected"].values())


def test_one_level_out_of_line_is_dropped_and_named() -> None:
    vol, mask = _spine(shift_mm=(0, 0, 0, 35, 0, 0, 0))
    out, info, _ = check_presence(mask, vol)
    assert info["cervical_spine"] == "present"
    assert set(info["rejected"]) == {"C4"}
    assert not (out == 4).any() and (out == 5).any()


def test_a_lone_level_is_not_a_spine_and_limits_come_from_config() -> None:
    vol, mask = _spine()
    lone = np.where(mask == 2, mask, 0).astype(np.uint8)
    _, info, _ = check_presence(lone, vol)
    assert info["cervical_spine"] == "absent" and "C2" in info["rejected"]
    _, info, _ = check_presence(lone, vol, PresenceConfig(min_levels=1))
    assert info["cervical_spine"] == "present"


@pytest.mark.parametrize("step", [3.0, 60.0])
def test_levels_too_close_or_too_far_apart_are_no_spine(step: float) -> None:
    vol, mask = _spine(step_mm=step, radius_mm=1.5)
    _, info, _ = check_presence(mask, vol)
    assert info["cervical_spine"] == "absent"
