"""Training of the vertebra segmenter: Dice + cross-entropy on augmented patches, validated per vertebra.

One function, :func:`train_segmentation`, takes a :class:`TrainSegConfig` (and optionally studies in memory).
It runs alone or under ``torchrun --nproc_per_node N`` (DDP, gloo on CPU, nccl on CUDA; each rank draws its
own patches, gradients are averaged, only rank 0 validates, logs and writes). Mixed precision (bf16) on CUDA.

Resumability: ``MODEL_DIR/last.pt`` is rewritten atomically after every epoch with the weights, optimiser state,
epoch, best score, early-stopping counter and log. A rerun with the same ``--out`` continues from there (the
config must match except for :data:`RESUMABLE_FIELDS`, e.g. more epochs). Randomness is re-derived from
(seed, rank, epoch) at the start of every epoch, so a resumed run draws exactly the patches an uninterrupted
one would have drawn, whatever the number of processes that ran the earlier epochs.

MODEL_DIR after training: config.json, labels.json, best.pt, last.pt, log.csv, log.json, curve.png, run.json
(cspine.seg.model_dir).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cspine.engine.config import from_dict, to_dict
from cspine.io.volume import Volume
from cspine.labels import CERVICAL
from cspine.runtime import Runtime, write_json
from cspine.seg.config import (
    REFINE_RECIPE,
    STAGE_CLASSES,
    TrainSegConfig,
)
from cspine.seg.data import Case, PatchSampler, describe_cases, discover_studies, fold_of
from cspine.seg.model_dir import check_resumable, labels_json, model_config_json, plot_curve, write_log
from cspine.seg.patches import cervical_box

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


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
        cases.append(Case.build(uid, vol, mask, cfg.preprocess, soft=soft, stage=cfg.stage))
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


def _lr_at(step: int, total: int, cfg: TrainSegConfig) -> float:
    """Linear warm-up then cosine decay to 1 % of the peak."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    t = (step - cfg.warmup_iters) / max(1, total - cfg.warmup_iters)
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


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
        resume: continue from MODEL_DIR/last.pt when present (False: start over, deleting old checkpoints).
        progress: tqdm bar on rank 0.
        on_epoch_end: called on every rank as ``f(epoch, log_row)`` after each epoch's checkpoint is written.

    Returns:
        A summary: epochs run, best epoch and score, output paths, timings.
    """
    import torch
    import torch.distributed as dist

    from cspine.runtime import init_runtime, load_checkpoint, run_record, save_checkpoint, seed_everything, shutdown
    from cspine.seg.models import count_parameters, create_model, get_spec

    created_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    rt: Runtime = init_runtime(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    try:
        if resume and (out / "last.pt").exists():
            check_resumable(out, cfg)  # on every rank: a refusal stops them all, none is left at the barrier
        if rt.is_main and not resume and out.exists():
            for name in ("last.pt", "best.pt", "log.csv", "log.json", "config.json", "curve.png", "run.json"):
                (out / name).unlink(missing_ok=True)
        if rt.distributed:
            dist.barrier()
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

        net = create_model(cfg.arch, 1, len(STAGE_CLASSES[cfg.stage]), get_spec(cfg.arch).arch()).to(rt.device)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        rows: list[dict[str, Any]] = []
        start_epoch, best_score, best_epoch, bad_epochs = 0, -1.0, 0, 0
        if resume and (out / "last.pt").exists():
            ck = load_checkpoint(out / "last.pt", map_location="cpu")
            if ck.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"{out / 'last.pt'}: unknown checkpoint format {ck.get('format')!r}")
            net.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            start_epoch, best_score = int(ck["epoch"]), float(ck["best_score"])
            best_epoch, bad_epochs, rows = int(ck["best_epoch"]), int(ck["bad_epochs"]), list(ck["log"])
            if "torch_rng" in ck:
                torch.set_rng_state(ck["torch_rng"])
            if rt.is_main:
                log.info("resuming %s after epoch %d (best %.4f at epoch %d)", out, start_epoch, best_score, best_epoch)
        model: torch.nn.Module = net
        if rt.distributed:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(net, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)

        if rt.is_main:
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / "config.json", model_config_json(cfg))
            write_json(out / "labels.json", labels_json(cfg.stage))

        from monai.losses import DiceCELoss

        loss_fn = DiceCELoss(include_background=False, to_onehot_y=not cfg.soft_labels, softmax=True, batch=True)
        sampler = PatchSampler(
            train_cases, cfg.patch, cfg.augment, cfg.fg_fraction, soft=cfg.soft_labels,
            randomize=cfg.randomization if cfg.randomize else None, preprocess=cfg.preprocess,
        )
        total_steps = cfg.epochs * cfg.iters_per_epoch
        bar = None
        if progress and rt.is_main:
            from tqdm import tqdm

            bar = tqdm(total=total_steps, initial=start_epoch * cfg.iters_per_epoch, desc="train-seg", unit="it")
        stopped_early = False
        epoch = start_epoch
        for epoch in range(start_epoch, cfg.epochs):
            t_ep = time.perf_counter()
            rng = np.random.default_rng([cfg.seed, rt.rank, epoch])
            torch.manual_seed(cfg.seed * 100_003 + rt.rank * 1009 + epoch)
            model.train()
            losses = []
            for it in range(cfg.iters_per_epoch):
                step = epoch * cfg.iters_per_epoch + it
                lr = _lr_at(step, total_steps, cfg)
                for g in opt.param_groups:
                    g["lr"] = lr
                x, y = sampler.batch(cfg.batch_size, rng)
                x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
                with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=rt.amp):
                    logits = model(x)
                loss = loss_fn(logits.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
                opt.step()
                losses.append(float(loss.detach()))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}")
            mean_loss = float(np.mean(losses))
            if rt.distributed:
                buf = torch.tensor([mean_loss], dtype=torch.float64)
                dist.all_reduce(buf)
                mean_loss = float(buf.item()) / rt.world_size
            row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": round(mean_loss, 5), "lr": round(lr, 7)}
            row.update({"val_dice_mean": None, "val_dice": None, "best": False})
            stop = False
            if rt.is_main:
                if val_cases and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
                    row.update(validate(net, val_cases, cfg, rt.device))
                    score = row["val_dice_mean"]
                    if score is not None and score > best_score:
                        best_score, best_epoch, bad_epochs = score, epoch + 1, 0
                        row["best"] = True
                        save_checkpoint(
                            {"model": net.state_dict(), "epoch": epoch + 1, "score": score}, out / "best.pt"
                        )
                    else:
                        bad_epochs += 1
                    stop = cfg.patience > 0 and bad_epochs >= cfg.patience
                elif not val_cases:
                    best_epoch = epoch + 1
                    save_checkpoint({"model": net.state_dict(), "epoch": epoch + 1, "score": None}, out / "best.pt")
                row["seconds"] = round(time.perf_counter() - t_ep, 2)
                rows.append(row)
                save_checkpoint(
                    {
                        "format": CHECKPOINT_FORMAT,
                        "model": net.state_dict(),
                        "optimizer": opt.state_dict(),
                        "epoch": epoch + 1,
                        "best_score": best_score,
                        "best_epoch": best_epoch,
                        "bad_epochs": bad_epochs,
                        "log": rows,
                        "torch_rng": torch.get_rng_state(),
                        "rng_scheme": "numpy/torch reseeded from (seed, rank, epoch) at each epoch start",
                    },
                    out / "last.pt",
                )
                write_log(out, rows)
                log.info(
                    "epoch %d/%d loss %.4f val Dice %s (%.1f s)",
                    epoch + 1,
                    cfg.epochs,
                    mean_loss,
                    row.get("val_dice_mean"),
                    row["seconds"],
                )
            if rt.distributed:
                flag = [stop]
                dist.broadcast_object_list(flag, src=0)
                stop = bool(flag[0])
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, row)
            if stop:
                stopped_early = True
                if rt.is_main:
                    log.info("early stop: no better validation Dice for %d epochs", cfg.patience)
                break
        if bar is not None:
            bar.close()
        timings["total"] = time.perf_counter() - t_start
        summary = {
            "out": str(out),
            "epochs_run": len(rows),
            "last_epoch": rows[-1]["epoch"] if rows else start_epoch,
            "best_epoch": best_epoch,
            "best_val_dice": best_score if best_score >= 0 else None,
            "stopped_early": stopped_early,
            "is_main": rt.is_main,
            "train_studies": [u for u, _ in train_items],
            "val_studies": [u for u, _ in val_items],
        }
        if rt.is_main:
            if rows:
                plot_curve(rows, out / "curve.png")
            if not (out / "best.pt").exists() and (out / "last.pt").exists():
                shutil.copyfile(out / "last.pt", out / "best.pt")
            write_json(
                out / "run.json",
                run_record(
                    rt,
                    to_dict(cfg),
                    timings,
                    parameters=count_parameters(net),
                    torch_threads=torch.get_num_threads(),
                    **summary,
                ),
            )
        return summary
    finally:
        model = None  # the DDP wrapper's reducer holds the group: release it before the group is destroyed
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


__all__ = ["train_config", "train_segmentation", "validate"]
