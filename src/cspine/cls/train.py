"""``cspine train-cls``: crops -> study-grouped folds -> training with resume -> OOF -> calibration -> evaluation.

One loop (:func:`fit`) serves both recipes: per-step learning rate, AMP on CUDA, DDP under torchrun (each rank
trains on its shard and evaluates the whole validation set, so every rank takes the same early-stopping decision;
only rank 0 writes), the best checkpoint by the recipe's validation score, early stopping, and a resume state
written after every epoch (a killed run restarts at the last finished epoch, and a finished fold is never redone).

Model directory layout (self-sufficient for :mod:`cspine.cls.infer`)::

    MODEL_DIR/config.json          resolved TrainConfig (crop, model, training), format version
    MODEL_DIR/fold{k}.pt           best weights of fold k (seed-baseline: fold0.pt holds all seven nets)
    MODEL_DIR/fold{k}.history.json per-epoch losses, accuracies, images/s; ``done`` when the fold is finished
    MODEL_DIR/folds.json           study -> fold (or train/val/test for the hold-out splits)
    MODEL_DIR/labels.csv           the training labels (train.csv rows of the studies used)
    MODEL_DIR/oof.csv              out-of-fold (or held-out) probabilities, uncalibrated, wide format
    MODEL_DIR/oof_calibrated.csv   the same after temperature scaling
    MODEL_DIR/calibration.json     temperatures, log loss before/after
    MODEL_DIR/history.json         all folds' epoch rows (curves)
    MODEL_DIR/metrics.json         summary: OOF metrics, per fold, speed, timings
    MODEL_DIR/eval/                cspine evaluate output on the OOF predictions (report.md, PNGs)
    MODEL_DIR/run.json             run record: versions, config, device, timings
    MODEL_DIR/work/                resume states while training (removed when all folds are done)
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from cspine.cls.calibrate import Calibration, fit_temperature, sigmoid
from cspine.cls.config import ModelConfig, TrainConfig, config_from_dict, config_to_dict
from cspine.cls.crops import CropsConfig, build_crops
from cspine.cls.dataset import ImageDataset, ImageIndex, StudyDataset, StudyStore, image_index
from cspine.cls.evaluate import EvaluateConfig, evaluate, write_wide
from cspine.cls.folds import holdout_split, leaky_image_split, make_folds
from cspine.cls.models import SeedBaseline, SeedNet, SequenceNet, create_model
from cspine.labels import CERVICAL, METRIC_WEIGHTS, PREDICTION_TYPES, PREVALENCE
from cspine.metrics import competition_loss
from cspine.runtime import Runtime, load_checkpoint, save_checkpoint, timed, write_json

log = logging.getLogger(__name__)

#: Test hook, called as ``_after_epoch(run_name, epoch)`` after each epoch's state is saved (simulates a kill).
_after_epoch: Callable[[str, int], None] | None = None

#: Settings that may change between a run and its resumption (they do not change what is learned).
RESUMABLE_CHANGES = ("fold", "device", "workers", "threads", "data", "out", "crops_dir", "progress")

POS_W = torch.tensor([METRIC_WEIGHTS[t][1] for t in PREDICTION_TYPES])
NEG_W = torch.tensor([METRIC_WEIGHTS[t][0] for t in PREDICTION_TYPES])


# ----------------------------------------------------------------------------------------------------------------------
# The shared training loop
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    """What one training batch reports: the loss to backpropagate and counts for the epoch's averages."""

    loss: torch.Tensor
    images: int
    correct: float
    targets: int


@dataclass(frozen=True)
class FitRun:
    """One model's training: its name (``fold2`` or ``seed-C5``) and files."""

    name: str
    best_path: Path
    state_path: Path
    history_path: Path


def lr_at(cfg: TrainConfig, epoch: float) -> float:
    """Learning rate at a fractional epoch: constant, or linear warm-up then cosine to 2 % (sequence recipe)."""
    if cfg.schedule == "constant":
        return cfg.lr
    t = epoch / cfg.epochs
    warm = min(0.1, 1.0 / cfg.epochs)
    if t < warm:
        return cfg.lr * (0.1 + 0.9 * t / warm)
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * (t - warm) / (1.0 - warm))))


def _read_history(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"done": False, "epochs": []}


