"""The ``sequence`` recipe's training: study-grouped, label-stratified K-fold CV, one model per fold, OOF per fold.

The folds are the dataset's (``DATA/splits.json``, cspine.data.splits), the same the segmenter trains on.

Each fold's lucency model is fitted on its training studies before the network trains and saved beside its weights
(``fold{k}.features.json``, cspine.features.linear); the fold's best weights predict its held-out studies
(``oof_fold{k}.csv``); once every fold is done the OOF predictions are calibrated and evaluated
(:func:`cspine.cls.oof.finish`). ``--fold k`` trains one fold.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cspine.cls.config import TrainConfig, config_to_dict
from cspine.cls.dataset import StudyDataset, StudyStore
from cspine.cls.oof import finish, write_oof
from cspine.cls.recipes import Fold, SequenceRecipe
from cspine.data.splits import fold_members
from cspine.engine.loop import barrier, finished, fit
from cspine.engine.model_dir import RunFiles, load_weights, read_history
from cspine.features.linear import LucencyModel
from cspine.metrics import competition_loss
from cspine.runtime import Runtime, timed, write_json

log = logging.getLogger(__name__)


def initial_weights(cfg: TrainConfig) -> tuple[dict[str, Any], LucencyModel | None]:
    """The first fold's weights of ``cfg.init``, checked to be a network of this run's model and crop settings,
    and, with ``cfg.init_statistics``, its lucency regression."""
    from cspine.cls.model_dir import fold_checkpoints, load_config
    from cspine.engine.config import to_dict
    from cspine.engine.model_dir import differences, load_weights
    from cspine.errors import ConfigError

    src = Path(cfg.init)  # type: ignore[arg-type]
    init = load_config(src)
    # the lucency regression's strength and the pretrained file are no part of the network's weights
    same = {"pretrained": None, "feature_c": cfg.model.feature_c}
    diff = differences("model", to_dict(replace(init.model, **same)), to_dict(replace(cfg.model, **same)))
    diff += differences("crop", to_dict(replace(init.crop, stats_region=cfg.crop.stats_region)), to_dict(cfg.crop))
    if init.recipe != cfg.recipe or diff:
        raise ConfigError(f"--init {src}: its network differs from this run's: " + "; ".join(
            diff or [f"recipe {init.recipe!r} != {cfg.recipe!r}"]))  # fmt: skip
    paths = fold_checkpoints(src)
    if not paths:
        raise ConfigError(f"--init {src}: no fold*.pt weights (training not finished?)")
    lucency = None
    if cfg.init_statistics:
        if init.crop.stats_region != cfg.crop.stats_region:  # the regression read statistics of another region
            raise ConfigError(f"--init-statistics: {src} counts the statistics in stats_region "
                              f"{init.crop.stats_region!r}, this run in {cfg.crop.stats_region!r}")  # fmt: skip
        features = paths[0].with_suffix(".features.json")
        if not features.exists():
            raise ConfigError(f"--init-statistics: {features} does not exist (the --init classifier has no fitted "
                              "lucency regression)")  # fmt: skip
        lucency = LucencyModel.load(features)
    return load_weights(paths[0])[0], lucency


def train_folds(
    recipe: SequenceRecipe, cfg: TrainConfig, rt: Runtime, store: StudyStore, progress: bool, timings: dict[str, float]
) -> dict[str, Any]:
    """Train every fold (or ``cfg.fold``) into ``cfg.out``; the summary once all folds are done, else partial."""
    from cspine.cls import train  # the loop's hooks (and the kill-simulating test hook) live there

    out = cfg.out
    y = store.labels()
    # the dataset's split file, shared with the segmenter (cspine.data.splits)
    folds = np.array(list(fold_members(cfg.data, "train", cfg.folds, cfg.seed, store.uids).values()))
    if rt.is_main:
        write_json(out / "folds.json", {u: int(f) for u, f in zip(store.uids, folds, strict=True)})
    todo = [cfg.fold] if cfg.fold is not None else list(range(cfg.folds))
    batch = cfg.batch_size * 2
    # read once, every fold starts from it
    start, init_lucency = initial_weights(cfg) if cfg.init is not None else (None, None)
    # epochs are chosen on the crops as they are: test-time augmentation changes how the fold predicts (out of
    # fold, below, and at inference), never what it learns
    plain = type(recipe)(replace(recipe.model, tta="none"), recipe.crop)
    for k in todo:
        run = RunFiles.standard(out, f"fold{k}")
        oof_path = out / f"oof_fold{k}.csv"
        if finished(read_history(run.history), cfg.epochs) and oof_path.exists():
            log.info("fold %d already trained", k)
            continue
        torch.manual_seed(cfg.seed * 100 + k)
        model = recipe.build()
        if start is not None:  # a resume state, when there is one, replaces these weights in fit()
            model.load_state_dict(start)
        tr_rows = np.flatnonzero(folds != k)
        va_rows = np.flatnonzero(folds == k)
        if init_lucency is not None:
            lucency = init_lucency
        else:
            lucency = recipe.fit_lucency(*store.study_stats(tr_rows), y[tr_rows, 1:])
        if lucency is not None and rt.is_main:
            lucency.save(run.weights.with_suffix(".features.json"))
        train_ds = StudyDataset(store, tr_rows, augment=cfg.augment, seed=cfg.seed * 100 + k)
        val_ds = StudyDataset(store, va_rows)

        def validate(
            m: nn.Module, val_ds: StudyDataset = val_ds, va_rows: np.ndarray = va_rows, lm: Any = lucency
        ) -> dict[str, float]:
            p = plain.aggregate(plain.predict([Fold(m, lm)], val_ds, rt.device, batch))
            yt = y[va_rows]
            score = competition_loss(yt, p)
            return {"score": score, "val_loss": score, "val_acc": float(((p >= 0.5) == (yt > 0.5)).mean())}

        with timed(timings, f"train_fold{k}"):
            step = partial(recipe.step, lucency=lucency)
            hooks = train.fit_hooks(cfg, rt, train_ds, step, validate)
            fit(model, hooks, run, cfg.epochs, cfg.lr, rt, progress, config_to_dict(cfg))
        if rt.is_main:
            model.load_state_dict(load_weights(run.weights)[0])
            model.to(rt.device)
            t0 = time.perf_counter()
            pred = recipe.predict([Fold(model, lucency)], val_ds, rt.device, batch)
            timings["infer_images"] = timings.get("infer_images", 0.0) + float(pred["present"].sum()) * cfg.crop.slices
            timings["infer_seconds"] = timings.get("infer_seconds", 0.0) + time.perf_counter() - t0
            write_oof(oof_path, [store.uids[r] for r in va_rows], pred, k, cfg.model.patient_from)
        barrier(rt)
    done = [k for k in range(cfg.folds) if (out / f"oof_fold{k}.csv").exists()]
    if len(done) < cfg.folds:
        return {"status": "partial", "folds_done": done}
    if not rt.is_main:
        return {}
    oof = [out / f"oof_fold{k}.csv" for k in range(cfg.folds)]
    summary = finish(cfg, store, oof, timings)
    record_domain(cfg, store)
    return summary


def record_domain(cfg: TrainConfig, store: StudyStore) -> None:
    """Write the classifier's domain (cspine.cls.domain) beside the folds: the coarsest spacing among the studies
    its network learned from (the --init network's own, plus these studies unless it kept its weights with 0
    epochs)."""
    from cspine.cls.domain import NetworkDomain, cache_spacings, spacing_domain

    start = NetworkDomain.load(Path(cfg.init)) if cfg.init is not None else None
    learned_from = store.uids if cfg.epochs > 0 or cfg.init is None else []
    domain = spacing_domain(cache_spacings(cfg.data, learned_from), start)
    if domain is None:
        log.warning("%s: no study spacing known; fractures will be assessed at every resolution", cfg.out)
        return
    domain.save(cfg.out)


__all__ = ["train_folds"]
