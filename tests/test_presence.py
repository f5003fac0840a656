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
    canal_mm: float = 5.0,
) -> tuple[Volume, np.ndarray]:
    """A 1 mm grid, index (z, y, x) -> LPS (x, y, z): bone rings labelled C1.. a vertebra's height apart downwards.

    Each level is a ball with a vertical hole of radius ``canal_mm`` through it (its spinal canal; 0: solid);
    ``shift_mm`` moves level k sideways (LPS x).
    """
    shape = (140, 80, 80)
    affine = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    zz, yy, xx = np.indices(shape)
    arr = np.full(shape, 40, dtype=np.int16)
    mask = np.zeros(shape, dtype=np.uint8)
    for k in range(levels):
        cz = top_mm - k * step_mm
        cx = 40 + (shift_mm[k] if k < len(shift_mm) else 0)
        r2 = (yy - 40) ** 2 + (xx - cx) ** 2
        ring = ((zz - cz) ** 2 + r2 <= radius_mm**2) & (r2 > canal_mm**2)
        arr[ring] = hu
        mask[ring] = k + 1
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


def test_stacked_pieces_enclosing_no_canal_are_no_spine() -> None:
    """Solid pieces stacked like levels (a lumbar vertebra cut into "C2".."C6"): everything else about them passes."""
    vol, mask = _spine(canal_mm=0.0)
    out, info, warnings = check_presence(mask, vol)
    assert info["cervical_spine"] == "absent" and not out.any() and warnings[0] == NO_SPINE_MESSAGE
    assert set(info["rejected"]) == {f"C{k}" for k in range(1, 8)}
    assert all("spinal canal" in why for why in info["rejected"].values())
    _, info, _ = check_presence(mask, vol, PresenceConfig(min_canal_mm2=0.0))
    assert info["cervical_spine"] == "present" and not info["rejected"]


def test_one_level_showing_the_canal_is_enough() -> None:
    """A network does not close every thin arch on a coarse CT: one ring in the column makes it a spine."""
    vol, mask = _spine(canal_mm=0.0)
    _, rings = _spine()
    mask[(mask == 4) & (rings != 4)] = 0
    _, info, _ = check_presence(mask, vol)
    assert info["cervical_spine"] == "present" and not info["rejected"]


def test_a_canal_seen_only_along_the_body_axis_counts() -> None:
    """A ring open in every slice (a C shape turning with height) still encloses the canal seen from above."""
    vol, mask = _spine(canal_mm=0.0)
    zz, yy, xx = np.indices(mask.shape)
    mask = np.zeros_like(mask)
    angle = np.arctan2(yy - 40, xx - 40)
    for k in range(3):
        cz = 130 - 16 * k
        r2 = (yy - 40) ** 2 + (xx - 40) ** 2
        ring = ((zz - cz) ** 2 + r2 <= 121) & (r2 > 25)
        gap = np.abs(np.angle(np.exp(1j * (angle - (zz - cz) * 0.6)))) < 0.5  # the opening turns slice by slice
        mask[ring & ~gap] = k + 1
    _, info, _ = check_presence(mask, vol)
    assert info["cervical_spine"] == "present", info["rejected"]
    _, info, _ = check_presence(mask, vol, PresenceConfig(min_canal_mm2=1000.0))
    assert info["cervical_spine"] == "absent"


def test_a_level_beside_the_column_is_dropped_by_the_bend() -> None:
    """A piece 20 mm beside the column (like two fragments of one lumbar vertebra at one height): each step to it is
    short and in line enough, but the column turns by ~100 degrees at it."""
    vol, mask = _spine(shift_mm=(0, 0, 0, 20, 0, 0, 0))
    out, info, _ = check_presence(mask, vol)
    assert info["cervical_spine"] == "present"
    assert info["rejected"] == {"C4": "out of line with the levels around it"}
    assert not (out == 4).any() and (out == 5).any()
    _, info, _ = check_presence(mask, vol, PresenceConfig(max_bend_deg=180.0))
    assert not info["rejected"]


@pytest.mark.parametrize("profile", ["default", "wide"])
def test_generated_studies_keep_every_vertebra(profile: str) -> None:
    """Every vertebra of a generated study (lordosis, flexion, head tilt, coarse grids, cut-off fields of view)
    passes: the limits leave the necks alone. Studies whose field of view holds none report none."""
    from cspine.synth import generate_study

    for index in range(4 if profile == "default" else 8):  # wide: 2 heads (no cervical spine) among them
        st = generate_study(4242, "small", index, "train", profile=profile)
        present = [v for v in range(1, 8) if (st.mask == v).any()]
        out, info, warnings = check_presence(st.mask, st.volume)
        assert info["cervical_spine"] == ("present" if present else "absent"), (index, info["rejected"])
        assert not info["rejected"] and np.array_equal(out, st.mask), (index, warnings)