def fit(
    model: nn.Module,
    train_ds: Dataset,
    step: Callable[[nn.Module, dict[str, torch.Tensor]], StepResult],
    validate: Callable[[nn.Module], dict[str, float]],
    run: FitRun,
    cfg: TrainConfig,
    rt: Runtime,
    progress: bool = False,
) -> dict[str, Any]:
    """Train ``model`` with early stopping on ``validate(model)['score']`` (lower is better); resume if possible.

    ``validate`` returns at least score, val_loss and val_acc. The best weights go to ``run.best_path`` (with the
    resolved config), the resume state to ``run.state_path`` after every epoch, the epoch rows to
    ``run.history_path``. Returns the history dict (``done`` True).
    """
    from tqdm import tqdm

    hist = _read_history(run.history_path)
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
                        "config": config_to_dict(cfg),
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
        if _after_epoch is not None:
            _after_epoch(run.name, epoch + 1)
        if stop:
            break
    hist.update({"done": True, "best_score": best, "best_epoch": best_epoch})
    if rt.is_main:
        write_json(run.history_path, hist)
        run.state_path.unlink(missing_ok=True)
    _barrier(rt)
    return hist


def _barrier(rt: Runtime) -> None:
    if rt.distributed:
        import torch.distributed as dist

        dist.barrier()


# ----------------------------------------------------------------------------------------------------------------------
# The sequence recipe
# ----------------------------------------------------------------------------------------------------------------------


def sequence_loss(
    out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], aux_weight: float, feature_weight: float = 0.0
) -> torch.Tensor:
    """The competition metric as a loss (per-study weighted BCE, normalised per study) + the per-slice box loss
    + the feature path's own vertebra loss (deep supervision, ``feature_weight``).

    Vertebrae the mask lacks drop out of both the numerator and the study's weight sum.
    """
    logits = torch.cat([out["patient"][:, None], out["vertebra"]], dim=1).float()
    y = batch["labels"].float()
    present = batch["present"].float()
    w = torch.where(y > 0.5, POS_W.to(y.device), NEG_W.to(y.device))
    w = torch.cat([w[:, :1], w[:, 1:] * present], dim=1)
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    main = ((w * bce).sum(dim=1) / w.sum(dim=1)).mean()
    if feature_weight > 0 and "features" in out:
        wv = w[:, 1:]
        fb = F.binary_cross_entropy_with_logits(out["features"].float(), y[:, 1:], reduction="none")
        main = main + feature_weight * ((wv * fb).sum(dim=1) / wv.sum(dim=1).clamp(min=1e-6)).mean()
    valid = batch["slice_valid"] & batch["present"][..., None].bool()
    if aux_weight > 0 and bool(valid.any()):
        target = batch["slice_labels"].float()[valid]
        # fracture slices are ~1 % of known slices: weight them up to balance the classes (capped), or the
        # box head learns "never" and its gradient stops teaching the encoder what a fracture looks like
        n_pos = target.sum()
        pos_weight = ((target.numel() - n_pos) / n_pos.clamp(min=1.0)).clamp(1.0, 50.0)
        aux = F.binary_cross_entropy_with_logits(out["slices"].float()[valid], target, pos_weight=pos_weight)
        return main + aux_weight * aux
    return main


def sequence_probs(patient: np.ndarray, vertebra: np.ndarray, present: np.ndarray, patient_from: str) -> np.ndarray:
    """(n, 8) probabilities in PREDICTION_TYPES order from logits: vertebrae by sigmoid (the RSNA prevalence for
    vertebrae the mask lacks), patient from the head or as 1 - prod(1 - p_Ci)."""
    pv = np.where(present, sigmoid(vertebra), np.array([PREVALENCE[v] for v in CERVICAL])[None, :])
    pp = sigmoid(patient) if patient_from == "head" else noisy_or(pv)
    return np.concatenate([pp[:, None], pv], axis=1)


def noisy_or(pv: np.ndarray) -> np.ndarray:
    """P(any vertebra fractured) if vertebrae were independent: 1 - prod(1 - p_Ci)."""
    return 1.0 - np.prod(1.0 - np.clip(pv, 0.0, 1.0), axis=1)


