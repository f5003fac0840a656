"""Vertebra segmentation stage: registry, preprocessing geometry, post-processing, metrics, training, inference.

Everything runs on tiny inputs (4 mm model grid, 32^3 patches, the "unet-tiny" network) so the whole file stays
well under two minutes on two busy CPU cores; the real-size run is in the README and benchmarks/bench_seg.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cspine.io.nifti import read_nifti
from cspine.io.volume import Volume
from cspine.seg.config import OTHER_VALUE, PostprocessConfig, PreprocessConfig, TrainSegConfig
from cspine.seg.evaluate import evaluate_files, evaluate_masks, markdown_table, summarize
from cspine.seg.postprocess import describe, fix_order, keep_largest_components, postprocess
from cspine.synth import SynthStudy, generate_study

TINY_PRE = PreprocessConfig(spacing=(4.0, 4.0, 4.0), divisor=8)
TINY = {
    "arch": "unet-tiny",
    "epochs": 2,
    "iters_per_epoch": 3,
    "batch_size": 2,
    "patch": (32, 32, 32),
    "preprocess": TINY_PRE,
    "lr": 1e-2,
    "warmup_iters": 1,
    "fold": 0,
    "folds": 3,
    "device": "cpu",
    "soft_labels": True,  # the in-memory runs cover soft targets; the CLI and DDP runs hard labels
}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """One torch thread: these ops are tiny, and on busy shared cores a second OpenMP thread only spins."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def studies() -> list[SynthStudy]:
    return [generate_study(0, "small", i) for i in range(3)]


