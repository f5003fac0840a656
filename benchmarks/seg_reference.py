"""The straightforward implementations that the optimised inference steps replaced, kept as the reference.

``bench_seg.py`` times them in the same process as the optimised ones (a ratio that survives a busy machine), and
``tests/test_seg_speed.py`` checks that both give the same masks. These are the versions of cspine 04c3f06:
logits interpolated with dense per-axis matrices at every voxel of the box, and post-processing that scans the
whole study grid for every step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from cspine.io.volume import Volume
from cspine.labels import CERVICAL_VALUES
from cspine.seg.config import OTHER_CLASS
from cspine.seg.grid import (
    Foreground,
    GridMap,
    argmax0,
    axis_taps,
    points_to_study_box,
    resample_axis,
)
from cspine.seg.infer import InferConfig, SegModel, SegResult
from cspine.seg.postprocess import (
    _FULL,
    _union_box,
    describe,
    fix_order,
    handover_notes,
    most_touched,
    remove_small,
)
from cspine.seg.presence import SPINE_ABSENT, SPINE_PRESENT, check_presence

if TYPE_CHECKING:
    import torch


def study_box_ref(
    logits: torch.Tensor, gm: GridMap, margin: int = 2, cervical_only: bool = False
) -> tuple[np.ndarray, np.ndarray] | None:
    """Canonical study-voxel box [lo, hi] (inclusive) covered by the predicted vertebrae plus ``margin`` model
    voxels, or None when there are none. Only this box is resampled back.

    ``cervical_only``: the box of the largest piece of each of C1..C7 (what post-processing keeps), which the
    refinement stage runs on: stray specks would otherwise stretch it over the whole scan (measured: 2-2.6x the
    voxels on generated studies).
    """
    coarse = logits.argmax(0).numpy()
    if cervical_only:
        pts = []
        for c in range(1, OTHER_CLASS):
            pieces, n = ndimage.label(coarse == c, np.ones((3, 3, 3), dtype=bool))
            if n:
                largest = int(np.argmax(np.bincount(pieces.ravel())[1:])) + 1
                box = ndimage.find_objects(pieces, max_label=largest)[largest - 1]
                pts += [[b.start for b in box], [b.stop - 1 for b in box]]
        fg = np.array(pts, dtype=np.int64).reshape(-1, 3)
    else:
        fg = np.argwhere(coarse > 0)
    return points_to_study_box(fg, gm, margin)


def logits_to_labels_ref(
    logits: torch.Tensor,
    gm: GridMap,
    margin: int = 2,
    slab: int = 16,
    foreground: Foreground | None = None,
    gate: float = 8.0,
) -> np.ndarray:
    """Network logits (C, model grid) -> class labels (uint8) on the study's grid, in canonical orientation.

    Logits are interpolated linearly to every study voxel (finer than nearest-neighbour upsampling of the coarse
    argmax: on 2 mm output that is worth several Dice points) but only inside :func:`study_box`, in slabs, so
    full-size studies stay within memory.

    Inside ``foreground``'s box (from the refinement stage) its mask decides which voxels are vertebra and the
    logits only name them (argmax over the non-background classes). A refined voxel stays background where the
    coarse background logit beats the best vertebra logit by more than ``gate``: far from any vertebra the coarse
    model knows better (skull base, mandible and ribs are bone, but not vertebrae).
    """
    import torch

    out = np.zeros(gm.shape, dtype=np.uint8)
    box = study_box_ref(logits, gm, margin)
    if box is None:
        return out
    f_lo, f_hi = box
    if foreground is not None:
        r_lo, r_hi = foreground.lo, foreground.lo + np.array(foreground.mask.shape) - 1
        if np.any(r_lo < f_lo) or np.any(r_hi > f_hi):
            raise ValueError(f"refined box {r_lo.tolist()}..{r_hi.tolist()} outside {f_lo.tolist()}..{f_hi.tolist()}")
    sc = gm.scale
    lo = [max(0, math.floor(f_lo[a] / sc[a] + 1e-6)) for a in range(3)]
    hi = [min(gm.model_shape[a] - 1, math.ceil(f_hi[a] / sc[a] - 1e-6)) for a in range(3)]
    crop = logits[:, lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1].float()
    taps = []
    for a in range(3):
        n_f = int(f_hi[a] - f_lo[a] + 1)
        taps.append(axis_taps(crop.shape[a + 1], n_f, 1.0 / sc[a], False, offset=f_lo[a] / sc[a] - lo[a]))
    with torch.inference_mode():
        for z0 in range(0, taps[0][0].shape[0], slab):
            zi, zw = taps[0][0][z0 : z0 + slab], taps[0][1][z0 : z0 + slab]
            block = resample_axis(crop, 1, zi, zw)
            block = resample_axis(block, 2, *taps[1])
            block = resample_axis(block, 3, *taps[2])
            labels = argmax0(block)
            z = int(f_lo[0]) + z0
            if foreground is not None:
                _apply_foreground(block, labels, foreground, np.array([z, f_lo[1], f_lo[2]]), gate)
            out[z : z + block.shape[1], f_lo[1] : f_hi[1] + 1, f_lo[2] : f_hi[2] + 1] = labels.numpy()
    return out


def _apply_foreground(
    block: torch.Tensor, labels: torch.Tensor, fg: Foreground, origin: np.ndarray, gate: float
) -> None:
    """In place: labels (z, y, x) of a slab at ``origin`` (study voxels) take the refined foreground where it
    overlaps, named by the best non-background logit of ``block`` (C, z, y, x)."""
    import torch

    a = np.maximum(fg.lo, origin)
    b = np.minimum(fg.lo + np.array(fg.mask.shape), origin + np.array(labels.shape))
    if np.any(b <= a):
        return
    blk = tuple(slice(int(i - o), int(j - o)) for i, j, o in zip(a, b, origin, strict=True))
    ref = tuple(slice(int(i - o), int(j - o)) for i, j, o in zip(a, b, fg.lo, strict=True))
    sub = block[(slice(None), *blk)]
    best, ident = sub[1:].max(0)
    keep = torch.from_numpy(np.ascontiguousarray(fg.mask[ref])) & (sub[0] - best <= gate)
    labels[blk] = torch.where(keep, ident.to(torch.uint8) + 1, torch.zeros_like(labels[blk]))


def _rel(sl: tuple[slice, ...], box: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(sl, box, strict=True))


def keep_largest_components_ref(mask: np.ndarray, values: tuple[int, ...] = CERVICAL_VALUES) -> list[str]:
    """In place: keep the largest 26-connected piece of each value; other pieces go to the neighbour they touch most.

    "Touch" counts shared faces; a piece that touches no kept labelled voxel becomes background. All pieces are
    handled together (one id array over the labelled box, six shifted comparisons), so an untrained model's
    thousands of specks cost little more than a few. Returns notes on what moved.
    """
    objects = ndimage.find_objects(mask)
    box = _union_box(objects, mask.shape)
    if box is None:
        return []
    sub = mask[box]  # a view: edits go to mask
    piece = np.zeros(sub.shape, dtype=np.int32)
    piece_value = [0]
    for v in values:
        if v > len(objects) or objects[v - 1] is None:
            continue
        sl = _rel(objects[v - 1], box)
        comp, n = ndimage.label(sub[sl] == v, structure=_FULL)
        if n <= 1:
            continue
        keep = int(np.argmax(np.bincount(comp.ravel())[1:])) + 1
        remap = np.zeros(n + 1, dtype=np.int32)
        others = [k for k in range(1, n + 1) if k != keep]
        remap[others] = np.arange(len(piece_value), len(piece_value) + len(others), dtype=np.int32)
        ids = remap[comp]
        moved = ids > 0
        piece[sl][moved] = ids[moved]
        sub[sl][moved] = 0
        piece_value += [v] * len(others)
    if len(piece_value) == 1:
        return []
    n_pieces = len(piece_value)
    pbox = ndimage.find_objects((piece > 0).astype(np.uint8))[0]
    lo = [max(0, s.start - 1) for s in pbox]
    hi = [min(n, s.stop + 1) for s, n in zip(pbox, sub.shape, strict=True)]
    p_reg = piece[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    m_reg = sub[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    shape = p_reg.shape
    pairs: list[np.ndarray] = []  # (piece id * 256 + touching kept value), one entry per touching face
    for axis in range(3):
        for k in (-1, 1):
            d = [0, 0, 0]
            d[axis] = k
            src = tuple(slice(max(0, -o), n - max(0, o)) for o, n in zip(d, shape, strict=True))
            dst = tuple(slice(max(0, o), n - max(0, -o)) for o, n in zip(d, shape, strict=True))
            a, b = p_reg[src], m_reg[dst]
            sel = (a > 0) & (b > 0)
            pairs.append(a[sel].astype(np.int64) * 256 + b[sel])
    target = most_touched(pairs, n_pieces)
    sizes = np.bincount(piece.ravel(), minlength=n_pieces)
    moved_mask = piece > 0
    sub[moved_mask] = target[piece[moved_mask]]
    return handover_notes(piece_value, target, sizes)


def finish_labels_ref(mask: np.ndarray, vol: Volume, cfg: InferConfig | None = None) -> SegResult:
    """``cspine.seg.infer.finish_labels`` as it was: every step on the whole grid."""
    cfg = cfg or InferConfig()
    t = time.perf_counter()
    out = np.array(mask, dtype=np.uint8, copy=True)
    voxel = float(abs(np.linalg.det(vol.affine[:3, :3])))
    cleanup = keep_largest_components_ref(out) if cfg.postprocess.keep_largest else []
    changes = remove_small(out, voxel, cfg.postprocess.min_volume_mm3)
    if cfg.postprocess.fix_order:
        changes += fix_order(out, vol.affine)
    presence: dict = {"cervical_spine": SPINE_PRESENT, "rejected": {}}
    dropped: list[str] = []
    if cfg.presence is not None:
        out, presence, dropped = check_presence(out, vol, cfg.presence)
    vertebrae, warnings = describe(out, vol, tuple(slice(0, n) for n in out.shape))
    for name, why in presence["rejected"].items():
        vertebrae[name]["rejected"] = why
    if presence["cervical_spine"] == SPINE_ABSENT:
        warnings = [w for w in warnings if not w.endswith(" not found")]
    timings = {"postprocess": time.perf_counter() - t}
    return SegResult(out, vertebrae, dropped + warnings + changes, timings, cleanup, presence["cervical_spine"])


def _padded_to(stage: SegModel) -> Callable[[np.ndarray, int], tuple[np.ndarray, tuple[int, int, int]]]:
    """``infer._pad_to`` as the refinement stage used it: its windows ran over the image padded to the divisor."""
    from cspine.seg import infer
    from cspine.seg.models import get_spec

    old = max(stage.preprocess.divisor, get_spec(stage.arch).divisor)
    pad = infer._pad_to
    return lambda image, divisor: pad(image, old if divisor == 1 else divisor)  # 1: the refinement windows now


def segment_volume_ref(
    vol: Volume, model: SegModel, cfg: InferConfig | None = None, old_windows: bool = True
) -> SegResult:
    """``cspine.seg.infer.segment_volume`` with the reference steps (the networks and preprocessing are shared).

    ``old_windows``: the refinement stage's windows placed as before, over its box padded to the divisor (False:
    as now, so that the masks must come out identical).
    """
    from unittest import mock

    from cspine.seg import infer

    def whole_grid(
        logits: torch.Tensor, gm: GridMap, foreground: Foreground | None, gate: float, lut: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        classes = logits_to_labels_ref(logits, gm, foreground=foreground, gate=gate)
        return np.zeros(3, dtype=np.int64), lut[classes]

    with (
        mock.patch.object(infer, "study_box", study_box_ref),
        mock.patch.object(infer, "logits_to_labels", logits_to_labels_ref),
        mock.patch.object(infer, "labels_in_box", whole_grid),
        mock.patch.object(infer, "finish_labels", finish_labels_ref),
        mock.patch.object(
            infer, "_pad_to", _padded_to(model.refine) if old_windows and model.refine else infer._pad_to
        ),
    ):
        return infer.segment_volume(vol, model, cfg)
