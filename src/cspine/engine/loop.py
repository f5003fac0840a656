"""The training loop both learning stages share (nanoGPT's readable loop, with nnU-Net-style hooks).

:func:`fit` trains one model: per-step learning rate, AMP (bf16) on CUDA only, gradient clipping, DDP under
torchrun (only rank 0 writes; its early-stopping decision is broadcast), the best weights by the validation score,
early stopping, and a resume state written after every epoch (a killed run restarts after its last finished
epoch; a finished run is not redone, one given more epochs continues). Files: :mod:`cspine.engine.model_dir`.

What is trained is the stage's, given as :class:`Hooks`: the epoch's batches (the classifier iterates a
DataLoader, the segmenter draws random patches), the step (forward + loss), the learning rate per step and the
validation. The schedules of both stages are here (:func:`cosine_epochs`, :func:`warmup_cosine_steps`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from cspine.engine.model_dir import RunFiles, load_state, read_history, save_state, save_weights, write_history
from cspine.engine.step import StepResult
from cspine.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class Hooks:
    """What a stage gives :func:`fit`.

    Attributes:
        batches: ``batches(epoch)`` -> that epoch's batches (tensors, or dicts/tuples of tensors, moved to the
            device by the loop), ``steps`` of them.
        steps: batches per epoch (for the learning rate and the progress bar).
        step: ``step(net, batch)`` -> :class:`StepResult` (runs under autocast on CUDA).
        lr: ``lr(epoch, i)`` -> learning rate of the epoch's i-th step.
        validate: ``validate(net, epoch)`` -> {"score", ...} logged in the epoch's row; no "score" key: not
            validated this epoch (e.g. ``val_every``, or a rank that does not validate); score None: validated,
            nothing to score. ``validate=None``: no validation, every epoch's weights are the best.
        maximize: a higher score is better (Dice); else lower (loss).
        patience: stop after this many validated epochs without a better score (0: never).
        optimizer: adam or adamw; lr and weight decay from the settings passed to :func:`fit`.
        weight_decay: the optimiser's weight decay.
        grad_clip: maximal gradient norm.
        after_epoch: called on every rank with the epoch's row once its state is written (tests simulate kills).
    """

    batches: Callable[[int], Iterable[Any]]
    steps: int
    step: Callable[[nn.Module, Any], StepResult]
    lr: Callable[[int, int], float]
    validate: Callable[[nn.Module, int], dict[str, Any]] | None
    maximize: bool
    patience: int
    optimizer: str
    weight_decay: float
    grad_clip: float
    after_epoch: Callable[[dict[str, Any]], None] | None = None


def cosine_epochs(lr: float, epochs: int, t: float, floor: float) -> float:
    """The classifier's schedule at fractional epoch ``t``: linear warm-up from 10 % over min(10 %, one epoch)
    of the run, then cosine to ``floor`` x the peak."""
    frac = t / epochs
    warm = min(0.1, 1.0 / epochs)
    if frac < warm:
        return lr * (0.1 + 0.9 * frac / warm)
    return lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * (frac - warm) / (1.0 - warm))))


def warmup_cosine_steps(lr: float, step: int, total: int, warmup: int, floor: float) -> float:
    """The segmenter's schedule at optimiser step ``step`` of ``total``: linear warm-up over ``warmup`` steps,
    then cosine to ``floor`` x the peak."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * (floor + (1.0 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def finished(hist: dict[str, Any], epochs: int) -> bool:
    """A history that needs no more training: stopped early, or reached ``epochs`` (a finished history from before
    ``stopped_early`` was recorded counts as finished: its resume state is gone)."""
    last = hist["epochs"][-1]["epoch"] if hist.get("epochs") else 0
    return bool(hist.get("done")) and (bool(hist.get("stopped_early", True)) or last >= epochs)


