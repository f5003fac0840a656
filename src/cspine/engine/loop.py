"""The training loop both learning stages share (nanoGPT's readable loop, with nnU-Net-style hooks).

:func:`fit` trains one model: per-step learning rate, AMP (bf16) on CUDA only, DDP under torchrun (each rank trains
on its shard and evaluates the whole validation set, so every rank takes the same early-stopping decision; only
rank 0 writes), the best checkpoint by the validation score, early stopping, and a resume state written after
every epoch (a killed run restarts at the last finished epoch, and a finished run is never redone). What is
trained is the caller's: ``step(net, batch) -> StepResult`` and ``validate(net) -> {"score", "val_loss", ...}``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from cspine.engine.step import StepResult
from cspine.runtime import Runtime, load_checkpoint, save_checkpoint, write_json

log = logging.getLogger(__name__)


class LoopSettings(Protocol):
    """The settings :func:`fit` reads (a stage's training config has them as fields)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    optimizer: str
    schedule: str
    patience: int
    seed: int
    workers: int


@dataclass(frozen=True)
class FitRun:
    """One model's training: its name (``fold2`` or ``seed-C5``) and files."""

    name: str
    best_path: Path
    state_path: Path
    history_path: Path


def lr_at(cfg: LoopSettings, epoch: float) -> float:
    """Learning rate at a fractional epoch: constant, or linear warm-up then cosine to 2 % (sequence recipe)."""
    if cfg.schedule == "constant":
        return cfg.lr
    t = epoch / cfg.epochs
    warm = min(0.1, 1.0 / cfg.epochs)
    if t < warm:
        return cfg.lr * (0.1 + 0.9 * t / warm)
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * (t - warm) / (1.0 - warm))))


def read_history(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"done": False, "epochs": []}


def fit(
    model: nn.Module,
    train_ds: Dataset,
    step: Callable[[nn.Module, dict[str, torch.Tensor]], StepResult],
    validate: Callable[[nn.Module], dict[str, float]],
    run: FitRun,
    cfg: LoopSettings,
    rt: Runtime,
    progress: bool = False,
    config: dict[str, Any] | None = None,
    after_epoch: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` with early stopping on ``validate(model)['score']`` (lower is better); resume if possible.

    ``validate`` returns at least score, val_loss and val_acc. The best weights go to ``run.best_path`` (with
    ``config``, the resolved run config), the resume state to ``run.state_path`` after every epoch, the epoch rows to
    ``run.history_path``. ``after_epoch(run.name, epoch)`` is called once each epoch's state is saved (a test
    hook that simulates a kill). Returns the history dict (``done`` True).
    """
    from tqdm import tqdm

    hist = read_history(run.history_path)
    if hist.get("done"):
        return hist
    model.to(rt.device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, best, best_epoch, bad = 0, math.inf, -1, 0
    if run.state_path.exists():
        state = load_checkpoint(run.state_path, map_location=rt.device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, best, best_epoch, bad = state["epoch"], state["best"], state["best_epoch"], state["bad"]
        hist["epochs"] = [r for r in hist["epochs"] if r["epoch"] <= start]
        log.info("%s: resuming after epoch %d (best %.4f at epoch %d)", run.name, start, best, best_epoch)
    net: nn.Module = model
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    sampler = DistributedSampler(train_ds, num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=cfg.seed)
    per_rank = math.ceil(len(train_ds) / rt.world_size)
    loader = DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        drop_last=per_rank > cfg.batch_size,
        pin_memory=rt.device.type == "cuda",
        persistent_workers=cfg.workers > 0,
    )
    steps = max(1, len(loader))
    for epoch in range(start, cfg.epochs):
        sampler.set_epoch(epoch)
        if hasattr(train_ds, "set_epoch"):
            train_ds.set_epoch(epoch)
        net.train()
        t0 = time.perf_counter()
        tot_loss = tot_correct = 0.0
        n_batches = n_images = n_targets = 0
        bar = tqdm(
            loader,
            desc=f"{run.name} epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            disable=not (progress and rt.is_main),
        )
        for it, batch in enumerate(bar):
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, epoch + it / steps)
            batch = {k: v.to(rt.device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device_type=rt.device.type, dtype=torch.bfloat16, enabled=rt.amp):
                res = step(net, batch)
            opt.zero_grad(set_to_none=True)
            res.loss.backward()
            nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            tot_loss += float(res.loss.detach())
            tot_correct += res.correct
            n_batches += 1
            n_images += res.images
            n_targets += res.targets
            bar.set_postfix(loss=f"{tot_loss / n_batches:.4f}")
        bar.close()
        train_s = time.perf_counter() - t0
        if rt.distributed:  # each rank saw its own shard: the logged loss and accuracy are over all of them
            import torch.distributed as dist

            sums = torch.tensor([tot_loss, n_batches, tot_correct, n_targets], dtype=torch.float64, device=rt.device)
            dist.all_reduce(sums)
            tot_loss, n, tot_correct, t = sums.tolist()
            n_batches, n_targets = int(n), int(t)
        t1 = time.perf_counter()
        ev = validate(model)
        row = {
            "run": run.name,
            "epoch": epoch + 1,
            "lr": lr_at(cfg, epoch + 1),
            "train_loss": tot_loss / max(1, n_batches),
            "train_acc": tot_correct / max(1, n_targets),
            **{k: float(v) for k, v in ev.items()},
            "train_images_per_s": n_images * rt.world_size / max(train_s, 1e-9),
            "train_seconds": train_s,
            "val_seconds": time.perf_counter() - t1,
        }
        improved = ev["score"] < best - 1e-6
        if improved:
            best, best_epoch, bad = float(ev["score"]), epoch + 1, 0
        else:
            bad += 1
        row["best"] = best
        hist["epochs"].append(row)
        stop = bad >= cfg.patience or epoch + 1 == cfg.epochs
        if rt.is_main:
            if improved:
                save_checkpoint(
                    {
                        "state_dict": model.state_dict(),
                        "epoch": epoch + 1,
                        "score": best,
                        "run": run.name,
                        "config": config or {},
                    },
                    run.best_path,
                )
            save_checkpoint(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "epoch": epoch + 1,
                    "best": best,
                    "best_epoch": best_epoch,
                    "bad": bad,
                },
                run.state_path,
            )
            hist.update({"best_score": best, "best_epoch": best_epoch})
            write_json(run.history_path, hist)
        log.info(
            "%s epoch %d: train loss %.4f, val loss %.4f, val score %.4f (best %.4f @ %d), %.0f img/s",
            run.name,
            epoch + 1,
            row["train_loss"],
            row["val_loss"],
            row["score"],
            best,
            best_epoch,
            row["train_images_per_s"],
        )
        if after_epoch is not None:
            after_epoch(run.name, epoch + 1)
        if stop:
            break
    hist.update({"done": True, "best_score": best, "best_epoch": best_epoch})
    if rt.is_main:
        write_json(run.history_path, hist)
        run.state_path.unlink(missing_ok=True)
    barrier(rt)
    return hist


def barrier(rt: Runtime) -> None:
    """Wait for every rank (no-op in a single process)."""
    if rt.distributed:
        import torch.distributed as dist

        dist.barrier()


__all__ = ["FitRun", "LoopSettings", "barrier", "fit", "lr_at", "read_history"]