@torch.no_grad()
def predict_sequence(models: Iterable[nn.Module], ds: Dataset, rt: Runtime, batch_size: int) -> dict[str, np.ndarray]:
    """Logits of each study of ``ds`` averaged over ``models`` (fold ensemble): patient (n,), vertebra (n, 7),
    slices (n, 7, K), present (n, 7), rows (n,)."""
    models = list(models)
    for m in models:
        m.eval()
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False)
    acc: dict[str, list[np.ndarray]] = {"patient": [], "vertebra": [], "slices": [], "present": [], "rows": []}
    for batch in loader:
        images = batch["images"].to(rt.device)
        present = batch["present"].to(rt.device)
        stats = batch["stats"].to(rt.device)
        outs = []
        for m in models:
            with torch.autocast(device_type=rt.device.type, dtype=torch.bfloat16, enabled=rt.amp):
                outs.append({k: v.float() for k, v in m(images, present, stats).items()})
        for k in ("patient", "vertebra", "slices"):
            acc[k].append(torch.stack([o[k] for o in outs]).mean(0).cpu().numpy())
        acc["present"].append(batch["present"].numpy())
        acc["rows"].append(batch["row"].numpy())
    return {k: np.concatenate(v) for k, v in acc.items()}


def _sequence_step(model: ModelConfig) -> Callable[[nn.Module, dict[str, torch.Tensor]], StepResult]:
    def step(net: nn.Module, batch: dict[str, torch.Tensor]) -> StepResult:
        out = net(batch["images"], batch["present"], batch["stats"])
        core = getattr(net, "module", net)
        joint = not core.fitted  # a fitted path is frozen: nothing to supervise or penalise
        loss = sequence_loss(out, batch, model.aux_weight, model.feature_weight if joint else 0.0)
        head = core.feature_head if joint and model.feature_l2 > 0 else None
        if head is not None:
            loss = loss + model.feature_l2 * head.weight.pow(2).sum()
        with torch.no_grad():
            logits = torch.cat([out["patient"][:, None], out["vertebra"]], dim=1)
            correct = float(((logits > 0) == (batch["labels"] > 0.5)).float().sum())
        k = batch["images"].shape[2]
        return StepResult(loss, int(batch["present"].sum()) * k, correct, int(batch["labels"].numel()))

    return step


def _train_sequence(
    cfg: TrainConfig, rt: Runtime, store: StudyStore, progress: bool, timings: dict[str, float]
) -> dict[str, Any]:
    out = cfg.out
    y = store.labels()
    folds = make_folds(y, cfg.folds, cfg.seed)
    if rt.is_main:
        write_json(out / "folds.json", {u: int(f) for u, f in zip(store.uids, folds, strict=True)})
    todo = [cfg.fold] if cfg.fold is not None else list(range(cfg.folds))
    for k in todo:
        run = FitRun(f"fold{k}", out / f"fold{k}.pt", out / "work" / f"fold{k}.state.pt", out / f"fold{k}.history.json")
        oof_path = out / f"oof_fold{k}.csv"
        if _read_history(run.history_path).get("done") and oof_path.exists():
            log.info("fold %d already trained", k)
            continue
        torch.manual_seed(cfg.seed * 100 + k)
        model = create_model(cfg.recipe, cfg.model, cfg.crop)
        tr_rows = np.flatnonzero(folds != k)
        va_rows = np.flatnonzero(folds == k)
        if isinstance(model, SequenceNet) and model.n_stats:
            stats, present = store.study_stats(tr_rows)
            if model.fitted:
                model.fit_linear_path(stats, present, y[tr_rows, 1:], cfg.model.feature_c)
            else:
                model.set_stats_norm(stats[present])
        train_ds = StudyDataset(store, tr_rows, augment=cfg.augment, seed=cfg.seed * 100 + k)
        val_ds = StudyDataset(store, va_rows)

        def validate(m: nn.Module, val_ds: StudyDataset = val_ds, va_rows: np.ndarray = va_rows) -> dict[str, float]:
            pred = predict_sequence([m], val_ds, rt, cfg.batch_size * 2)
            p = sequence_probs(pred["patient"], pred["vertebra"], pred["present"], cfg.model.patient_from)
            yt = y[va_rows]
            score = competition_loss(yt, p)
            return {"score": score, "val_loss": score, "val_acc": float(((p >= 0.5) == (yt > 0.5)).mean())}

        with timed(timings, f"train_fold{k}"):
            fit(model, train_ds, _sequence_step(cfg.model), validate, run, cfg, rt, progress)
        if rt.is_main:
            best = load_checkpoint(run.best_path)
            model.load_state_dict(best["state_dict"])
            model.to(rt.device)
            t0 = time.perf_counter()
            pred = predict_sequence([model], val_ds, rt, cfg.batch_size * 2)
            timings["infer_images"] = timings.get("infer_images", 0.0) + float(pred["present"].sum()) * cfg.crop.slices
            timings["infer_seconds"] = timings.get("infer_seconds", 0.0) + time.perf_counter() - t0
            _write_oof(oof_path, [store.uids[r] for r in va_rows], pred, k, cfg.model.patient_from)
        _barrier(rt)
    done = all((out / f"oof_fold{k}.csv").exists() for k in range(cfg.folds))
    if not done:
        return {"status": "partial", "folds_done": [k for k in range(cfg.folds) if (out / f"oof_fold{k}.csv").exists()]}
    return _finish(cfg, store, [out / f"oof_fold{k}.csv" for k in range(cfg.folds)], timings) if rt.is_main else {}