@pytest.fixture(scope="module")
def trained(studies: list[SynthStudy], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 2-epoch tiny model trained in memory, with its per-epoch rows and final weights."""
    from cspine.seg.train import train_config, train_segmentation

    out = tmp_path_factory.mktemp("seg") / "model"
    rows: list[dict[str, Any]] = []
    summary = train_segmentation(
        train_config(out=out, **TINY), studies, resume=False, on_epoch_end=lambda e, r: rows.append(r)
    )
    return {"out": out, "rows": rows, "summary": summary}


# ---------------------------------------------------------------------------------------------------------------
# Registry and models
# ---------------------------------------------------------------------------------------------------------------


def test_unknown_model_lists_valid_names() -> None:
    from cspine.seg.models import MODEL_NAMES, create_model

    with pytest.raises(ValueError, match="valid: " + ", ".join(MODEL_NAMES)):
        create_model("resnet-9000")


REGISTERED = ["unet", "unet-tiny", "unet-full", "unet-fine", "unet-res", "dynunet", "segresnet"]


@pytest.mark.parametrize("name", REGISTERED)
def test_every_registered_model_runs_forward_and_backward(name: str) -> None:
    import torch

    from cspine.seg.config import CLASSES
    from cspine.seg.models import MODEL_NAMES, create_model, get_spec

    assert name in MODEL_NAMES  # the parametrisation covers the registry (checked below as well)
    torch.manual_seed(0)
    net = create_model(name)
    side = max(16, get_spec(name).divisor * 2)
    x = torch.randn(1, 1, side, side, side)
    y = net(x)
    assert y.shape == (1, len(CLASSES), side, side, side)
    y.square().mean().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_parametrisation_covers_registry() -> None:
    from cspine.seg.models import MODEL_NAMES

    assert set(MODEL_NAMES) == set(REGISTERED)


def test_config_round_trip_and_typo_is_refused() -> None:
    from cspine.engine.config import from_dict, to_dict

    cfg = TrainSegConfig(out=Path("x"), patch=(32, 48, 64), preprocess=TINY_PRE)
    assert from_dict(TrainSegConfig, to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        from_dict(TrainSegConfig, {"epochz": 3})
    with pytest.raises(ValueError, match="multiples of 16"):
        TrainSegConfig(patch=(40, 40, 40))


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing geometry
# ---------------------------------------------------------------------------------------------------------------


def _reoriented(vol: Volume, mask: np.ndarray) -> tuple[Volume, np.ndarray]:
    """The same study stored another way: axes permuted (x, z, y) and two of them reversed, affine to match."""
    perm = (2, 0, 1)
    arr = np.transpose(vol.array, perm)[::-1, :, ::-1]
    m = np.transpose(mask, perm)[::-1, :, ::-1]
    aff = np.eye(4)
    aff[:3, :3] = vol.affine[:3, list(perm)]
    aff[:3, 3] = vol.affine[:3, 3]
    for axis in (0, 2):  # reversing an axis moves the origin to its far end and negates its column
        aff[:3, 3] += aff[:3, axis] * (arr.shape[axis] - 1)
        aff[:3, axis] *= -1
    spacing = tuple(float(vol.spacing[p]) for p in perm)
    return Volume(np.ascontiguousarray(arr), spacing, aff), np.ascontiguousarray(m)  # type: ignore[arg-type]


def test_model_grid_ignores_how_the_study_is_stored(studies: list[SynthStudy]) -> None:
    from cspine.seg.data import labels_to_model_grid, to_model_grid

    s = studies[0]
    img_a, gm_a = to_model_grid(s.volume, TINY_PRE)
    vol_b, mask_b = _reoriented(s.volume, s.mask)
    img_b, gm_b = to_model_grid(vol_b, TINY_PRE)
    assert gm_b.perm == (1, 2, 0) and gm_b.flip == (False, True, True)
    np.testing.assert_allclose(img_a, img_b, atol=1e-6)
    np.testing.assert_array_equal(labels_to_model_grid(s.mask, gm_a), labels_to_model_grid(mask_b, gm_b))
    np.testing.assert_array_equal(gm_b.from_canonical(gm_b.to_canonical(mask_b)), mask_b)
    assert img_a.min() >= 0.0 and img_a.max() <= 1.0


def test_axis_taps_linear_and_area() -> None:
    from cspine.seg.data import axis_taps

    idx, w = axis_taps(5, 9, 0.5, antialias=False)  # upsampling x2: plain linear interpolation
    values = (w * np.arange(5.0)[idx]).sum(axis=1)
    np.testing.assert_allclose(values, np.arange(9) * 0.5, atol=1e-6)
    idx, w = axis_taps(12, 4, 3.0, antialias=True)  # shrinking x3: weights sum to one, centred on 3j
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose((w * np.arange(12.0)[idx]).sum(axis=1)[1:3], [3.0, 6.0], atol=1e-6)


def test_class_shares_are_partial_volumes(studies: list[SynthStudy]) -> None:
    from cspine.seg.data import class_shares, labels_to_model_grid, make_gridmap

    s = studies[2]
    gm = make_gridmap(s.volume.shape, s.volume.affine, (2.0, 2.0, 2.0))
    shares = class_shares(s.mask, gm).numpy()
    np.testing.assert_allclose(shares.sum(0), 1.0, atol=1e-5)
    assert 0.0 < shares[1].max() <= 1.0 and ((shares[1] > 0.05) & (shares[1] < 0.95)).any()  # soft edges
    np.testing.assert_array_equal(labels_to_model_grid(s.mask, gm), shares.argmax(0))
    ml_true = (s.mask == 2).sum() * np.prod(s.volume.spacing) / 1000
    assert shares[2].sum() * 8 / 1000 == pytest.approx(ml_true, rel=0.02)  # C2's volume is preserved


def test_labels_follow_class_map() -> None:
    from cspine.seg.data import class_to_value_lut, value_to_class_lut

    lut = value_to_class_lut()
    assert lut[0] == 0 and list(lut[1:8]) == list(range(1, 8)) and lut[8] == lut[19] == lut[OTHER_VALUE] == 8
    assert list(class_to_value_lut()) == [0, 1, 2, 3, 4, 5, 6, 7, OTHER_VALUE]
    assert class_to_value_lut(keep_other=False)[8] == 0


def test_augmented_patches_keep_identities(studies: list[SynthStudy]) -> None:
    """Rotations stay small and there are no flips: in every patch the vertebrae keep their cranio-caudal order."""
    import torch

    from cspine.seg.config import AugmentConfig
    from cspine.seg.data import Case, PatchSampler, warp_patch

    case = Case.build("a", studies[0].volume, studies[0].mask, TINY_PRE)
    rng = np.random.default_rng(0)
    img = rng.random((20, 22, 24)).astype(np.float16)
    lab = rng.integers(0, 9, (20, 22, 24)).astype(np.uint8)
    x, y = warp_patch(img, lab, np.array([10.0, 11.0, 12.0]), np.eye(3), (9, 11, 13))  # identity: a plain crop
    np.testing.assert_allclose(x.numpy(), img[6:15, 6:17, 6:19].astype(np.float32), atol=1e-5)
    np.testing.assert_array_equal(y.numpy(), lab[6:15, 6:17, 6:19])
    soft = PatchSampler([case], (32, 32, 32), AugmentConfig(), fg_fraction=1.0, soft=True)
    _, ys = soft.batch(2, np.random.default_rng(1))  # soft targets: class shares that sum to one
    assert ys.shape == (2, 9, 32, 32, 32) and torch.allclose(ys.sum(1), torch.ones(1), atol=1e-5)
    sampler = PatchSampler([case], (32, 32, 32), AugmentConfig(), fg_fraction=1.0)
    xb, yb = sampler.batch(4, np.random.default_rng(1))
    assert xb.shape == (4, 1, 32, 32, 32) and yb.shape == xb.shape and yb.max() <= 8
    for b in range(4):
        z_of = {c: np.argwhere(yb[b, 0].numpy() == c)[:, 0].mean() for c in range(1, 8) if (yb[b, 0] == c).any()}
        ordered = sorted(z_of, key=lambda c: -z_of[c])  # canonical axis 0 runs upwards: C1 highest
        assert ordered == sorted(ordered)


def test_lucent_voxels_are_a_fractures_gap_inside_the_vertebra_and_weigh_in_the_loss() -> None:
    """train-seg --lucent-weight: the dark voxels inside a vertebra (a fracture plate), not its rim nor the soft tissue
    around it, are listed per case, drawn as patch centres, mapped in every patch and weighed by the extra loss."""
    import torch
    import torch.nn.functional as F

    from cspine.seg.config import AugmentConfig
    from cspine.seg.data import Case, PatchSampler
    from cspine.seg.patches import LUCENT_INSIDE, LUCENT_OUTSIDE
    from cspine.seg.train import masked_cross_entropy

    pre = PreprocessConfig(spacing=(1.0, 1.0, 1.0), divisor=8)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])[[2, 1, 0, 3]]  # index axis 0 runs along patient z
    hu = np.full((48, 48, 48), 40, np.int16)
    mask = np.zeros(hu.shape, np.uint8)
    hu[12:36, 12:36, 12:36], mask[12:36, 12:36, 12:36] = 400, 3

    def build(image: np.ndarray) -> Case:
        return Case.build("a", Volume(image, (1.0, 1.0, 1.0), affine), mask, pre, soft=False, stage="refine",
                          lucent_hu=150)  # fmt: skip

    intact = build(hu.copy())
    hu[23:25, 14:34, 14:34] = 80  # the fracture: a 2 mm plate of the vertebra's own label, bone on both sides
    case = build(hu)
    assert intact.lucent is not None and len(intact.lucent) == 0
    assert case.lucent is not None and len(case.lucent) == 2 * 20 * 20  # every plate voxel, and nothing else
    plate = np.zeros(hu.shape, bool)
    plate[23:25, 14:34, 14:34] = True
    listed = np.zeros(hu.shape, bool)
    listed[tuple(case.lucent.T)] = True
    assert np.array_equal(listed, plate)  # the model grid is the study's own here (1 mm, axis 0 along z)

    sampler = PatchSampler([case], (16, 16, 16), AugmentConfig(p_affine=0.0), fg_fraction=0.0, preprocess=pre,
                           lucent_hu=150, lucent_fraction=1.0)  # fmt: skip
    x, y, lucent = sampler.batch(4, np.random.default_rng(0))
    assert lucent.shape == y.shape == x.shape
    inside, outside = lucent == LUCENT_INSIDE, lucent == LUCENT_OUTSIDE
    for b in range(4):  # every centre on the plate: a lucent map in every patch, inside the vertebra only
        assert 0 < int(inside[b].sum()) <= 2 * 16 * 16 and bool((y[b][inside[b]] == 1).all())
        assert bool((y[b][outside[b]] == 0).all())  # the soft tissue against the bone: its negatives
    face = np.zeros(hu.shape, bool)  # in the whole study, the dark voxels against the vertebra are its shell
    face[11:37, 11:37, 11:37] = True
    face[12:36, 12:36, 12:36] = False
    whole = PatchSampler([case], (48, 48, 48), AugmentConfig(), 0.0, preprocess=pre, lucent_hu=150)
    full = whole.lucent_map(torch.from_numpy(case.image.astype(np.float32)), torch.from_numpy(case.labels))
    assert np.array_equal(full.numpy() == LUCENT_OUTSIDE, face) and np.array_equal(full.numpy() == LUCENT_INSIDE, plate)
    plain = PatchSampler([case], (16, 16, 16), AugmentConfig(p_affine=0.0), fg_fraction=1.0)
    assert len(plain.batch(2, np.random.default_rng(0))) == 2  # off: the two tensors as before

    logits = torch.randn(4, 2, 16, 16, 16)
    want = F.cross_entropy(logits, y[:, 0], reduction="none")[inside[:, 0]].mean()
    assert torch.allclose(masked_cross_entropy(logits, y, inside), want)
    shares = F.one_hot(y[:, 0], 2).permute(0, 4, 1, 2, 3).float()  # soft targets give the same
    assert torch.allclose(masked_cross_entropy(logits, shares, inside), want)
    assert float(masked_cross_entropy(logits, y, torch.zeros_like(inside))) == 0.0


def test_refined_foreground_decides_bone_and_coarse_logits_name_it() -> None:
    import torch

    from cspine.seg.data import Foreground, logits_to_labels, make_gridmap, study_box

    gm = make_gridmap((8, 8, 8), np.eye(4)[[2, 1, 0, 3]], (1.0, 1.0, 1.0))  # axes already canonical, 1 mm
    assert gm.perm == (0, 1, 2) and gm.flip == (False, False, False)
    logits = torch.zeros((9, 8, 8, 8))
    logits[0] = 5.0  # background everywhere ...
    logits[3, 2:6, 2:6, 2:6] = 10.0  # ... but a C3 cube
    logits[4, 4:6, 2:6, 2:6] = 11.0  # whose top is C4
    logits[3, 0, 0, 0] = 20.0  # and a C3 speck far away
    assert [b.tolist() for b in study_box(logits, gm, margin=0)] == [[0, 0, 0], [5, 5, 5]]
    lo, hi = study_box(logits, gm, margin=0, cervical_only=True)  # the largest piece of each: specks ignored
    assert lo.tolist() == [2, 2, 2] and hi.tolist() == [5, 5, 5]
    plain = logits_to_labels(logits, gm, margin=0)
    fg = np.zeros((5, 5, 5), dtype=bool)  # refined box: study voxels 1..5
    fg[0:4, 2:4, 2:4] = True  # the refinement stage: bone is a thinner, taller bar (study 1..4, 3..4, 3..4)
    refined = logits_to_labels(logits, gm, margin=0, foreground=Foreground(np.ones(3, np.int64), fg), gate=3.0)
    assert (refined[2:4, 3:5, 3:5] == 3).all() and (refined[4, 3:5, 3:5] == 4).all()  # named by the coarse logits
    assert (refined[1, 3:5, 3:5] == 0).all()  # coarse background 5 vs best vertebra 0: beyond the gate
    assert (refined[2:4, 2, 2] == 0).all() and (plain[2:4, 2, 2] == 3).all()  # the rim follows the refinement
    assert refined[0, 0, 0] == plain[0, 0, 0] == 3  # outside the refined box the coarse labels stay
    with pytest.raises(ValueError, match="outside"):
        logits_to_labels(logits, gm, margin=0, foreground=Foreground(np.array([4, 4, 4]), fg))


# ---------------------------------------------------------------------------------------------------------------
# Post-processing and report
# ---------------------------------------------------------------------------------------------------------------


def _stack(order: list[int], n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Vertebrae as 4-slice blocks stacked along z (z grows upwards): order[0] at the top."""
    mask = np.zeros((n * len(order) + 4, 10, 10), dtype=np.uint8)
    for k, v in enumerate(order):
        z0 = 2 + n * (len(order) - 1 - k)
        mask[z0 : z0 + n - 1, 2:8, 2:8] = v
    return mask, _affine(2.0)


def _affine(dz: float) -> np.ndarray:
    """(z, y, x) index -> LPS: z index along S by dz mm (negative: downwards), y along P, x along L, 1 mm."""
    aff = np.zeros((4, 4))
    aff[2, 0], aff[1, 1], aff[0, 2], aff[3, 3] = dz, 1.0, 1.0, 1.0
    return aff


def test_postprocess_fixes_out_of_order_labels() -> None:
    mask, aff = _stack([1, 3, 2, 4, 5, 6, 7])  # C3 above C2
    notes = fix_order(mask, aff)
    ref, _ = _stack([1, 2, 3, 4, 5, 6, 7])
    np.testing.assert_array_equal(mask, ref)
    assert notes == ["relabelled C3->C2, C2->C3 (out of cranio-caudal order)"]
    flipped = _affine(-2.0)  # same picture, z index now runs downwards
    mask2, _ = _stack([7, 6, 5, 4, 2, 3, 1])
    fix_order(mask2, flipped)
    np.testing.assert_array_equal(mask2, _stack([7, 6, 5, 4, 3, 2, 1])[0])


def test_postprocess_removes_a_label_beside_the_column() -> None:
    """A "C7" as large as a vertebra 100 mm to the side of C1..C6, level with C5 (the network on a shoulder of a real
    neck CT turned in the scanner): ordered by height it would swap names with C6; it is removed instead."""
    mask, aff = _stack([1, 2, 3, 4, 5, 6])
    wide = np.zeros((mask.shape[0], 10, 120), dtype=np.uint8)
    wide[:, :, :10] = mask
    wide[np.nonzero(mask == 5)[0], 2:8, 102:108] = 7
    notes = fix_order(wide, aff)
    assert notes == ["removed C7: it lies 100 mm beside the column"], notes
    np.testing.assert_array_equal(wide[:, :, :10], mask)
    assert not wide[:, :, 10:].any()


def test_postprocess_finds_the_column_by_volume() -> None:
    """Two whole vertebrae "C6" and "C7" and four small labels "C1".."C4" above them 70-100 mm to the side (the
    network on ribs and a scapula of a real chest CT that starts in the neck): counted one each, the pieces outnumber
    the vertebrae; the column is where the most volume lies, so the pieces go and C6 and C7 keep their names (not
    renamed C1 and C2 by height)."""
    column, aff = _stack([0, 0, 0, 0, 6, 7])
    mask = np.zeros((column.shape[0], 10, 110), dtype=np.uint8)
    mask[:, :, :10] = column
    for v, x in zip((1, 2, 3, 4), (72, 80, 90, 100), strict=True):
        mask[2 + 4 * (6 - v), 4:6, x : x + 2] = v  # at C1..C4's heights, 4 voxels each
    notes = fix_order(mask, aff)
    assert len(notes) == 4 and all(n.endswith("mm beside the column") for n in notes), notes
    np.testing.assert_array_equal(mask[:, :, :10], column)
    assert not mask[:, :, 10:].any()


def test_postprocess_keeps_one_piece_per_vertebra() -> None:
    mask, aff = _stack([1, 2, 3, 4, 5, 6, 7])
    c4 = np.argwhere(mask == 4)
    z4 = c4[0, 0]
    mask[z4, 3, 3] = 3  # a C3 speck inside C4: becomes C4
    mask[0, 0, 0] = 5  # a detached C5 speck: removed
    out, warnings, cleanup = postprocess(mask, aff, PostprocessConfig(min_volume_mm3=0))
    assert out[z4, 3, 3] == 4 and out[0, 0, 0] == 0
    assert "C3: 1 extra piece(s): 1 voxels to C4" in cleanup
    assert "C5: 1 extra piece(s): 1 voxels removed" in cleanup
    assert warnings == []  # routine cleanup is not a warning
    assert keep_largest_components(out) == []  # idempotent


def test_describe_reports_slices_instances_and_cut_off() -> None:
    mask, aff = _stack([1, 2, 3, 4, 5, 6, 7])
    mask[:1, 2:8, 2:8] = 7  # C7 reaches the lowest slice: cut off inferiorly
    mask[mask == 1] = 0  # C1 missing
    n = mask.shape[0]
    vol = Volume(np.zeros(mask.shape, np.int16), (2.0, 1.0, 1.0), aff, instance_numbers=np.arange(n, 0, -1))
    verts, warnings = describe(mask, vol)
    assert verts["C1"]["present"] is False and "C1 not found" in warnings
    c7 = verts["C7"]
    assert c7["cut_off"] and c7["cut_off_sides"] == ["inferior"]
    assert c7["slices"] == [0, 4] and c7["instance_numbers"] == [n, n - 4]
    c2 = verts["C2"]
    assert not c2["cut_off"] and c2["bbox_zyx"][1][1:] == [8, 8]
    assert c2["centroid_lps"][2] == pytest.approx(2.0 * c2["centroid_zyx"][0])


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def test_dice_and_identification_exact_on_constructed_masks() -> None:
    truth = np.zeros((20, 20, 20), dtype=np.uint8)
    truth[10:14, 2:12, 2:12] = 1  # C1: a ring (10x10 with a 4x4 hole) ...
    truth[10:14, 5:9, 5:9] = 0
    truth[4:9, 2:12, 2:12] = 2  # ... above C2: a 5x10x10 body
    truth[9:14, 6:8, 6:8] = 2  # whose dens rises into C1's hole, right through C1's centroid
    assert truth[12, 6, 6] == 2
    perfect = evaluate_masks(truth, truth, (1.0, 1.0, 1.0))
    assert perfect["C1"]["identified"] is True and perfect["C1"]["centroid_voxel"] == "C2"  # "inside" would fail
    pred = truth.copy()
    pred[4:9, 2:12, 2:7] = 3  # half of C2's body called C3
    res = evaluate_masks(pred, truth, (1.0, 1.0, 1.0))
    assert res["C1"]["dice"] == 1.0 and res["C1"]["centroid_distance_mm"] == 0.0
    assert res["C2"]["dice"] == pytest.approx(2 * 270 / (270 + 520))
    assert res["C2"]["identified"] is True  # its centroid moved 2.4 mm, still nearest to C2's
    assert res["C3"]["dice"] == 0.0 and res["C3"]["identified"] is None  # not in the reference: not counted
    swapped = truth.copy()
    swapped[truth == 1], swapped[truth == 2] = 2, 1
    res_swapped = evaluate_masks(swapped, truth, (1.0, 1.0, 1.0))
    assert res_swapped["C1"]["identified"] is False and res_swapped["C2"]["identified"] is False
    pred[pred == 2] = 3  # all of C2 called C3: C2 missing
    res = evaluate_masks(pred, truth, (1.0, 1.0, 1.0), labels=[1, 2, 3])
    assert res["C2"]["identified"] is False and res["C2"]["dice"] == 0.0
    summary = summarize({"a": res, "b": perfect})
    assert summary["identification_rate"] == pytest.approx(3 / 4)
    assert summary["per_vertebra"]["C2"]["dice_mean"] == pytest.approx(0.5)
    assert summary["mean_dice"] == pytest.approx((1 + 0 + 0 + 1 + 1) / 5)
    assert "| C2 | 0.500 | 0.000 | 1/2 |" in markdown_table(summary)


def test_metrics_on_real_vertebra_masks(real: Path, tmp_path: Path) -> None:
    """TPTBox L2-L4 (PIR orientation) against a copy stored in another orientation: perfect scores; and
    TotalSegmentator's own two runs on one CT agree as published models do (Dice > 0.85 on T11-L2)."""
    import nibabel as nib

    src = real / "nifti" / "tptbox_lumbar_ct" / "sub-ct_seg-vert_label-22_msk.nii.gz"
    img = nib.load(src)
    data = np.asarray(img.dataobj)
    flipped = data[::-1].transpose(2, 1, 0)  # reverse i, then store (k, j, i)
    aff = img.affine.copy()
    aff[:3, 3] += aff[:3, 0] * (data.shape[0] - 1)
    aff[:3, 0] *= -1
    aff = aff[:, [2, 1, 0, 3]]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(flipped), aff), tmp_path / "pred.nii.gz")
    s = evaluate_files(tmp_path / "pred.nii.gz", src, tmp_path / "eval")
    assert s["mean_dice"] == 1.0 and s["identification_rate"] == 1.0
    assert list(s["per_vertebra"]) == ["L2", "L3", "L4"]
    assert (tmp_path / "eval" / "eval.json").exists() and (tmp_path / "eval" / "eval.md").exists()

    ts = real / "nifti" / "totalsegmentator"
    sm = nib.load(ts / "example_seg.nii.gz")  # run on example_ct_sm = slices 82..111 of example_ct, but the
    fixed = sm.affine.copy()  # upstream file kept the full CT's affine: shift its origin by 82 slices
    fixed[:3, 3] += fixed[:3, 2] * 82
    nib.save(nib.Nifti1Image(np.asarray(sm.dataobj), fixed), tmp_path / "ts_sm.nii.gz")
    s = evaluate_files(
        tmp_path / "ts_sm.nii.gz", ts / "example_seg_fast_force_split.nii.gz", None, "totalseg", "totalseg"
    )
    per = s["per_vertebra"]
    assert {"T11", "T12", "L1", "L2"} <= set(per)
    assert all(per[n]["dice_mean"] > 0.85 for n in ("T12", "L1"))


