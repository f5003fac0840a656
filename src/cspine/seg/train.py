"""Training of the vertebra segmenter: Dice + cross-entropy on augmented patches, validated per vertebra.

One function, :func:`train_segmentation`, takes a :class:`TrainSegConfig` (and optionally studies in memory).
It runs alone or under ``torchrun --nproc_per_node N`` (DDP, gloo on CPU, nccl on CUDA; each rank draws its
own patches, gradients are averaged, only rank 0 validates, logs and writes). Mixed precision (bf16) on CUDA.

The loop is the one both stages share (:func:`cspine.engine.loop.fit`); this module gives it the segmenter's
hooks (:func:`fit_hooks`). Resumability: the resume state ``MODEL_DIR/work/model.state.pt`` is rewritten
atomically after every epoch; a rerun with the same ``--out`` continues from there (the config must match except
for :data:`RESUMABLE_FIELDS`, e.g. more epochs). Randomness is re-derived from (seed, rank, epoch) at the start of
every epoch, so a resumed run draws exactly the patches an uninterrupted one would have drawn, whatever the number
of processes that ran the earlier epochs.

MODEL_DIR after training: config.json, labels.json, model.pt, model.history.json/.csv, work/model.state.pt,
curve.png, run.json (cspine.seg.model_dir, cspine.engine.model_dir).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from cspine.engine.config import from_dict, to_dict
from cspine.engine.loop import Hooks, barrier, fit, warmup_cosine_steps
from cspine.engine.model_dir import RunFiles
from cspine.engine.step import StepResult
from cspine.errors import ConfigError
from cspine.io.volume import Volume
from cspine.labels import CERVICAL
from cspine.runtime import Runtime, write_json
from cspine.seg.config import REFINE_DIR, REFINE_RECIPE, RUN_NAME, STAGE_CLASSES, TrainSegConfig
from cspine.seg.data import Case, PatchSampler, describe_cases, discover_studies, fold_of
from cspine.seg.model_dir import (
    TRAINING_FILES,
    check_resumable,
    labels_json,
    model_config_json,
    plot_curve,
    upgrade_legacy_run,
)
from cspine.seg.patches import LUCENT_INSIDE, LUCENT_OUTSIDE, cervical_box

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class StudyLike(Protocol):
    """Anything with a UID, a volume and a mask on its grid (PreparedStudy, SynthStudy ...)."""

    uid: str
    volume: Volume
    mask: np.ndarray | None


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def _collect(cfg: TrainSegConfig, studies: Sequence[StudyLike] | None) -> list[tuple[str, Callable[[], tuple]]]:
    """(uid, loader) of every study with a mask, sorted by UID."""
    items: list[tuple[str, Callable[[], tuple]]] = []
    if studies is not None:
        for s in studies:
            if s.mask is not None:
                items.append((s.uid, lambda s=s: (s.volume, s.mask)))
    else:
        if cfg.data is None:
            raise ValueError("no training data: give --data (prepared cache or RSNA folder)")
        refs = [r for r in discover_studies(Path(cfg.data), cfg.split) if r.has_mask]
        items = [(r.uid, r.load) for r in refs]
        if not items:
            raise ValueError(f"{cfg.data}: no {cfg.split} study has a mask; segmentation training needs masks")
    items.sort(key=lambda it: it[0])
    if len(set(uid for uid, _ in items)) != len(items):
        raise ValueError("duplicate study UIDs in the training data")
    if cfg.max_studies:
        items = items[: cfg.max_studies]
    if not items:
        raise ValueError("no studies with masks to train on")
    return items


def _folds(cfg: TrainSegConfig, uids: list[str]) -> dict[str, int]:
    """Study -> fold: the dataset's split file, shared with the classifier (cspine.data.splits); studies passed in
    memory have no dataset, and get a balanced split of their own."""
    if cfg.data is None:
        return fold_of(uids, cfg.folds, cfg.seed)
    from cspine.data.splits import fold_members

    return fold_members(Path(cfg.data), cfg.split, cfg.folds, cfg.seed, uids)


def _build_cases(items: list[tuple[str, Callable[[], tuple]]], cfg: TrainSegConfig, soft: bool) -> list[Case]:
    cases = []
    for uid, load in items:
        vol, mask = load()
        if mask.shape != vol.shape:
            raise ValueError(f"study {uid}: mask shape {mask.shape} differs from volume shape {vol.shape}")
        if cfg.cervical_box_mm is not None:
            boxed = cervical_box(vol, mask, cfg.cervical_box_mm)
            if boxed is None:
                continue
            vol, mask = boxed
        lucent_hu = cfg.lucent_hu if cfg.lucent_weight or cfg.lucent_fraction else None
        cases.append(Case.build(uid, vol, mask, cfg.preprocess, soft=soft, stage=cfg.stage, lucent_hu=lucent_hu))
    return cases


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def validate(net: Any, cases: Sequence[Case], cfg: TrainSegConfig, device: Any) -> dict[str, Any]:
    """Dice per class on the model grid (prediction as at inference, no post-processing), mean over cases.

    Coarse stage: per vertebra C1..C7, whole volume; refinement stage: the vertebra class (``val_dice``
    {"vertebra": ...}), in windows of the training patch over the whole study (at inference only the neck box).
    """
    from cspine.metrics import dice
    from cspine.seg.infer import SegModel, predict_logits

    names = CERVICAL if cfg.stage == "coarse" else STAGE_CLASSES[cfg.stage][1:]
    window = cfg.patch if cfg.stage == "refine" else None  # as at inference (see SegModel.window)
    model = SegModel(net, cfg.arch, cfg.preprocess, device, classes=STAGE_CLASSES[cfg.stage], window=window)
    per: dict[str, list[float]] = {n: [] for n in names}
    case_means = []
    was_training = net.training
    net.eval()
    for case in cases:
        pred = predict_logits(model, case.image.astype(np.float32)).argmax(0).numpy().astype(np.uint8)
        scores = []
        for k, name in enumerate(names, start=1):
            d = dice(pred, case.labels, k)
            if d is not None and (case.labels == k).any():
                per[name].append(d)
                scores.append(d)
        if scores:
            case_means.append(float(np.mean(scores)))
    net.train(was_training)
    return {
        "val_dice_mean": round(float(np.mean(case_means)), 4) if case_means else None,
        "val_dice": {n: (round(float(np.mean(v)), 4) if v else None) for n, v in per.items()},
    }


def fit_hooks(
    cfg: TrainSegConfig, rt: Runtime, train_cases: Sequence[Case], val_cases: Sequence[Case], after_epoch: Any
) -> Hooks:
    """The segmenter's hooks of the shared loop: ``iters_per_epoch`` batches of random patches per epoch (numpy and
    torch reseeded from (seed, rank, epoch), so a resumed run draws what an uninterrupted one would have), Dice +
    cross-entropy, warm-up + cosine per step, Dice per vertebra on rank 0 every ``val_every`` epochs (the other
    ranks report no score; rank 0's early-stopping decision is theirs)."""
    import torch
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(include_background=False, to_onehot_y=not cfg.soft_labels, softmax=True, batch=True)
    sampler = PatchSampler(
        train_cases, cfg.patch, cfg.augment, cfg.fg_fraction, soft=cfg.soft_labels,
        randomize=cfg.randomization if cfg.randomize else None, preprocess=cfg.preprocess,
        lucent_hu=cfg.lucent_hu if cfg.lucent_weight else None, lucent_fraction=cfg.lucent_fraction,
    )  # fmt: skip

    def batches(epoch: int) -> Iterator[tuple[Any, Any]]:
        rng = np.random.default_rng([cfg.seed, rt.rank, epoch])
        torch.manual_seed(cfg.seed * 100_003 + rt.rank * 1009 + epoch)
        for _ in range(cfg.iters_per_epoch):
            yield sampler.batch(cfg.batch_size, rng)

    def step(net: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> StepResult:
        x, y, *lucent = batch
        logits = net(x)
        with torch.autocast(rt.device.type, enabled=False):  # the loss in float32, as without AMP
            logits = logits.float()
            loss = loss_fn(logits, y)
            if lucent:  # as much weight on the lucent voxels inside the vertebrae as on the dark ones against them
                inside = masked_cross_entropy(logits, y, lucent[0] == LUCENT_INSIDE)
                outside = masked_cross_entropy(logits, y, lucent[0] == LUCENT_OUTSIDE)
                loss = loss + cfg.lucent_weight * (inside + outside)
        return StepResult(loss, int(x.shape[0]), 0.0, 0)

    def lr(epoch: int, i: int) -> float:
        step_no, total = epoch * cfg.iters_per_epoch + i, cfg.epochs * cfg.iters_per_epoch
        return warmup_cosine_steps(cfg.lr, step_no, total, cfg.warmup_iters, cfg.lr_floor)

    def val(net: torch.nn.Module, epoch: int) -> dict[str, Any]:
        if not (rt.is_main and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs)):
            return {"val_dice_mean": None, "val_dice": None}  # not validated: no score
        res = validate(net, val_cases, cfg, rt.device)
        return {"score": res["val_dice_mean"], **res}

    return Hooks(
        batches,
        cfg.iters_per_epoch,
        step,
        lr,
        validate=val,
        maximize=True,
        patience=cfg.patience,
        optimizer="adamw",
        weight_decay=cfg.weight_decay,
        grad_clip=12.0,
        after_epoch=after_epoch,
    )


def masked_cross_entropy(logits: torch.Tensor, y: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the voxels ``where`` (n, 1, *patch) is True (0 when there are none); ``y`` hard
    labels (n, 1, *patch) or class shares (n, classes, *patch)."""
    import torch
    import torch.nn.functional as F

    log_p = F.log_softmax(logits, dim=1)
    ce = -log_p.gather(1, y) if y.dtype == torch.int64 else -(y * log_p).sum(1, keepdim=True)
    w = where.to(ce.dtype)
    return (ce * w).sum() / w.sum().clamp(min=1.0)


def initial_weights(cfg: TrainSegConfig) -> dict[str, Any]:
    """The weights of ``cfg.init`` (its refine/ stage for ``stage="refine"``), checked to be this run's stage and
    network, for fine-tuning."""
    from cspine.seg.infer import load_stage, resolve_model_dir

    src = resolve_model_dir(cfg.init)  # type: ignore[arg-type]
    if cfg.stage == "refine" and (src / REFINE_DIR / "config.json").exists():
        src = src / REFINE_DIR
    init = load_stage(src, "cpu", "")
    if (init.stage, init.arch) != (cfg.stage, cfg.arch):
        raise ConfigError(
            f"--init {src}: a {init.stage} stage of network {init.arch!r}; this run trains a {cfg.stage} stage of "
            f"{cfg.arch!r}"
        )
    return init.net.state_dict()


def train_segmentation(
    cfg: TrainSegConfig,
    studies: Sequence[StudyLike] | None = None,
    *,
    resume: bool = True,
    progress: bool = False,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train (or continue training) a segmentation model into ``cfg.out``.

    Args:
        cfg: the run's config (saved as MODEL_DIR/config.json).
        studies: studies in memory (with masks); default: read ``cfg.data``.
        resume: continue from MODEL_DIR/work/model.state.pt when present (False: start over, deleting old files).
        progress: tqdm bar on rank 0.
        on_epoch_end: called on every rank as ``f(epoch, log_row)`` after each epoch's checkpoint is written.

    Returns:
        A summary: epochs run, best epoch and score, output paths, timings.
    """
    import torch
    import torch.distributed as dist

    from cspine.runtime import init_runtime, run_record, seed_everything, shutdown
    from cspine.seg.models import count_parameters, create_model, get_spec

    created_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    rt: Runtime = init_runtime(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    run = RunFiles.standard(out, RUN_NAME)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    try:
        if resume and (out / "last.pt").exists() and rt.is_main:
            upgrade_legacy_run(out)  # a run an older cspine started (format 1.0/1.1) continues in this format
        barrier(rt)
        if resume and run.state.exists():
            check_resumable(out, cfg)  # on every rank: a refusal stops them all, none is left at the barrier
        if rt.is_main and not resume and out.exists():
            for name in TRAINING_FILES:
                (out / name).unlink(missing_ok=True)
        barrier(rt)
        seed_everything(cfg.seed)

        items = _collect(cfg, studies)
        if cfg.fold >= 0:
            folds = _folds(cfg, [u for u, _ in items])
            train_items = [it for it in items if folds[it[0]] != cfg.fold]
            val_items = [it for it in items if folds[it[0]] == cfg.fold]
        else:
            train_items, val_items = items, []
        if not train_items:
            raise ValueError(f"fold {cfg.fold} leaves no training study ({len(items)} studies, {cfg.folds} folds)")
        t = time.perf_counter()
        train_cases = _build_cases(train_items, cfg, cfg.soft_labels)
        val_cases = _build_cases(val_items, cfg, soft=False) if rt.is_main else []
        timings["preprocess"] = time.perf_counter() - t
        if rt.is_main:
            log.info("train %s; validation %d studies", describe_cases(train_cases), len(val_items))
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / "config.json", model_config_json(cfg))
            write_json(out / "labels.json", labels_json(cfg.stage))

        net = create_model(cfg.arch, 1, len(STAGE_CLASSES[cfg.stage]), get_spec(cfg.arch).arch()).to(rt.device)
        if cfg.init is not None:  # a resume state, when there is one, replaces these weights in fit()
            net.load_state_dict(initial_weights(cfg))
        after = None if on_epoch_end is None else (lambda row: on_epoch_end(row["epoch"], row))
        hooks = fit_hooks(cfg, rt, train_cases, val_cases, after)
        if not val_items:
            hooks.validate = None  # every epoch's weights are the best
        hist = fit(net, hooks, run, cfg.epochs, cfg.lr, rt, progress, to_dict(cfg))
        timings["total"] = time.perf_counter() - t_start
        rows = hist["epochs"]
        summary = {
            "out": str(out),
            "epochs_run": len(rows),
            "last_epoch": rows[-1]["epoch"] if rows else 0,
            "best_epoch": hist.get("best_epoch"),
            "best_val_dice": hist.get("best_score"),
            "stopped_early": bool(hist.get("stopped_early")),
            "is_main": rt.is_main,
            "train_studies": [u for u, _ in train_items],
            "val_studies": [u for u, _ in val_items],
        }
        if rt.is_main:
            if rows:
                plot_curve(rows, out / "curve.png")
            record = run_record(
                rt, to_dict(cfg), timings, parameters=count_parameters(net), torch_threads=torch.get_num_threads()
            )
            write_json(out / "run.json", {**record, **summary})
        return summary
    finally:
        if created_group:
            shutdown(rt)


def train_config(**overrides: Any) -> TrainSegConfig:
    """A :class:`TrainSegConfig` with overrides (type-checked by ``from_dict``), e.g. ``train_config(epochs=3)``.

    ``stage="refine"`` starts from :data:`REFINE_RECIPE` instead of the coarse defaults (overrides still win).
    """
    base = to_dict(TrainSegConfig())
    if overrides.get("stage") == "refine":
        base.update({**REFINE_RECIPE, "preprocess": {**base["preprocess"], **REFINE_RECIPE["preprocess"]}})
    for key, value in overrides.items():
        if key not in base:
            raise ValueError(f"unknown TrainSegConfig field {key!r}; valid: {', '.join(sorted(base))}")
        base[key] = to_dict(value) if hasattr(value, "__dataclass_fields__") else value
    return from_dict(TrainSegConfig, base)


__all__ = ["fit_hooks", "train_config", "train_segmentation", "validate"]
