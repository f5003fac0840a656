"""The ``seed-baseline`` recipe's training: seven per-vertebra image classifiers on a hold-out split.

Images are split by study (``study``, 33 % held out) or, as the seed did, at random over images (``image``, leaky:
kept for comparison). Each vertebra's net trains with early stopping on a validation part of the training studies,
then predicts the held-out images; the seed's image-level numbers and the study-level probabilities (mean over a
vertebra's images, noisy-or for the patient) go to ``metrics.json`` and ``oof.csv``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from cspine.cls.config import TrainConfig, config_to_dict
from cspine.cls.dataset import ImageDataset, ImageIndex, StudyStore, image_index
from cspine.cls.evaluate import write_wide
from cspine.cls.folds import holdout_split, leaky_image_split
from cspine.cls.models import SeedBaseline, SeedNet
from cspine.cls.oof import finish
from cspine.cls.recipes import SeedBaselineRecipe
from cspine.engine.loop import finished, fit
from cspine.engine.model_dir import RunFiles, load_weights, read_history, save_weights
from cspine.labels import CERVICAL
from cspine.runtime import Runtime, timed, write_json


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


def train_seed(
    recipe: SeedBaselineRecipe,
    cfg: TrainConfig,
    rt: Runtime,
    store: StudyStore,
    progress: bool,
    timings: dict[str, float],
) -> dict[str, Any]:
    """Train the seven nets (resuming per vertebra), predict the held-out part, write fold0.pt and the summary."""
    from sklearn.metrics import classification_report, confusion_matrix

    from cspine.cls import train  # the kill-simulating test hook lives there

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
        std = RunFiles.standard(out, f"seed-{v}")
        run = RunFiles(std.name, out / "work" / f"seed-{v}.pt", std.state, std.history)  # all seven go to fold0.pt
        torch.manual_seed(cfg.seed * 100 + vi)
        net = SeedNet(cfg.model, cfg.crop)
        val_ds = ImageDataset(store, index, va)

        def validate(m: nn.Module, val_ds: ImageDataset = val_ds) -> dict[str, float]:
            p, rows = recipe.predict(m, val_ds, rt.device, cfg.batch_size * 2)
            yv = _image_labels(store, index, rows)
            q = np.clip(p, 1e-7, 1 - 1e-7)
            bce = float(-(yv * np.log(q) + (1 - yv) * np.log(1 - q)).mean()) if len(p) else 0.0
            return {"score": bce, "val_loss": bce, "val_acc": float(((p >= 0.5) == (yv > 0.5)).mean()) if len(p) else 0}

        if not (finished(read_history(run.history), cfg.epochs) and run.weights.exists()):
            with timed(timings, f"train_seed_{v}"):
                train_ds = ImageDataset(store, index, tr, augment=cfg.augment, seed=cfg.seed + vi)
                hooks = train.fit_hooks(cfg, rt, train_ds, recipe.step, validate)
                fit(net, hooks, run, cfg.epochs, cfg.lr, rt, progress, config_to_dict(cfg))
        net.load_state_dict(load_weights(run.weights)[0])
        full.nets[v].load_state_dict(net.state_dict())
        net.to(rt.device)
        t0 = time.perf_counter()
        p, rows = recipe.predict(net, ImageDataset(store, index, te), rt.device, cfg.batch_size * 2)
        timings["infer_images"] = timings.get("infer_images", 0.0) + len(rows)
        timings["infer_seconds"] = timings.get("infer_seconds", 0.0) + time.perf_counter() - t0
        test_probs[rows] = p
    if not rt.is_main:
        return {}
    save_weights(out / "fold0.pt", full.state_dict(), cfg.epochs, None, "seed-baseline", config_to_dict(cfg))
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
    probs = np.array(
        [
            recipe.aggregate(
                [test_probs[te[(index.study[te] == s) & (index.vertebra[te] == vi)]] for vi in range(len(CERVICAL))]
            )
            for s in test_studies
        ]
    ).reshape(-1, 8)
    oof = out / "oof.csv"
    write_wide(oof, [store.uids[s] for s in test_studies], probs, {"fold": ["test"] * len(test_studies)})
    return finish(cfg, store, [oof], timings, extra={"image_level": image_level}, calibrate=False)


__all__ = ["seed_split", "train_seed"]