# ---------------------------------------------------------------------------------------------------------------
# Training, resume, inference
# ---------------------------------------------------------------------------------------------------------------


def test_two_epochs_lower_the_loss_and_write_a_loadable_model_dir(trained: dict[str, Any]) -> None:
    from cspine.seg.infer import load_model

    out = trained["out"]
    rows = json.loads((out / "model.history.json").read_text())["epochs"]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    assert rows[0]["val_dice_mean"] is not None and set(rows[0]["val_dice"]) == {f"C{i}" for i in range(1, 8)}
    for name in ("config.json", "labels.json", "model.pt", "work/model.state.pt", "model.history.csv", "curve.png",
                 "run.json"):  # fmt: skip
        assert (out / name).exists(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["arch"] == "unet-tiny" and cfg["train"]["preprocess"]["spacing"] == [4.0, 4.0, 4.0]
    assert json.loads((out / "labels.json").read_text())["output_values"]["C7"] == 7
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 1 and run["epochs_run"] == 2 and "torch" in run["versions"]
    model = load_model(out, "cpu")
    assert model.arch == "unet-tiny" and model.preprocess == TINY_PRE


def test_lucent_weight_adds_its_term_to_the_training_loss(studies: list[SynthStudy], tmp_path: Path) -> None:
    """train-seg --lucent-weight reaches the loss: the same first step (same weights, same patches) costs more."""
    from cspine.seg.train import train_config, train_segmentation

    losses = {}
    for weight in (0.0, 1.0):
        cfg = train_config(out=tmp_path / f"w{weight}", **{**TINY, "epochs": 1, "iters_per_epoch": 1},
                           lucent_weight=weight)  # fmt: skip
        train_segmentation(cfg, studies, resume=False)
        losses[weight] = json.loads((cfg.out / "model.history.json").read_text())["epochs"][0]["train_loss"]
    saved = json.loads((tmp_path / "w1.0" / "config.json").read_text())["train"]
    assert saved["lucent_weight"] == 1.0 and saved["lucent_hu"] == 150.0
    assert losses[1.0] > losses[0.0] + 1e-3


def test_resume_after_interruption_continues_from_saved_epoch(
    studies: list[SynthStudy], trained: dict[str, Any], tmp_path: Path
) -> None:
    import torch

    from cspine.runtime import load_checkpoint
    from cspine.seg.train import train_config, train_segmentation

    out = tmp_path / "model"
    cfg = train_config(out=out, **TINY)

    def kill_after_first(epoch: int, row: dict[str, Any]) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_segmentation(cfg, studies, on_epoch_end=kill_after_first)
    assert load_checkpoint(out / "work" / "model.state.pt")["epoch"] == 1
    seen: list[int] = []
    summary = train_segmentation(cfg, studies, on_epoch_end=lambda e, r: seen.append(e))
    assert seen == [2] and summary["epochs_run"] == 2
    rows = json.loads((out / "model.history.json").read_text())["epochs"]
    assert [r["epoch"] for r in rows] == [1, 2]
    resumed = load_checkpoint(out / "work" / "model.state.pt")["model"]
    straight = load_checkpoint(trained["out"] / "work" / "model.state.pt")["model"]
    for k in straight:  # same patches, same steps: the resumed run ends where the uninterrupted one did
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="different config"):
        train_segmentation(train_config(out=out, **{**TINY, "lr": 0.5}), studies)


