"""``cspine train-cls``: crops -> the recipe's training (folds or hold-out) -> OOF -> calibration -> evaluation.

:func:`train_cls` builds (or reuses) the crop cache, then hands the studies to the chosen recipe's training
procedure (:meth:`cspine.cls.recipes.Recipe.train`: :mod:`cspine.cls.train_folds` for ``sequence``,
:mod:`cspine.cls.train_seed` for ``seed-baseline``), which trains through the shared loop
(:func:`cspine.engine.loop.fit`: AMP on CUDA, DDP under torchrun, resume, early stopping). Reruns resume:
finished folds are skipped, an interrupted one restarts after its last finished epoch. The model directory's
layout is described in :mod:`cspine.cls.model_dir`.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from cspine.cls.config import TrainConfig, config_to_dict
from cspine.cls.crop_cache import CropsConfig, build_crops
from cspine.cls.dataset import StudyStore
from cspine.cls.model_dir import check_resume
from cspine.cls.recipes import get_recipe
from cspine.engine.loop import Hooks, barrier, cosine_epochs, dataset_batches
from cspine.engine.step import StepResult
from cspine.errors import CspineInputError
from cspine.runtime import Runtime, timed, write_json

log = logging.getLogger(__name__)

#: Test hook, called as ``_after_epoch(run_name, epoch)`` after each epoch's state is saved (simulates a kill).
_after_epoch: Callable[[str, int], None] | None = None


def after_epoch(row: dict[str, Any]) -> None:
    """Called by the loop after every epoch; forwards to the test hook when one is set."""
    if _after_epoch is not None:
        _after_epoch(row["run"], row["epoch"])


def fit_hooks(
    cfg: TrainConfig,
    rt: Runtime,
    train_ds: Dataset,
    step: Callable[[nn.Module, Any], StepResult],
    validate: Callable[[nn.Module], dict[str, float]],
) -> Hooks:
    """The classifier's hooks of the shared loop: the Dataset's shuffled batches, the recipe's step, its
    schedule (constant, or warm-up + cosine to ``lr_floor``), early stopping on a validation loss."""
    batches, steps = dataset_batches(train_ds, cfg.batch_size, cfg.workers, cfg.seed, rt)

    def lr(epoch: int, i: int) -> float:
        if cfg.schedule == "constant":
            return cfg.lr
        return cosine_epochs(cfg.lr, cfg.epochs, epoch + i / steps, cfg.lr_floor)

    return Hooks(
        batches,
        steps,
        step,
        lr,
        validate=lambda net, epoch: validate(net),
        maximize=False,
        patience=cfg.patience,
        optimizer=cfg.optimizer,
        weight_decay=cfg.weight_decay,
        grad_clip=5.0,
        after_epoch=after_epoch,
    )


def train_cls(cfg: TrainConfig, progress: bool = False) -> dict[str, Any]:
    """Train a recipe into ``cfg.out`` (layout: :mod:`cspine.cls.model_dir`); returns the summary dict.

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
            check_resume(cfg)
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
            barrier(rt)
            if not rt.is_main:
                studies = build_crops(ccfg)
            studies = [s for s in studies if s.labels]
            if len(studies) < 4:
                raise CspineInputError(f"{cfg.data}: only {len(studies)} labelled studies with masks; need at least 4")
            store = StudyStore(studies, cfg.crop)
        log.info("%d studies with crops (%s)", len(store), ccfg.folder)
        recipe = get_recipe(cfg.recipe, cfg.model, cfg.crop)
        summary = recipe.train(cfg, rt, store, progress, timings)
        if rt.is_main:
            summary["timings_s"] = {k: round(v, 2) for k, v in timings.items() if k != "infer_images"}  # a count
            write_json(cfg.out / "run.json", run_record(rt, config_to_dict(cfg), timings, summary=summary))
            if summary.get("status") != "partial":
                shutil.rmtree(cfg.out / "work", ignore_errors=True)
        return summary
    finally:
        shutdown(rt)


__all__ = ["fit_hooks", "train_cls"]
