"""The competition metric against hand-computed values; AUC, sensitivity/specificity, Dice on constructed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cspine.metrics import auc, competition_loss, dice, sens_spec, threshold_for_sensitivity


def test_constant_half_is_log2() -> None:
    y = np.random.default_rng(0).integers(0, 2, (50, 8))
    assert competition_loss(y, np.full((50, 8), 0.5)) == pytest.approx(math.log(2))


def test_hand_computed_single_study() -> None:
    # patient positive (w 14), C1 positive (w 2), C2..C7 negative (w 1 each): sum w = 22.
    y = np.array([[1, 1, 0, 0, 0, 0, 0, 0]])
    p = np.array([[0.8, 0.6, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]])
    expect = (14 * -math.log(0.8) + 2 * -math.log(0.6) + 6 * -math.log(0.9)) / 22
    assert competition_loss(y, p) == pytest.approx(expect)


def test_per_study_normalisation() -> None:
    """Each study is normalised by its own weight sum before the mean (not one global sum)."""
    y = np.array([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0]])
    p = np.array([[0.9] * 8, [0.3] * 8])
    l1 = -math.log(0.9)  # every term equal: the weighted mean is the term
    l2 = -math.log(0.7)
    assert competition_loss(y, p) == pytest.approx((l1 + l2) / 2)
    global_norm = (28 * l1 + 14 * l2) / 42
    assert competition_loss(y, p) != pytest.approx(global_norm)


def test_clipping() -> None:
    y = np.array([[1, 0, 0, 0, 0, 0, 0, 0]])
    p = np.array([[0.0, 1.0, 0, 0, 0, 0, 0, 0]])
    expect = (14 * -math.log(1e-15) + 1 * -math.log(1e-15)) / 21
    assert competition_loss(y, p) == pytest.approx(expect, rel=1e-2)  # 1 - 1e-15 is not exact in float64
    assert math.isfinite(competition_loss(y, p))


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="must both be"):
        competition_loss(np.zeros((2, 8)), np.zeros((2, 7)))


def test_auc_sens_spec_threshold() -> None:
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.6, 0.4, 0.9])
    assert auc(y, s) == pytest.approx(0.75)
    assert auc(np.zeros(4), s) is None
    assert sens_spec(y, s, 0.5) == (0.5, 0.5)
    assert threshold_for_sensitivity(y, s, 1.0) == pytest.approx(0.4)
    assert sens_spec(y, s, threshold_for_sensitivity(y, s, 1.0))[0] == 1.0


def test_dice_exact() -> None:
    a = np.zeros((4, 4), int)
    b = np.zeros((4, 4), int)
    a[:2, :2] = 3  # 4 voxels
    b[:2, :] = 3  # 8 voxels, 4 shared
    assert dice(a, b, 3) == pytest.approx(2 * 4 / 12)
    assert dice(a, b, 5) is None
    assert dice(a, a, 3) == 1.0