def test_init_starts_a_run_from_another_segmenters_weights(
    studies: list[SynthStudy], trained: dict[str, Any], tmp_path: Path
) -> None:
    import torch

    from cspine.errors import ConfigError
    from cspine.runtime import load_checkpoint
    from cspine.seg.train import train_config, train_segmentation

    still = {**TINY, "epochs": 1, "lr": 1e-12, "weight_decay": 0.0, "fold": -1}  # a step too small to move them
    out = tmp_path / "tuned"
    train_segmentation(train_config(out=out, init=trained["out"], **still), studies, resume=False)
    tuned = load_checkpoint(out / "model.pt")["model"]
    source = load_checkpoint(trained["out"] / "model.pt")["model"]
    for k in source:
        torch.testing.assert_close(tuned[k], source[k], rtol=1e-5, atol=1e-6)
    train_segmentation(train_config(out=tmp_path / "scratch", **still), studies, resume=False)
    scratch = load_checkpoint(tmp_path / "scratch" / "model.pt")["model"]
    assert any(not torch.allclose(scratch[k].float(), source[k].float()) for k in source)
    refine = {**still, "stage": "refine", "arch": "unet-fine"}
    with pytest.raises(ConfigError, match="a coarse stage of network 'unet-tiny'"):
        train_segmentation(train_config(out=tmp_path / "r", init=trained["out"], **refine), studies, resume=False)


