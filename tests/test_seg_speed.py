"""The optimised inference steps give the same masks and reports as the straightforward ones they replaced.

The reference (benchmarks/seg_reference.py) interpolates every class at every voxel of the box and post-processes
on the whole grid; the optimised code fills model cells whose corners agree without interpolating and works in
the labels' bounding box. Equality is asserted voxel for voxel on synthetic logits and label maps, including the
edge cases (touching labels, a label in pieces, out-of-order labels, labels on the grid's edge, an empty map).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from benchmarks.seg_reference import finish_labels_ref, keep_largest_components_ref, logits_to_labels_ref, study_box_ref
from scipy import ndimage

from cspine.io.volume import Volume
from cspine.seg.config import OTHER_VALUE
from cspine.seg.grid import Foreground, GridMap, labels_in_box, logits_to_labels, make_gridmap, study_box
from cspine.seg.infer import InferConfig, finish_labels
from cspine.seg.postprocess import clean_box, keep_largest_components, label_box, postprocess
from cspine.seg.presence import PresenceConfig


def _smooth_logits(shape: tuple[int, ...], seed: int, classes: int = 9) -> np.ndarray:
    """Logits with blobs of each class and a noisy background, so that boundaries run through many cells."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    out = rng.normal(0.0, 1.0, (classes, *shape)).astype(np.float32)
    out = np.stack([ndimage.gaussian_filter(c, 1.0) * 6.0 for c in out])
    out[0] += 1.0  # mostly background
    return out.astype(np.float32)


def _gridmap(study: tuple[int, int, int], spacing: tuple[float, float, float], model_mm: float, flip: bool) -> GridMap:
    aff = np.zeros((4, 4))
    aff[2, 0], aff[1, 1], aff[0, 2], aff[3, 3] = spacing[0] * (-1 if flip else 1), spacing[1], spacing[2], 1.0
    return make_gridmap(study, aff, (model_mm,) * 3)


@pytest.mark.parametrize(
    ("study", "spacing", "model_mm"),
    [
        ((48, 44, 46), (0.7, 0.45, 0.45), 2.0),  # fine study, coarse model grid (the usual case)
        ((30, 40, 40), (2.5, 1.0, 1.0), 2.0),  # slices thicker than the model grid: cells without voxels
        ((3, 40, 40), (0.5, 1.0, 1.0), 2.0),  # a model grid one voxel thick along z
    ],
)
def test_logits_to_labels_matches_dense_interpolation(
    study: tuple[int, int, int], spacing: tuple[float, float, float], model_mm: float
) -> None:
    import torch

    for seed, flip in itertools.product(range(2), (False, True)):
        gm = _gridmap(study, spacing, model_mm, flip)
        logits = torch.from_numpy(_smooth_logits(gm.model_shape, seed))
        new, ref = logits_to_labels(logits, gm), logits_to_labels_ref(logits, gm)
        assert (ref > 0).any() and len(np.unique(ref)) > 3  # the case has boundaries to get wrong
        np.testing.assert_array_equal(new, ref)
        for cervical in (False, True):
            a, b = study_box(logits, gm, 3, cervical), study_box_ref(logits, gm, 3, cervical)
            assert [x.tolist() for x in a] == [x.tolist() for x in b]
        box = study_box(logits, gm)
        rng = np.random.default_rng(seed)
        lo = box[0] + (box[1] - box[0]) // 4
        hi = box[1] - (box[1] - box[0]) // 5
        fine = _smooth_logits(tuple(int(n) for n in hi - lo + 1), seed + 10, classes=1)[0] > 0.5
        fine |= rng.random(fine.shape) < 0.05
        q = logits[0] - logits[1:].max(0).values  # background minus the best vertebra: what the gate cuts
        gates = [float(np.quantile(q.numpy(), f)) for f in (0.3, 0.7)] + [8.0]
        for gate, mask in itertools.product(gates, (fine, np.ones_like(fine))):
            fg = Foreground(lo, mask)
            np.testing.assert_array_equal(
                logits_to_labels(logits, gm, foreground=fg, gate=gate),
                logits_to_labels_ref(logits, gm, foreground=fg, gate=gate),
            )


def test_logits_to_labels_ties_and_no_vertebra() -> None:
    import torch

    gm = _gridmap((20, 20, 20), (0.5, 0.5, 0.5), 2.0, False)
    flat = torch.zeros((9, *gm.model_shape))
    assert labels_in_box(flat, gm) is None and not logits_to_labels(flat, gm).any()  # ties: the first class
    flat[4, 2:5, 3:6, 1:4] = 1.0
    flat[5, 3:5, 3:6, 1:4] = 1.0  # exact ties between two vertebrae: the first wins, as argmax
    np.testing.assert_array_equal(logits_to_labels(flat, gm), logits_to_labels_ref(flat, gm))
    assert set(np.unique(logits_to_labels(flat, gm))) == {0, 4}