def fit(
    model: nn.Module,
    hooks: Hooks,
    run: RunFiles,
    epochs: int,
    lr: float,
    rt: Runtime,
    progress: bool = False,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``model`` for up to ``epochs`` epochs with ``hooks``, resuming from ``run.state`` when it exists;
    returns the history (``run.history``'s content, ``done`` True). ``config`` is saved with the weights."""
    from tqdm import tqdm

    hist = read_history(run.history)
    if finished(hist, epochs):
        return hist
    model.to(rt.device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt_cls = torch.optim.AdamW if hooks.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(params, lr=lr, weight_decay=hooks.weight_decay)
    start, best, best_epoch, bad = 0, None, 0, 0
    if run.state.exists():
        state = load_state(run.state, map_location=rt.device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, best, best_epoch, bad = state["epoch"], state["best"], state["best_epoch"], state["bad"]
        log.info("%s: resuming after epoch %d (best %s at epoch %d)", run.name, start, best, best_epoch)
    hist.update(done=False, stopped_early=False)
    hist["epochs"] = [r for r in hist["epochs"] if r["epoch"] <= start]
    net: nn.Module = model
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    stop = False
    for epoch in range(start, epochs):
        net.train()
        t0 = time.perf_counter()
        tot_loss = tot_correct = 0.0
        n_batches = n_images = n_targets = 0
        step_lr = lr
        bar = tqdm(
            hooks.batches(epoch),
            total=hooks.steps,
            desc=f"{run.name} epoch {epoch + 1}/{epochs}",
            leave=False,
            disable=not (progress and rt.is_main),
        )
        for it, batch in enumerate(bar):
            step_lr = hooks.lr(epoch, it)
            for g in opt.param_groups:
                g["lr"] = step_lr
            batch = to_device(batch, rt.device)
            with torch.autocast(device_type=rt.device.type, dtype=torch.bfloat16, enabled=rt.amp):
                res = hooks.step(net, batch)
            opt.zero_grad(set_to_none=True)
            res.loss.backward()
            nn.utils.clip_grad_norm_(params, hooks.grad_clip)
            opt.step()
            tot_loss += float(res.loss.detach())
            tot_correct += res.correct
            n_batches += 1
            n_images += res.images
            n_targets += res.targets
            bar.set_postfix(loss=f"{tot_loss / n_batches:.4f}")
        bar.close()
        train_s = time.perf_counter() - t0
        if rt.distributed:  # each rank saw its own batches: the logged loss and accuracy are over all of them
            import torch.distributed as dist

            sums = torch.tensor([tot_loss, n_batches, tot_correct, n_targets], dtype=torch.float64, device=rt.device)
            dist.all_reduce(sums)
            tot_loss, n, tot_correct, t = sums.tolist()
            n_batches, n_targets = int(n), int(t)
        t1 = time.perf_counter()
        ev = hooks.validate(model, epoch) if hooks.validate is not None else {"score": None}
        row: dict[str, Any] = {"run": run.name, "epoch": epoch + 1, "lr": step_lr}
        row["train_loss"] = tot_loss / max(1, n_batches)
        if n_targets:
            row["train_acc"] = tot_correct / n_targets
        row.update(ev)
        improved = False
        if hooks.validate is None:
            improved, best_epoch = True, epoch + 1
        elif "score" in ev:
            s = ev["score"]
            improved = s is not None and (best is None or (s > best + 1e-6 if hooks.maximize else s < best - 1e-6))
            if improved:
                best, best_epoch, bad = float(s), epoch + 1, 0
            else:
                bad += 1
        stop = hooks.patience > 0 and bad >= hooks.patience
        row.update(
            best=best,
            improved=improved,
            train_images_per_s=n_images * rt.world_size / max(train_s, 1e-9),
            train_seconds=train_s,
            val_seconds=time.perf_counter() - t1,
        )
        hist["epochs"].append(row)
        if rt.is_main:
            if improved:
                save_weights(run.weights, model.state_dict(), epoch + 1, best, run.name, config)
            progress_state = {"epoch": epoch + 1, "best": best, "best_epoch": best_epoch, "bad": bad}
            save_state(run.state, model.state_dict(), opt.state_dict(), progress_state)
            hist.update(best_score=best, best_epoch=best_epoch)
            write_history(run.history, hist)
            log.info(
                "%s epoch %d: train loss %.4f, val score %s (best %s @ %d), %.1f s",
                run.name,
                epoch + 1,
                row["train_loss"],
                ev.get("score"),
                best,
                best_epoch,
                train_s,
            )
        stop = broadcast_flag(rt, stop)
        if hooks.after_epoch is not None:
            hooks.after_epoch(row)
        if stop and rt.is_main:
            log.info("%s: early stop, no better validation score for %d epochs", run.name, hooks.patience)
        if stop:
            break
    hist.update(done=True, stopped_early=stop, best_score=best, best_epoch=best_epoch)
    if rt.is_main:
        if not run.weights.exists():  # validated, never scored: the last weights stand in for the best
            save_weights(run.weights, model.state_dict(), len(hist["epochs"]), None, run.name, config)
        write_history(run.history, hist)
    barrier(rt)
    return hist


def dataset_batches(
    ds: Dataset, batch_size: int, workers: int, seed: int, rt: Runtime
) -> tuple[Callable[[int], Iterable[Any]], int]:
    """(``batches(epoch)``, steps per epoch) of a Dataset: shuffled per epoch, each rank its shard (DistributedSampler,
    seeded), the dataset's own ``set_epoch`` called when it has one (seeded augmentation).

    Workers are started anew each epoch so that they see the epoch given to the dataset here, in the main process
    (a persistent worker keeps the copy of the dataset it started with: every epoch would repeat the first one's
    augmentation)."""
    sampler = DistributedSampler(ds, num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=seed)
    per_rank = math.ceil(len(ds) / rt.world_size)  # type: ignore[arg-type]
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=per_rank > batch_size,
        pin_memory=rt.device.type == "cuda",
        persistent_workers=False,
    )

    def batches(epoch: int) -> Iterable[Any]:
        sampler.set_epoch(epoch)
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(epoch)
        return loader

    return batches, max(1, len(loader))


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch's tensors on ``device`` (dicts, tuples and lists of tensors)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def broadcast_flag(rt: Runtime, flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (itself in a single process)."""
    if not rt.distributed:
        return flag
    import torch.distributed as dist

    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def barrier(rt: Runtime) -> None:
    """Wait for every rank (no-op in a single process)."""
    if rt.distributed:
        import torch.distributed as dist

        dist.barrier()


__all__ = [
    "Hooks",
    "barrier",
    "broadcast_flag",
    "cosine_epochs",
    "dataset_batches",
    "finished",
    "fit",
    "to_device",
    "warmup_cosine_steps",
]