def test_inference_returns_masks_on_the_studys_own_grid(
    studies: list[SynthStudy], trained: dict[str, Any], tmp_path: Path
) -> None:
    import nibabel as nib

    from cspine.io import load_segmentation, save_nifti
    from cspine.io.nifti import nifti_affine
    from cspine.seg.infer import load_model, segment_volume

    model = load_model(trained["out"], "cpu")
    s = studies[1]
    res = segment_volume(s.volume, model)
    assert res.mask.shape == s.volume.shape and res.mask.dtype == np.uint8
    assert set(res.vertebrae) == {f"C{i}" for i in range(1, 8)}
    assert set(np.unique(res.mask)) <= {0, 1, 2, 3, 4, 5, 6, 7, OTHER_VALUE}
    path = save_nifti(res.mask, s.volume, tmp_path / "mask.nii.gz")
    np.testing.assert_allclose(nib.load(path).affine, nifti_affine(s.volume.affine))
    np.testing.assert_array_equal(load_segmentation(path, s.volume), res.mask)
    json.dumps(res.to_json())
    # the same study stored another way gives the same mask, stored that way
    vol_b, _ = _reoriented(s.volume, s.mask)
    res_b = segment_volume(vol_b, model)
    assert res_b.mask.shape == vol_b.shape
    expected = np.ascontiguousarray(np.transpose(res.mask, (2, 0, 1))[::-1, :, ::-1])
    assert (res_b.mask != expected).mean() < 1e-4  # equal up to float ties (BLAS sums in another order)
    # a bundle holding the model as seg/ loads the same way
    bundle = tmp_path / "bundle"
    (bundle / "seg").mkdir(parents=True)
    for f in ("config.json", "model.pt"):
        (bundle / "seg" / f).write_bytes((trained["out"] / f).read_bytes())
    assert load_model(bundle, "cpu").path == bundle / "seg"