def _label_maps() -> dict[str, np.ndarray]:
    """Synthetic label maps with the cases post-processing must get right."""
    shape = (40, 24, 24)
    maps = {"empty": np.zeros(shape, np.uint8)}
    stack = np.zeros(shape, np.uint8)
    for k, v in enumerate([1, 2, 3, 4, 5, 6, 7]):
        z0 = 34 - 5 * k
        stack[z0 : z0 + 4, 6:18, 6:18] = v  # touching neighbours (z0 + 4 is the next one's top)
    stack[:4, 8:16, 8:16] = OTHER_VALUE
    maps["touching"] = stack
    pieces = stack.copy()
    pieces[25:26, 8:16, 8:16] = 4  # C4 in three pieces: a slab inside C3, a block far away
    pieces[2:4, 20:23, 20:23] = 4
    pieces[25, 2, 2] = 2  # a detached C2 speck
    pieces[12, 9, 9] = 6  # a C6 speck inside C5
    pieces[0, 23, 23] = OTHER_VALUE
    pieces[0:2, 8:10, 5:8] = 7  # a C7 piece touching only the other vertebra: handed to it, widening its box
    maps["pieces"] = pieces
    swapped = stack.copy()
    swapped[stack == 2], swapped[stack == 3] = 3, 2  # C3 above C2
    swapped[stack == 6] = 0  # and C6 missing
    swapped[30:32, 0:3, 0:3] = 7  # a small C7 near the top: out of line, removed
    maps["out_of_order"] = swapped
    edge = stack.copy()
    edge[36:, 6:18, 6:18] = 1  # C1 reaches the top slice, C7 the bottom one and the in-plane edge
    edge[4:8, 0:18, 6:24] = 7
    maps["edge"] = edge
    rng = np.random.default_rng(0)
    noisy = stack.copy()
    specks = rng.random(shape) < 0.01
    noisy[specks] = rng.choice([1, 2, 3, 4, 5, 6, 7, OTHER_VALUE], int(specks.sum()))
    maps["specks"] = noisy
    maps["single"] = np.zeros(shape, np.uint8)
    maps["single"][10:14, 5:9, 5:9] = 3
    return maps


@pytest.mark.parametrize("name", list(_label_maps()))
def test_postprocess_and_report_match_whole_grid_reference(name: str) -> None:
    mask = _label_maps()[name]
    aff = np.zeros((4, 4))
    aff[2, 0], aff[1, 1], aff[0, 2], aff[3, 3], aff[:3, 3] = 2.0, 1.0, 1.0, 1.0, [-12.0, 7.0, 30.0]
    hu = np.where(mask > 0, 300, 0).astype(np.int16)
    vol = Volume(hu, (2.0, 1.0, 1.0), aff, instance_numbers=np.arange(mask.shape[0], 0, -1))
    # the reference predates the naming by anatomy (tests/test_naming.py), which these label maps without a skull,
    # their columns at the top of the grid, would flag as not checked against one
    small = InferConfig(presence=PresenceConfig(min_volume_ml=0.1, min_step_mm=2.0), naming=None)
    for cfg in (InferConfig(presence=None, naming=None), InferConfig(naming=None), small):
        a, b = finish_labels(mask, vol, cfg), finish_labels_ref(mask, vol, cfg)
        np.testing.assert_array_equal(a.mask, b.mask)
        assert (a.vertebrae, a.warnings, a.cleanup, a.cervical_spine) == (
            b.vertebrae,
            b.warnings,
            b.cleanup,
            b.cervical_spine,
        )
    out = mask.copy()
    ref = mask.copy()
    assert keep_largest_components(out) == keep_largest_components_ref(ref)
    np.testing.assert_array_equal(out, ref)
    cleaned, _, _ = postprocess(mask, aff)
    assert cleaned is not mask and cleaned.dtype == np.uint8
    tracked = mask.copy()
    objects = clean_box(tracked, aff, (0, 0, 0))[2]  # the boxes it hands on without scanning again
    assert objects == ndimage.find_objects(tracked) + [None] * (len(objects) - len(ndimage.find_objects(tracked)))
    if name == "pieces":  # the case exercises what it is named for
        cleanup = finish_labels(mask, vol).cleanup
        assert any("C4: 2 extra piece(s)" in c for c in cleanup) and any("to other" in c for c in cleanup)
    if name == "out_of_order":
        assert any("relabelled" in w for w in finish_labels(mask, vol, small).warnings)


def test_label_box_holds_every_label_with_a_margin() -> None:
    mask = np.zeros((10, 12, 14), np.uint8)
    assert label_box(mask) is None
    mask[0, 3, 5] = 2
    mask[4, 7, 13] = 255
    box = label_box(mask)
    assert box == (slice(0, 6), slice(2, 9), slice(4, 14))  # one voxel around, clipped at the grid
    assert label_box(mask, pad=0) == (slice(0, 5), slice(3, 8), slice(5, 14))


@pytest.mark.slow
@pytest.mark.parametrize(("seed", "profile"), [(1201, "default"), (1203, "wide")])
def test_shipped_segmenter_masks_match_the_reference_steps(seed: int, profile: str) -> None:
    """End to end on generated studies: the optimised steps and the reference give the same mask and report."""
    from benchmarks.seg_reference import segment_volume_ref

    from cspine.seg.infer import load_model, segment_volume
    from cspine.seg.shipped import shipped_model
    from cspine.synth import generate_study

    path = shipped_model()
    if path is None:
        pytest.skip("no shipped segmenter in this installation")
    model = load_model(path, "cpu")
    for index in range(2):
        vol = generate_study(seed, "small", index, profile=profile).volume
        new, ref = segment_volume(vol, model), segment_volume_ref(vol, model, old_windows=False)
        assert (ref.mask > 0).any()
        np.testing.assert_array_equal(new.mask, ref.mask)
        assert (new.vertebrae, new.warnings, new.cleanup) == (ref.vertebrae, ref.warnings, ref.cleanup)