def _write_oof(path: Path, uids: list[str], pred: dict[str, np.ndarray], fold: int, patient_from: str) -> None:
    p = sequence_probs(pred["patient"], pred["vertebra"], pred["present"], patient_from)
    head = sigmoid(pred["patient"])
    nor = noisy_or(p[:, 1:])
    write_wide(
        path,
        uids,
        p,
        {
            "fold": [str(fold)] * len(uids),
            "patient_head": [f"{v:.9g}" for v in head],
            "patient_noisy_or": [f"{v:.9g}" for v in nor],
        },
    )


# ----------------------------------------------------------------------------------------------------------------------
# The seed baseline
# ----------------------------------------------------------------------------------------------------------------------


def _seed_step(net: nn.Module, batch: dict[str, torch.Tensor]) -> StepResult:
    logits = net(batch["image"]).float()
    loss = F.binary_cross_entropy_with_logits(logits, batch["label"].float())
    correct = float(((logits.detach() > 0) == (batch["label"] > 0.5)).float().sum())
    return StepResult(loss, int(batch["image"].shape[0]), correct, int(batch["image"].shape[0]))


@torch.no_grad()
def predict_images(net: nn.Module, ds: ImageDataset, rt: Runtime, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid probabilities of every image of ``ds`` and the image rows they belong to."""
    net.eval()
    probs, rows = [], []
    for batch in DataLoader(ds, batch_size=batch_size, shuffle=False):
        with torch.autocast(device_type=rt.device.type, dtype=torch.bfloat16, enabled=rt.amp):
            logits = net(batch["image"].to(rt.device)).float()
        probs.append(torch.sigmoid(logits).cpu().numpy())
        rows.append(batch["row"].numpy())
    if not probs:
        return np.zeros(0), np.zeros(0, np.int64)
    return np.concatenate(probs), np.concatenate(rows)


def _image_labels(store: StudyStore, index: ImageIndex, rows: np.ndarray) -> np.ndarray:
    """The vertebra label of each image row (read from the study metadata, no image is loaded)."""
    return np.array([float(store.studies[int(index.study[r])].labels[CERVICAL[int(index.vertebra[r])]]) for r in rows])


def seed_split(cfg: TrainConfig, store: StudyStore, index: ImageIndex) -> np.ndarray:
    """Per image: 0 train, 1 validation (early stopping), 2 test (33 % held out), by study or the seed's leaky way."""
    part = np.zeros(len(index), np.int64)
    if cfg.split == "image":
        test = leaky_image_split(len(index), cfg.holdout, cfg.seed)
        rest = np.flatnonzero(~test)
        val = rest[leaky_image_split(len(rest), cfg.val_fraction, cfg.seed + 1)]
        part[test] = 2
        part[val] = 1
        return part
    y = store.labels()
    test_st = holdout_split(y, cfg.holdout, cfg.seed)
    rest = np.flatnonzero(~test_st)
    val_st = rest[holdout_split(y[rest], cfg.val_fraction, cfg.seed + 1)]
    study_part = np.zeros(len(y), np.int64)
    study_part[test_st] = 2
    study_part[val_st] = 1
    return study_part[index.study]


def _train_seed(
    cfg: TrainConfig, rt: Runtime, store: StudyStore, progress: bool, timings: dict[str, float]
) -> dict[str, Any]:
    from sklearn.metrics import classification_report, confusion_matrix

    out = cfg.out
    index = image_index(store)
    part = seed_split(cfg, store, index)
    if rt.is_main:
        names = {0: "train", 1: "val", 2: "test"}
        if cfg.split == "image":
            write_json(
                out / "folds.json",
                {
                    "split": "image",
                    "images": {
                        f"{store.uids[s]}:{CERVICAL[v]}:{k}": names[int(p)]
                        for s, v, k, p in zip(index.study, index.vertebra, index.slice, part, strict=True)
                    },
                },
            )
        else:
            st = {store.uids[s]: names[int(p)] for s, p in zip(index.study, part, strict=True)}
            write_json(out / "folds.json", {"split": "study", "studies": st})
    full = SeedBaseline(cfg.model, cfg.crop)
    test_probs = np.full(len(index), np.nan)
    for vi, v in enumerate(CERVICAL):
        rows_v = index.vertebra == vi
        tr, va, te = (np.flatnonzero(rows_v & (part == p)) for p in (0, 1, 2))
        run = FitRun(
            f"seed-{v}",
            out / "work" / f"seed-{v}.pt",
            out / "work" / f"seed-{v}.state.pt",
            out / f"seed-{v}.history.json",
        )
        torch.manual_seed(cfg.seed * 100 + vi)
        net = SeedNet(cfg.model, cfg.crop)
        val_ds = ImageDataset(store, index, va)

        def validate(m: nn.Module, val_ds: ImageDataset = val_ds) -> dict[str, float]:
            p, rows = predict_images(m, val_ds, rt, cfg.batch_size * 2)
            yv = _image_labels(store, index, rows)
            q = np.clip(p, 1e-7, 1 - 1e-7)
            bce = float(-(yv * np.log(q) + (1 - yv) * np.log(1 - q)).mean()) if len(p) else 0.0
            return {"score": bce, "val_loss": bce, "val_acc": float(((p >= 0.5) == (yv > 0.5)).mean()) if len(p) else 0}

        hist = _read_history(run.history_path)
        if not (hist.get("done") and run.best_path.exists()):
            with timed(timings, f"train_seed_{v}"):
                fit(
                    net,
                    ImageDataset(store, index, tr, augment=cfg.augment, seed=cfg.seed + vi),
                    _seed_step,
                    validate,
                    run,
                    cfg,
                    rt,
                    progress,
                )
        net.load_state_dict(load_checkpoint(run.best_path)["state_dict"])
        full.nets[v].load_state_dict(net.state_dict())
        net.to(rt.device)
        t0 = time.perf_counter()
        p, rows = predict_images(net, ImageDataset(store, index, te), rt, cfg.batch_size * 2)
        timings["infer_images"] = timings.get("infer_images", 0.0) + len(rows)
        timings["infer_seconds"] = timings.get("infer_seconds", 0.0) + time.perf_counter() - t0
        test_probs[rows] = p
    if not rt.is_main:
        return {}
    save_checkpoint(
        {"state_dict": full.state_dict(), "run": "seed-baseline", "config": config_to_dict(cfg)}, out / "fold0.pt"
    )
    # image-level numbers, as the seed reported them (accuracy, classification report, confusion matrix)
    te = np.flatnonzero(part == 2)
    y_img = _image_labels(store, index, te)
    p_img = test_probs[te]
    image_level: dict[str, Any] = {}
    for vi, v in enumerate(CERVICAL):
        sel = index.vertebra[te] == vi
        yt, pt = y_img[sel] > 0.5, p_img[sel] >= 0.5
        image_level[v] = {
            "images": int(sel.sum()),
            "accuracy": float((yt == pt).mean()) if sel.any() else None,
            "confusion": confusion_matrix(yt, pt, labels=[False, True]).tolist(),
            "classification_report": classification_report(
                yt,
                pt,
                labels=[False, True],
                target_names=["not fractured", "fractured"],
                output_dict=True,
                zero_division=0,
            ),
        }
    image_level["all"] = {"images": len(te), "accuracy": float(((y_img > 0.5) == (p_img >= 0.5)).mean())}
    # study level: a vertebra's probability = mean over its held-out images; patient = 1 - prod(1 - p)
    test_studies = sorted(set(index.study[te].tolist()))
    pv = np.tile([PREVALENCE[v] for v in CERVICAL], (len(test_studies), 1))
    for i, s in enumerate(test_studies):
        for vi in range(len(CERVICAL)):
            sel = te[(index.study[te] == s) & (index.vertebra[te] == vi)]
            if len(sel):
                pv[i, vi] = float(test_probs[sel].mean())
    probs = np.concatenate([noisy_or(pv)[:, None], pv], axis=1)
    oof = out / "oof.csv"
    write_wide(oof, [store.uids[s] for s in test_studies], probs, {"fold": ["test"] * len(test_studies)})
    return _finish(cfg, store, [oof], timings, extra={"image_level": image_level}, calibrate=False)


# ----------------------------------------------------------------------------------------------------------------------
# OOF -> calibration -> evaluation -> metrics.json
# ----------------------------------------------------------------------------------------------------------------------


def _read_wide(paths: list[Path]) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    import csv

    uids: list[str] = []
    probs: list[list[float]] = []
    extra: dict[str, list[float]] = {}
    for p in paths:
        with open(p, newline="") as f:
            for r in csv.DictReader(f):
                uids.append(r["StudyInstanceUID"])
                probs.append([float(r[t]) for t in PREDICTION_TYPES])
                for k in ("patient_head", "patient_noisy_or"):
                    if k in r:
                        extra.setdefault(k, []).append(float(r[k]))
    return uids, np.array(probs), {k: np.array(v) for k, v in extra.items()}


def _finish(
    cfg: TrainConfig,
    store: StudyStore,
    oof_parts: list[Path],
    timings: dict[str, float],
    extra: dict[str, Any] | None = None,
    calibrate: bool = True,
) -> dict[str, Any]:
    """Assemble OOF predictions, fit calibration, evaluate, write metrics.json; returns the summary."""
    from cspine.data.rsna import write_csv_atomic

    out = cfg.out
    uids, p, alt = _read_wide(oof_parts)
    order = np.argsort(uids)
    uids = [uids[i] for i in order]
    p = p[order]
    alt = {k: v[order] for k, v in alt.items()}
    row_of = {u: i for i, u in enumerate(store.uids)}
    y = store.labels()[[row_of[u] for u in uids]]
    folds = json.loads((out / "folds.json").read_text())
    fold_col = [str(folds.get(u, "test")) for u in uids]
    if len(oof_parts) > 1 or oof_parts[0].name != "oof.csv":
        write_wide(out / "oof.csv", uids, p, {"fold": fold_col, **{k: [f"{x:.9g}" for x in v] for k, v in alt.items()}})
    write_csv_atomic(
        out / "labels.csv",
        ["StudyInstanceUID", *PREDICTION_TYPES],
        [[u, *(int(store.studies[row_of[u]].labels[t]) for t in PREDICTION_TYPES)] for u in uids],
    )
    cal = fit_temperature(y, p) if calibrate else Calibration()
    cal.save(out)
    pc = cal.apply(p)
    write_wide(out / "oof_calibrated.csv", uids, pc, {"fold": fold_col})
    history = []
    for hp in sorted(out.glob("*.history.json")):
        history += _read_history(hp)["epochs"]
    write_json(out / "history.json", history)
    ev = evaluate(
        EvaluateConfig(
            pred=out / "oof_calibrated.csv",
            labels=out / "labels.csv",
            out=out / "eval",
            history=out / "history.json",
            sensitivity=cfg.operating_sensitivity,
        )
    )
    train_imgs = sum(r["train_images_per_s"] * r["train_seconds"] for r in history)
    train_secs = sum(r["train_seconds"] for r in history)
    summary = {
        "recipe": cfg.recipe,
        "split": cfg.split,
        "studies": len(uids),
        "competition_loss": ev["competition_loss"],
        "competition_loss_uncalibrated": competition_loss(y, p),
        "mean_vertebra_auc": ev["mean_vertebra_auc"],
        "patient_auc": ev["patient_auc"],
        "auc": {t: ev["targets"][t]["auc"] for t in PREDICTION_TYPES},
        "calibration": {"temperatures": cal.temperatures, "before": cal.before, "after": cal.after},
        "speed": {
            "train_images_per_s": train_imgs / train_secs if train_secs else None,
            "infer_images_per_s": timings["infer_images"] / timings["infer_seconds"]
            if timings.get("infer_seconds")
            else None,
        },
        "runs": {
            hp.name.split(".")[0]: {k: v for k, v in _read_history(hp).items() if k != "epochs"}
            for hp in sorted(out.glob("*.history.json"))
        },
    }
    for k, v in alt.items():  # the two patient_overall variants, side by side
        q = p.copy()
        q[:, 0] = v
        summary[f"competition_loss_{k}"] = competition_loss(y, q)
    summary.update(extra or {})
    write_json(out / "metrics.json", summary)
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------------


def _check_resume(cfg: TrainConfig) -> None:
    """A model directory holds one configuration: resuming with other settings is an error that says which."""
    path = cfg.out / "config.json"
    if not path.exists():
        return
    old = config_to_dict(config_from_dict(json.loads(path.read_text())))
    new = config_to_dict(cfg)
    diff = sorted(k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))
    if diff:
        raise ValueError(
            f"{cfg.out} was trained with other settings ({', '.join(diff)} differ); "
            "use a new --out folder, or the same settings to resume"
        )


