"""Inference: a study in, C1..C7 masks on the study's own grid and a per-vertebra report out.

The model directory is all that is needed (config.json gives the network name, classes and preprocessing;
best.pt the weights), so a later model bundle can ship it as a sub-folder ``seg/``; :func:`load_model` accepts
either. Pipeline: canonical model grid (:func:`cspine.seg.data.to_model_grid`) -> network (whole volume, or
sliding window when large) -> logits interpolated back onto every study voxel around the spine -> post-processing
-> report.

Example::

    from cspine.io import load_series, save_nifti
    from cspine.seg.infer import load_model, segment_volume
    vol = load_series("study/")
    res = segment_volume(vol, load_model("seg_model"))
    save_nifti(res.mask, vol, "mask.nii.gz")
    res.vertebrae["C2"]["instance_numbers"]
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cspine.engine.config import from_dict
from cspine.io.volume import Volume
from cspine.seg.config import (
    CLASSES,
    REFINE_DIR,
    STAGE_CLASSES,
    PostprocessConfig,
    PreprocessConfig,
    load_model_config,
)
from cspine.seg.data import (
    Foreground,
    GridMap,
    canonical_crop,
    class_to_value_lut,
    labels_in_box,
    logits_to_labels,
    nonzero_box,
    study_box,
    to_model_grid,
)
from cspine.seg.naming import NamingConfig, name_levels
from cspine.seg.postprocess import clean_box, describe, label_box
from cspine.seg.presence import SPINE_ABSENT, SPINE_PRESENT, PresenceConfig, check_presence

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferConfig:
    """How inference runs (not how the model was trained: that comes from the model directory).

    Attributes:
        max_voxels: whole-volume forward up to this many model-grid voxels, sliding window beyond.
        roi, overlap: sliding-window size (model voxels) and overlap.
        threads: torch CPU threads (None: torch's default).
        refine: use the model's refinement stage (MODEL_DIR/refine) when it has one.
        refine_context_mm: image around the coarse C1..C7 that the refinement stage sees.
        window_batch: windows per forward pass for a model that always predicts in windows of its training patch
            (the refinement stage): small windows one at a time leave CPU threads waiting (docs/segmentation.md,
            Measured). Large whole-volume windows stay one at a time (memory).
        presence: the anatomical limits a labelled level must meet to count as a cervical vertebra
            (:mod:`cspine.seg.presence`); the levels that fail are cleared from the mask and named. None: no
            check (pseudo-labels of training studies, which are cervical CTs by construction).
        refine_gate: a voxel the refinement stage calls vertebra stays background where the coarse background
            logit beats the best vertebra logit by more than this (a guard against other bones far from the
            spine; the value chosen: docs/segmentation.md, Measured).
        naming: name the levels by anatomy (:mod:`cspine.seg.naming`: the first vertebra under the cranial cavity
            is C1, the one under C6 is C7); None keeps the network's names.
        body_margin_mm: the coarse stage runs on the box of the non-air voxels plus this margin (the rest is air,
            which the network reads as the zeros it pads with); None runs it on the whole grid.
    """

    device: str = "auto"
    checkpoint: str = ""
    max_voxels: int = 8_000_000
    roi: tuple[int, int, int] = (128, 160, 160)
    overlap: float = 0.25
    threads: int | None = None
    refine: bool = True
    refine_context_mm: float = 16.0
    refine_gate: float = 8.0
    window_batch: int = 4
    body_margin_mm: float | None = 16.0
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    presence: PresenceConfig | None = field(default_factory=PresenceConfig)
    naming: NamingConfig | None = field(default_factory=NamingConfig)


@dataclass
class SegModel:
    """A network ready to predict, with the preprocessing it was trained with (and its refinement stage).

    ``window``: predict in sliding windows of this size (the training patch) even when the whole input would fit.
    The refinement stage needs it: trained on 48^3 patches, its instance norms see other statistics on a whole
    neck box, and whole-box prediction lost foreground (val Dice C2..C7 0.90-0.92 vs 0.92-0.93 in windows).
    """

    net: nn.Module
    arch: str
    preprocess: PreprocessConfig
    device: torch.device
    path: Path | None = None
    classes: tuple[str, ...] = CLASSES
    info: dict[str, Any] = field(default_factory=dict)
    stage: str = "coarse"
    refine: SegModel | None = None
    window: tuple[int, int, int] | None = None


@dataclass
class SegResult:
    """Segmentation of one study.

    Attributes:
        mask: uint8 (z, y, x) on the study's grid (same shape and affine as the input volume): 1..7 = C1..C7,
            OTHER_VALUE (255) = other vertebrae (when kept).
        vertebrae: per C1..C7 name: present, voxels, volume_ml, slices, instance_numbers, bbox_zyx,
            centroid_zyx, centroid_lps, cut_off (see :func:`cspine.seg.postprocess.describe`).
        warnings: missing or cut-off vertebrae, vertebrae removed or relabelled by post-processing.
        timings: seconds per step.
        cleanup: the stray pieces post-processing handed to a neighbour or dropped (routine).
        cervical_spine: "present", or "absent" when no labelled level passed the anatomical checks.
    """

    mask: np.ndarray
    vertebrae: dict[str, dict[str, Any]]
    warnings: list[str]
    timings: dict[str, float]
    cleanup: list[str] = field(default_factory=list)
    cervical_spine: str = SPINE_PRESENT

    def to_json(self) -> dict[str, Any]:
        """The report without the mask (for JSON files and the pseudo-label quality record)."""
        return {
            "vertebrae": self.vertebrae,
            "cervical_spine": self.cervical_spine,
            "found": [k for k, v in self.vertebrae.items() if v["present"]],
            "warnings": self.warnings,
            "cleanup": self.cleanup,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }


def resolve_model_dir(path: str | Path) -> Path:
    """The segmentation model directory at ``path`` or at ``path/seg`` (inside a model bundle)."""
    p = Path(path)
    if (p / "config.json").exists():
        return p
    if (p / "seg" / "config.json").exists():
        return p / "seg"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such model directory")
    raise FileNotFoundError(f"{p}: not a segmentation model directory (no config.json here or in seg/)")


def load_model(path: str | Path, device: str = "auto", checkpoint: str = "") -> SegModel:
    """Rebuild the network named in MODEL_DIR/config.json and load its weights (``weights_only=True``), with the
    refinement stage in MODEL_DIR/refine when there is one. ``checkpoint``: a file name in each stage's directory
    instead of its weights (model.pt; best.pt in 1.0/1.1 directories)."""
    model_dir = resolve_model_dir(path)
    model = load_stage(model_dir, device, checkpoint)
    if model.stage != "coarse":
        raise ValueError(f"{model_dir}: a {model.stage} stage; load the model directory that holds it as {REFINE_DIR}/")
    if (model_dir / REFINE_DIR / "config.json").exists():
        model.refine = load_stage(model_dir / REFINE_DIR, device, checkpoint)
        if model.refine.stage != "refine":
            raise ValueError(f"{model_dir / REFINE_DIR}: stage {model.refine.stage!r}, expected 'refine'")
    return model


def load_stage(model_dir: Path, device: str, checkpoint: str) -> SegModel:
    """One stage's network from its directory (its weights, else the resume state of a run still in progress)."""
    import torch

    from cspine.engine.model_dir import load_weights
    from cspine.runtime import resolve_device
    from cspine.seg.model_dir import weights_path
    from cspine.seg.models import create_model

    cfg = load_model_config(model_dir)
    train = cfg["train"]
    stage = str(train.get("stage", "coarse"))
    pre = from_dict(PreprocessConfig, train["preprocess"])
    expected = STAGE_CLASSES.get(stage)
    classes = tuple(cfg.get("classes", CLASSES))
    if classes != expected:
        raise ValueError(f"{model_dir}: model classes {classes} differ from this cspine's {stage} classes {expected}")
    dev = resolve_device(device)
    ckpt_path = model_dir / checkpoint if checkpoint else weights_path(model_dir, cfg.get("format"))
    weights, ckpt = load_weights(ckpt_path)
    net = create_model(train["arch"], 1, len(classes), cfg.get("arch_args"))  # 1.0 directories: the registry's
    try:
        net.load_state_dict(weights)
    except (KeyError, RuntimeError) as exc:
        raise ValueError(f"{ckpt_path}: weights do not fit model {train['arch']!r} ({exc})") from exc
    net.to(dev).eval()
    if dev.type == "cpu":
        # oneDNN's 3D convolutions are faster on channels-last tensors (same results; cls_results.md, session 15)
        net.to(memory_format=torch.channels_last_3d)
    info = {"epoch": ckpt.get("epoch"), "score": ckpt.get("score"), "checkpoint": str(ckpt_path)}
    window = tuple(train["patch"]) if stage == "refine" else None
    return SegModel(net, train["arch"], pre, dev, model_dir, classes, info, stage, window=window)


def _pad_to(image: np.ndarray, divisor: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    shape = image.shape
    target = [int(np.ceil(s / divisor) * divisor) for s in shape]
    if list(shape) == target:
        return image, shape  # type: ignore[return-value]
    out = np.zeros(target, dtype=image.dtype)
    out[: shape[0], : shape[1], : shape[2]] = image
    return out, shape  # type: ignore[return-value]


def predict_logits(model: SegModel, image: np.ndarray, cfg: InferConfig | None = None) -> torch.Tensor:
    """Network logits (C, z, y, x) float32 on CPU for a model-grid image (whole volume or sliding window)."""
    import torch

    from cspine.seg.models import get_spec

    cfg = cfg or InferConfig()
    # Windows of the training patch are already a multiple of the divisor; padding the image as well would only
    # add rows of windows that are mostly padding.
    divisor = 1 if model.window else max(model.preprocess.divisor, get_spec(model.arch).divisor)
    padded, shape = _pad_to(image.astype(np.float32, copy=False), divisor)
    x = torch.from_numpy(padded)[None, None].to(model.device)
    if model.device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    amp = model.device.type == "cuda"
    with torch.inference_mode(), torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=amp):
        if model.window is None and padded.size <= cfg.max_voxels:
            y = model.net(x)
        else:
            from monai.inferers import sliding_window_inference

            roi = model.window or tuple(min(r, s) for r, s in zip(cfg.roi, padded.shape, strict=True))
            batch = cfg.window_batch if model.window else 1
            y = sliding_window_inference(x, roi, batch, model.net, overlap=cfg.overlap, mode="gaussian")
    return y[0, :, : shape[0], : shape[1], : shape[2]].float().cpu().contiguous()


#: Logit of the background class (and minus that of every other class) outside the body's box.
BACKGROUND_MARGIN = 30.0


def body_box(image: np.ndarray, margin: int) -> tuple[slice, slice, slice] | None:
    """The box of a model-grid image's voxels above its window's floor (HU above the window's lower end: body,
    table, headrest), plus ``margin`` voxels; None when the image holds nothing above it."""
    corners = nonzero_box(image > 0.0)
    if not len(corners):
        return None
    lo = np.maximum(corners[0] - margin, 0)
    hi = np.minimum(corners[1] + margin + 1, image.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]


def _coarse_logits(model: SegModel, image: np.ndarray, gm: GridMap, cfg: InferConfig) -> torch.Tensor:
    """The coarse stage's logits on the whole model grid, computed only over the body's box.

    Why: a real CT's field of view is often 2-3 times the patient's width (a 500 mm head-and-neck field). The
    network, trained on generated fields that hug the body, lost the upper vertebrae in that much air, and the air
    cost as much network time as the body (docs/segmentation.md, Design). Outside the box every voxel is background.
    """
    import torch

    box = None if cfg.body_margin_mm is None else body_box(image, math.ceil(cfg.body_margin_mm / min(gm.model_spacing)))
    if box is None or all(b.stop - b.start == n for b, n in zip(box, image.shape, strict=True)):
        return predict_logits(model, image, cfg)
    inner = predict_logits(model, np.ascontiguousarray(image[box]), cfg)
    logits = torch.full((inner.shape[0], *image.shape), -BACKGROUND_MARGIN, dtype=inner.dtype)
    logits[0] = BACKGROUND_MARGIN
    logits[(slice(None), *box)] = inner
    return logits


def refine_foreground(
    vol: Volume, gm: GridMap, logits: torch.Tensor, refine: SegModel, cfg: InferConfig
) -> Foreground | None:
    """Which voxels around the coarse C1..C7 are vertebra, by the refinement stage on its finer grid; None when
    the coarse stage found none.

    Only the box around the coarse C1..C7 (plus ``cfg.refine_context_mm``) is resampled and run; vertebrae further
    down keep the coarse labels, so the cost follows the neck, not the scan. The context matters: with 4 mm
    above C1 the network saw padding where the skull base should be and missed most of C1 (val Dice 0.41;
    16 mm: 0.90).
    """
    context = math.ceil(cfg.refine_context_mm / min(gm.model_spacing))
    box = study_box(logits, gm, margin=context, cervical_only=True)
    outer = study_box(logits, gm)
    if box is None or outer is None:
        return None
    lo, hi = box
    image, sub_gm = to_model_grid(canonical_crop(vol, gm, lo, hi), refine.preprocess)
    fine = predict_logits(refine, image, cfg)
    del image
    mask = logits_to_labels(fine, sub_gm) > 0
    a, b = np.maximum(lo, outer[0]), np.minimum(hi, outer[1])  # what logits_to_labels resamples back
    return Foreground(a, mask[tuple(slice(int(i), int(j) + 1) for i, j in zip(a - lo, b - lo, strict=True))])


def segment_volume(vol: Volume, model: SegModel | str | Path, cfg: InferConfig | None = None) -> SegResult:
    """Segment C1..C7 (and other vertebrae) in one study; the mask is on ``vol``'s grid."""
    import torch

    cfg = cfg or InferConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if not isinstance(model, SegModel):
        model = load_model(model, cfg.device, cfg.checkpoint)
        timings["load_model"] = time.perf_counter() - t0
    t = time.perf_counter()
    image, gm = to_model_grid(vol, model.preprocess)
    timings["preprocess"] = time.perf_counter() - t
    t = time.perf_counter()
    logits = _coarse_logits(model, image, gm, cfg)
    del image
    timings["model"] = time.perf_counter() - t
    foreground = None
    if cfg.refine and model.refine is not None:
        t = time.perf_counter()
        foreground = refine_foreground(vol, gm, logits, model.refine, cfg)
        timings["refine"] = time.perf_counter() - t
    t = time.perf_counter()
    mask = np.zeros(vol.shape, dtype=np.uint8)
    lut = class_to_value_lut(cfg.postprocess.keep_other)
    found = labels_in_box(logits, gm, foreground=foreground, gate=cfg.refine_gate, lut=lut)
    del logits
    if found is not None:
        lo, values = found
        box = tuple(slice(int(a), int(a) + n) for a, n in zip(lo, values.shape, strict=True))
        gm.to_canonical(mask)[box] = values  # a view: fills mask
        del values
    timings["resample_back"] = time.perf_counter() - t
    res = finish_labels(mask, vol, cfg)
    res.timings = {**timings, **res.timings}
    res.timings["total"] = time.perf_counter() - t0
    return res


def finish_labels(mask: np.ndarray, vol: Volume, cfg: InferConfig | None = None) -> SegResult:
    """Any C1..C7 label map on ``vol``'s grid (a network's, TotalSegmentator's, a user's) -> cleaned and described.

    Post-processing (one piece per vertebra, cranio-caudal order, specks), the names checked against the anatomy
    (:mod:`cspine.seg.naming`, unless ``cfg.naming`` is None), the anatomical checks of :mod:`cspine.seg.presence`
    (unless ``cfg.presence`` is None), then the per-vertebra description.
    """
    cfg = cfg or InferConfig()
    t = time.perf_counter()
    if mask.shape != vol.shape:
        raise ValueError(f"mask shape {mask.shape} differs from volume shape {vol.shape}")
    out = np.zeros(vol.shape, dtype=np.uint8)
    box = label_box(mask)  # every step below sees only this box (a view), not the whole grid
    changes: list[str] = []
    cleanup: list[str] = []
    presence: dict[str, Any] = {"cervical_spine": SPINE_PRESENT, "rejected": {}}
    dropped: list[str] = []
    objects = None
    if box is not None:
        out[box] = mask[box]
        origin = tuple(s.start for s in box)
        changes, cleanup, objects = clean_box(out[box], vol.affine, origin, cfg.postprocess)
        if cfg.naming is not None:
            renamed = name_levels(out, vol, cfg.naming, box)
            if renamed:
                changes += renamed
                objects = None  # labels moved: describe finds the boxes again
        if cfg.presence is not None:
            view = out[box]
            sub, presence, dropped = check_presence(view, _box_volume(vol, box), cfg.presence)
            if sub is not view or presence["rejected"]:
                out[box] = sub
                objects = None  # labels were dropped: describe finds the boxes again
    elif cfg.presence is not None:
        _, presence, dropped = check_presence(out, vol, cfg.presence)
    mask = out
    vertebrae, warnings = describe(mask, vol, box, objects)
    for name, why in presence["rejected"].items():
        vertebrae[name]["rejected"] = why
    if presence["cervical_spine"] == SPINE_ABSENT:
        warnings = [w for w in warnings if not w.endswith(" not found")]
    timings = {"postprocess": time.perf_counter() - t}
    return SegResult(mask, vertebrae, dropped + warnings + changes, timings, cleanup, presence["cervical_spine"])


def _box_volume(vol: Volume, box: tuple[slice, ...]) -> Volume:
    """The box of ``vol`` as a Volume (a view; the affine origin moves to the box's first voxel)."""
    affine = vol.affine.copy()
    affine[:3, 3] = vol.index_to_patient(np.array([s.start for s in box]))[0]
    inst = vol.instance_numbers[box[0]] if len(vol.instance_numbers) else vol.instance_numbers
    return Volume(vol.array[box], vol.spacing, affine, inst, vol.meta)


def segment_study(
    study: str | Path,
    model: str | Path | SegModel | None,
    out: str | Path,
    report: str | Path | None = None,
    cfg: InferConfig | None = None,
    engine: str = "cspine",
) -> SegResult:
    """``cspine segment``: read a study (DICOM / NIfTI / prepared folder), write the mask NIfTI and a JSON report.

    ``engine`` "totalsegmentator" takes the vertebrae from TotalSegmentator (no ``model``); its labels go through
    the same clean-up and anatomical checks as the network's.
    """
    from cspine.io import save_nifti
    from cspine.runtime import write_json
    from cspine.seg.data import load_study_volume

    cfg = cfg or InferConfig()
    if engine == "cspine" and model is not None and not isinstance(model, SegModel):
        model = load_model(model, cfg.device, cfg.checkpoint)
    t = time.perf_counter()
    vol = load_study_volume(Path(study))
    read_s = time.perf_counter() - t
    if engine == "totalsegmentator":
        from cspine.seg.totalsegmentator import segment_with_totalsegmentator

        device = "cpu" if cfg.device == "auto" else cfg.device
        res = finish_labels(segment_with_totalsegmentator(vol, device=device), vol, cfg)
    else:
        assert isinstance(model, SegModel), "the cspine engine needs a model"
        res = segment_volume(vol, model, cfg)
    res.timings["read"] = read_s
    save_nifti(res.mask, vol, Path(out))
    if report:
        write_json(
            Path(report),
            {
                "study": str(study),
                "mask": str(out),
                "model": str(model.path) if isinstance(model, SegModel) else engine,
                "shape_zyx": list(vol.shape),
                **res.to_json(),
            },
        )
    return res