def test_refinement_stage_trains_into_the_coarse_model_and_refines_its_masks(
    studies: list[SynthStudy], trained: dict[str, Any], tmp_path: Path
) -> None:
    from cspine.seg.infer import InferConfig, load_model, segment_volume
    from cspine.seg.train import train_config, train_segmentation

    coarse = tmp_path / "model"
    coarse.mkdir()
    for f in ("config.json", "model.pt"):
        (coarse / f).write_bytes((trained["out"] / f).read_bytes())
    cfg = train_config(out=coarse / "refine", **{**TINY, "stage": "refine", "arch": "unet-fine", "epochs": 1})
    train_segmentation(cfg, studies, resume=False)
    rows = json.loads((coarse / "refine" / "model.history.json").read_text())["epochs"]
    assert set(rows[0]["val_dice"]) == {"vertebra"} and rows[0]["val_dice_mean"] is not None
    assert json.loads((coarse / "refine" / "config.json").read_text())["classes"] == ["background", "vertebra"]
    model = load_model(coarse, "cpu")
    assert model.refine is not None and model.refine.stage == "refine" and model.refine.window == (32, 32, 32)
    s = studies[1]
    res = segment_volume(s.volume, model)
    plain = segment_volume(s.volume, model, InferConfig(refine=False))
    assert res.mask.shape == plain.mask.shape == s.volume.shape and "refine" in res.timings
    assert "refine" not in plain.timings
    with pytest.raises(ValueError, match="refine stage"):
        load_model(coarse / "refine", "cpu")