def train_cls(cfg: TrainConfig, progress: bool = False) -> dict[str, Any]:
    """Train a recipe into ``cfg.out`` (see the module docstring for the layout); returns the summary dict.

    Reruns resume: finished folds are skipped, an interrupted one restarts after its last finished epoch, and
    the OOF/calibration/evaluation steps run once all folds are done (``--fold k`` runs one fold).
    """
    from cspine.runtime import init_runtime, run_record, seed_everything, shutdown

    rt = init_runtime(cfg.device)
    timings: dict[str, float] = {}
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        if rt.is_main:
            _check_resume(cfg)
            cfg.out.mkdir(parents=True, exist_ok=True)
            write_json(cfg.out / "config.json", config_to_dict(cfg))
        with timed(timings, "crops"):
            ccfg = CropsConfig(
                data=cfg.data,
                out=cfg.crops_dir,
                crop=cfg.crop,
                masks=cfg.masks,
                masks_first=cfg.masks_first,
                split="train",
                limit=cfg.limit,
                workers=max(1, cfg.workers),
            )
            if rt.is_main:
                studies = build_crops(ccfg, progress=progress)
            _barrier(rt)
            if not rt.is_main:
                studies = build_crops(ccfg)
            studies = [s for s in studies if s.labels]
            if len(studies) < 4:
                raise ValueError(f"{cfg.data}: only {len(studies)} labelled studies with masks; need at least 4")
            store = StudyStore(studies, cfg.crop)
        log.info("%d studies with crops (%s)", len(store), ccfg.folder)
        train = _train_sequence if cfg.recipe == "sequence" else _train_seed
        summary = train(cfg, rt, store, progress, timings)
        if rt.is_main:
            summary["timings_s"] = {k: round(v, 2) for k, v in timings.items() if k != "infer_images"}  # a count
            write_json(cfg.out / "run.json", run_record(rt, config_to_dict(cfg), timings, summary=summary))
            if summary.get("status") != "partial":
                import shutil

                shutil.rmtree(cfg.out / "work", ignore_errors=True)
        return summary
    finally:
        shutdown(rt)


def load_config(model_dir: Path) -> TrainConfig:
    """The resolved TrainConfig of a model directory."""
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{model_dir}: not a cspine classifier directory (no config.json)")
    return config_from_dict(json.loads(path.read_text()))


def fold_checkpoints(model_dir: Path) -> list[Path]:
    """fold{k}.pt files of a model directory, by k."""
    found = []
    for p in Path(model_dir).glob("fold*.pt"):
        m = re.fullmatch(r"fold(\d+)\.pt", p.name)
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


__all__ = ["fit", "fold_checkpoints", "load_config", "noisy_or", "sequence_loss", "sequence_probs", "train_cls"]
