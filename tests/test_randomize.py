"""Domain-randomisation transforms (cspine.seg.randomize): seeded, recorded, replayable, masks aligned."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cspine.seg.randomize import RandomizeConfig, pipeline, randomize, replay

ALL = RandomizeConfig(p_crop=1, p_intensity=1, p_bias=1, p_gamma=1, p_blur=1, p_resolution=1, p_noise=1)
NONE = RandomizeConfig(p_crop=0, p_intensity=0, p_bias=0, p_gamma=0, p_blur=0, p_resolution=0, p_noise=0)


@pytest.fixture(scope="module")
def volume() -> tuple[np.ndarray, np.ndarray]:
    """A 24 x 32 x 28 phantom: air, a soft-tissue body, a fat layer and a bone block labelled 3."""
    z, y, x = np.mgrid[:24, :32, :28].astype(np.float32)
    image = np.full((24, 32, 28), -1000.0, dtype=np.float32)
    r = np.sqrt((y - 16) ** 2 + (x - 14) ** 2)
    image[r < 13] = -90.0
    image[r < 10] = 40.0
    mask = np.zeros(image.shape, dtype=np.uint8)
    bone = (abs(y - 18) < 4) & (abs(x - 14) < 4) & (abs(z - 12) < 8)
    image[bone] = 700.0
    mask[bone] = 3
    return image, mask


def test_same_seed_same_result_and_record(volume: tuple[np.ndarray, np.ndarray]) -> None:
    image, mask = volume
    a = randomize(image, mask, np.random.default_rng(7), ALL, spacing=(2.0, 1.0, 1.0))
    b = randomize(image, mask, np.random.default_rng(7), ALL, spacing=(2.0, 1.0, 1.0))
    c = randomize(image, mask, np.random.default_rng(8), ALL, spacing=(2.0, 1.0, 1.0))
    assert a[2] == b[2] and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[2] != c[2]
    assert [r["name"] for r in a[2]] == [t.name for t in pipeline(ALL)]


def test_record_replays_exactly_even_through_json(volume: tuple[np.ndarray, np.ndarray]) -> None:
    image, mask = volume
    for seed in range(4):
        out, out_mask, record = randomize(image, mask, np.random.default_rng(seed), spacing=(2.0, 1.0, 1.0))
        again, again_mask = replay(image, mask, json.loads(json.dumps(record)))
        np.testing.assert_array_equal(again, out)
        np.testing.assert_array_equal(again_mask, out_mask)


def test_each_transform_changes_the_image_and_keeps_the_mask_on_it(volume: tuple[np.ndarray, np.ndarray]) -> None:
    image, mask = volume
    for t in pipeline(ALL):
        params = t.sample(np.random.default_rng(1), image, (2.0, 1.0, 1.0))
        assert params is not None
        out, out_mask = t.apply(image, mask, params)
        assert out.shape == out_mask.shape and out.dtype == np.float32 and out_mask.dtype == np.uint8
        if t.name != "crop":
            assert out.shape == image.shape and not np.allclose(out, image), t.name
            np.testing.assert_array_equal(out_mask, mask)


def test_crop_keeps_mask_and_image_aligned(volume: tuple[np.ndarray, np.ndarray]) -> None:
    image, mask = volume
    cfg = RandomizeConfig(**{**NONE.__dict__, "p_crop": 1.0, "crop_keep": (0.5, 0.8)})
    for seed in range(6):
        out, out_mask, record = randomize(image, mask, np.random.default_rng(seed), cfg)
        (crop,) = record
        s, e = crop["start"], crop["end"]
        assert out.shape == tuple(b - a for a, b in zip(s, e, strict=True)) == out_mask.shape
        np.testing.assert_array_equal(out, image[s[0] : e[0], s[1] : e[1], s[2] : e[2]])
        np.testing.assert_array_equal(out_mask == 3, out == 700.0)  # the label sits exactly on its bone


def test_probabilities_zero_is_identity(volume: tuple[np.ndarray, np.ndarray]) -> None:
    image, mask = volume
    out, out_mask, record = randomize(image, mask, np.random.default_rng(0), NONE)
    assert record == [] and np.array_equal(out, image) and np.array_equal(out_mask, mask)


def test_intensity_map_moves_tissues_apart_from_each_other(volume: tuple[np.ndarray, np.ndarray]) -> None:
    image, mask = volume
    cfg = RandomizeConfig(**{**NONE.__dict__, "p_intensity": 1.0})
    out, _, _ = randomize(image, mask, np.random.default_rng(3), cfg)
    for hu in (-1000.0, -90.0, 40.0, 700.0):  # each tissue still one value, but a new one
        vals = np.unique(out[image == hu])
        assert len(vals) == 1 and vals[0] != hu


def test_shape_mismatch_refused(volume: tuple[np.ndarray, np.ndarray]) -> None:
    image, mask = volume
    with pytest.raises(ValueError, match="same shape"):
        randomize(image, mask[:-1], np.random.default_rng(0))


def test_fov_edge_pads_the_image_and_clears_labels_and_shares_beyond_the_box(
    volume: tuple[np.ndarray, np.ndarray],
) -> None:
    from cspine.seg.randomize import FovEdge

    image, mask = volume
    t = FovEdge(1.0, (0.4, 0.6), (0.0,))
    params = t.sample(np.random.default_rng(3), image, (1.0, 1.0, 1.0))
    out, out_mask = t.apply(image, mask, params)
    inside = tuple(slice(a, b) for a, b in zip(params["start"], params["end"], strict=True))
    outside = np.ones(image.shape, bool)
    outside[inside] = False
    assert out.shape == image.shape and outside.any()
    assert np.all(out[outside] == 0.0) and np.array_equal(out[inside], image[inside])
    assert not out_mask[outside].any() and np.array_equal(out_mask[inside], mask[inside])
    shares = np.stack([(mask == 0), (mask == 3)]).astype(np.float32)
    _, out_shares = t.apply(image, shares, params)
    assert np.all(out_shares[0][outside] == 1.0) and np.all(out_shares[1][outside] == 0.0)


def test_training_patches_are_randomised_in_hu_seeded_and_keep_their_labels() -> None:
    from cspine.io.volume import Volume
    from cspine.seg.config import AugmentConfig, PreprocessConfig
    from cspine.seg.patches import Case, PatchSampler

    _, y, x = np.mgrid[:40, :48, :48]
    hu = np.where((abs(y - 24) < 8) & (abs(x - 24) < 8), 700.0, 40.0).astype(np.int16)
    mask = np.where(hu > 100, 4, 0).astype(np.uint8)
    pre = PreprocessConfig()
    affine = np.array([[0, 0, 2.0, 0], [0, 2.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])  # (z, y, x) -> LPS
    case = Case.build("s", Volume(hu, (2.0, 2.0, 2.0), affine), mask, pre, soft=False)
    no_aug = AugmentConfig(p_affine=0.0, p_intensity=0.0, p_blur=0.0)
    plain = PatchSampler([case], (32, 32, 32), no_aug, 1.0)
    rand = PatchSampler([case], (32, 32, 32), no_aug, 1.0, randomize=ALL, preprocess=pre)
    for seed in range(4):  # one patch per draw: the same centre with and without randomisation
        a = plain.batch(1, np.random.default_rng(seed))
        b = rand.batch(1, np.random.default_rng(seed))
        c = rand.batch(1, np.random.default_rng(seed))
        assert b[0].shape == a[0].shape and b[1].shape == a[1].shape
        assert np.array_equal(b[0].numpy(), c[0].numpy())  # the seed is the record
        assert not np.allclose(a[0].numpy(), b[0].numpy())
        assert float(b[0].min()) >= 0.0 and float(b[0].max()) <= 1.0
        # labels only ever lose voxels (beyond a field-of-view edge), never move or gain them
        assert not ((b[1] > 0) & (a[1] == 0)).any() and (b[1] > 0).any()
    with pytest.raises(ValueError, match="preprocessing"):
        PatchSampler([case], (32, 32, 32), no_aug, 1.0, randomize=ALL)