def test_a_format_1_1_model_dir_still_predicts_and_its_training_continues_in_1_2(
    studies: list[SynthStudy], tmp_path: Path
) -> None:
    """A segmenter directory of format 1.1 (best.pt, last.pt, log.json: the configs in tests/data/seg_model_1_1
    were written by that code; its checkpoints are rebuilt here with the keys it wrote) predicts with its own
    weights; a rerun continues its training in format 1.2 (beside its 1.1 refine/); another major, a newer minor
    or an unknown resume state is refused in one line."""
    import shutil

    import torch

    from cspine.errors import ConfigError
    from cspine.runtime import save_checkpoint
    from cspine.seg.config import CONFIG_FORMAT
    from cspine.seg.infer import load_model, segment_volume
    from cspine.seg.models import create_model
    from cspine.seg.train import train_config, train_segmentation

    old = tmp_path / "old"
    shutil.copytree(Path(__file__).parent / "data" / "seg_model_1_1", old)
    nets = {}
    for sub in ("", "refine"):
        cfg = json.loads((old / sub / "config.json").read_text())
        assert cfg["format"] == "1.1"
        torch.manual_seed(len(sub))
        nets[sub] = create_model(cfg["arch"], 1, len(cfg["classes"]), cfg["arch_args"])
        state = nets[sub].state_dict()
        opt = torch.optim.AdamW(nets[sub].parameters()).state_dict()
        log_rows = json.loads((old / sub / "log.json").read_text())
        save_checkpoint({"model": state, "epoch": 1, "score": None}, old / sub / "best.pt")
        save_checkpoint({"format": 1, "model": state, "optimizer": opt, "epoch": 1, "best_score": -1.0,
                         "best_epoch": 1, "bad_epochs": 0, "log": log_rows}, old / sub / "last.pt")  # fmt: skip
    model = load_model(old, "cpu")
    assert model.info["checkpoint"] == str(old / "best.pt") and model.refine is not None
    for net, sub in ((model.net, ""), (model.refine.net, "refine")):
        for k, v in nets[sub].state_dict().items():
            assert torch.equal(net.state_dict()[k], v), k
    assert segment_volume(studies[0].volume, model).mask.shape == studies[0].volume.shape

    saved = json.loads((old / "config.json").read_text())["train"]
    cfg = train_config(**{**saved, "out": old, "data": None, "epochs": 2})
    seen: list[int] = []
    train_segmentation(cfg, studies, on_epoch_end=lambda e, r: seen.append(e))
    assert seen == [2]  # continued after the 1.1 run's epoch 1
    assert json.loads((old / "config.json").read_text())["format"] == CONFIG_FORMAT
    assert not any((old / n).exists() for n in ("best.pt", "last.pt", "log.json")) and (old / "model.pt").exists()
    assert [r["epoch"] for r in json.loads((old / "model.history.json").read_text())["epochs"]] == [1, 2]
    assert load_model(old, "cpu").refine.info["checkpoint"] == str(old / "refine" / "best.pt")
    with pytest.raises(ConfigError, match="different config"):
        train_segmentation(train_config(**{**saved, "out": old, "data": None, "lr": 0.5}), studies)

    (old / "refine" / "last.pt").write_bytes((old / "work" / "model.state.pt").read_bytes())  # not 1.1's
    refine_cfg = json.loads((old / "refine" / "config.json").read_text())["train"]
    with pytest.raises(ConfigError, match="unknown checkpoint format") as info:
        train_segmentation(train_config(**{**refine_cfg, "out": old / "refine", "data": None}), studies)
    assert "\n" not in str(info.value) and "--fresh" in str(info.value)
    for bad in ("2.0", "1.9", 1.1, None):  # another major, a newer minor, a number, none
        data = json.loads((old / "refine" / "config.json").read_text())
        (old / "refine" / "config.json").write_text(json.dumps({**data, "format": bad}))
        with pytest.raises(ConfigError, match="segmentation model format") as info:
            load_model(old, "cpu")
        assert "\n" not in str(info.value) and "refine" in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Command line, end to end (and DDP with two gloo processes)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(studies: list[SynthStudy], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared cache with three masked studies and one without a mask."""
    from cspine.data.cache import save_prepared

    root = tmp_path_factory.mktemp("cache")
    for s in studies:
        save_prepared(root / "train" / s.uid, s.volume, s.mask, {"split": "train"})
    extra = generate_study(0, "small", 5)
    save_prepared(root / "train" / extra.uid, extra.volume, None, {"split": "train"})
    return root


def test_cli_train_segment_evaluate_pseudo_label(cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cspine.cli import main

    model = tmp_path / "model"
    args = ["--arch", "unet-tiny", "--spacing", "4", "--patch", "32", "32", "32", "--epochs", "1"]
    args += ["--iters-per-epoch", "2", "--fold", "-1", "--device", "cpu", "--no-progress"]
    assert main(["train-seg", "--data", str(cache), "--out", str(model), *args]) == 0
    assert json.loads((model / "model.history.json").read_text())["epochs"][0].get("val_dice_mean") is None
    study = next(p for p in sorted((cache / "train").iterdir()) if (p / "mask.nii.gz").exists())
    assert main(["segment", str(study), "--model", str(model), "--out", str(tmp_path / "m.nii.gz"),
                 "--report", str(tmp_path / "r.json")]) == 0  # fmt: skip
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["vertebrae"]) == {f"C{i}" for i in range(1, 8)} and report["shape_zyx"]
    assert main(["eval-seg", "--model", str(model), "--data", str(cache), "--out", str(tmp_path / "ev"),
                 "--no-progress"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["summary"]["studies"] == 3
    pl = tmp_path / "pl"
    assert main(["pseudo-label", "--data", str(cache), "--model", str(model), "--out", str(pl), "--no-progress"]) == 0
    records = sorted(pl.glob("*.json"))
    labelled = [p for p in records if p.name not in ("run.json", "failures.json")]
    assert len(labelled) == 1 and (pl / labelled[0].name.replace(".json", ".nii.gz")).exists()
    rec = json.loads(labelled[0].read_text())
    assert {"ok", "reasons", "found", "missing", "volumes_ml", "vertebrae"} <= set(rec)
    assert (pl / "quality.csv").read_text().startswith("uid,ok,reasons,C1_ml")
    capsys.readouterr()
    again = ["pseudo-label", "--data", str(cache), "--model", str(model), "--out", str(pl), "--all", "--no-progress"]
    assert main(again) == 0  # resumable: the one done is skipped; --all adds the three that have masks
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped_existing"] == 1 and summary["labelled_now"] == 3
    pl2 = tmp_path / "pl2"  # two worker processes write the same masks
    two = ["pseudo-label", "--data", str(cache), "--model", str(model), "--out", str(pl2), "--all", "--workers", "2"]
    assert main([*two, "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["labelled_now"] == 4
    for mask in sorted(pl.glob("*.nii.gz")):
        assert np.array_equal(read_nifti(mask)[0], read_nifti(pl2 / mask.name)[0]), mask.name
    assert main(["eval-seg", "--pred", str(pl), "--truth", str(cache), "--out", str(tmp_path / "ev2")]) == 0
    assert json.loads((tmp_path / "ev2" / "eval.json").read_text())["summary"]["studies"] == 3
    assert main(["segment", str(study), "--model", str(tmp_path), "--out", str(tmp_path / "x.nii.gz")]) == 2


def test_exit_worker_flushes_and_keeps_the_code_only_under_torchrun() -> None:
    from cspine.runtime import exit_worker

    assert exit_worker(3) == 3  # not a torchrun worker: an ordinary return
    code = "import sys; from cspine.runtime import exit_worker; print('done'); sys.stderr.write('log'); exit_worker(3)"
    proc = subprocess.run([sys.executable, "-c", code + "; print('not reached')"], capture_output=True, text=True,
                          env={**os.environ, "WORLD_SIZE": "2"}, timeout=60)  # fmt: skip
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "done\n", "log")


def test_ddp_two_gloo_processes_train_and_only_rank0_writes(cache: Path, tmp_path: Path, torchrun) -> None:
    out = tmp_path / "ddp"
    args = ["train-seg", "--data", str(cache), "--out", str(out), "--arch", "unet-tiny", "--spacing", "4",
            "--patch", "32", "32", "32", "--epochs", "2", "--iters-per-epoch", "1", "--batch-size", "1",
            "--fold", "0", "--folds", "3", "--device", "cpu", "--no-progress"]  # fmt: skip
    proc = torchrun(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["epochs_run"] == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.pt", "config.json", "curve.png", "labels.json", "work", "model.history.csv", "model.history.json",
         "run.json"]
    )  # fmt: skip
    assert proc.stdout.count('"epochs_run"') == 1  # the summary is printed by rank 0 only
    assert proc.stderr.count("model epoch 2:") == 1  # and only rank 0 logs


def test_cervical_box_keeps_every_cervical_voxel_in_place_and_skips_studies_without_one() -> None:
    """train-seg --cervical-box-mm: the crop holds all of C1..C7 plus the margin, at the same patient positions."""
    from cspine.io.volume import Volume
    from cspine.seg.patches import cervical_box

    affine = np.array([[0, 0, 0.5, 10.0], [0, 0.5, 0, -20.0], [2.0, 0, 0, 30.0], [0, 0, 0, 1]])
    hu = np.random.default_rng(0).integers(-1000, 1000, (40, 60, 60)).astype(np.int16)
    mask = np.zeros(hu.shape, np.uint8)
    mask[10:20, 20:30, 25:35] = 3
    mask[30:35, 0:5, 0:5] = 9  # T2: not cervical, outside the box
    box, boxed = cervical_box(Volume(hu, (2.0, 0.5, 0.5), affine), mask, margin_mm=4.0)
    assert boxed.shape == box.shape == (10 + 2 * 2, 10 + 2 * 8, 10 + 2 * 8)
    assert (boxed == 3).sum() == (mask == 3).sum() and not (boxed == 9).any()
    np.testing.assert_array_equal(box.index_to_patient(np.array([2, 8, 8])), Volume(hu, (2.0, 0.5, 0.5), affine)
                                  .index_to_patient(np.array([10, 20, 25])))
    assert np.array_equal(box.array[2:12, 8:18, 8:18], hu[10:20, 20:30, 25:35])
    assert cervical_box(Volume(hu, (2.0, 0.5, 0.5), affine), np.where(mask == 3, 9, mask), 4.0) is None
