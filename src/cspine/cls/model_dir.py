"""The classifier's model directory: its layout, and reading it back (config, fold weights). Torch-free.

Layout (self-sufficient for :mod:`cspine.cls.infer`; the per-run files follow the schema both stages share,
:mod:`cspine.engine.model_dir`)::

    MODEL_DIR/config.json          format version, network (recipe; model and crop settings), resolved TrainConfig
    MODEL_DIR/fold{k}.pt           best weights of fold k (seed-baseline: fold0.pt holds all seven nets)
    MODEL_DIR/fold{k}.history.json per-epoch losses, accuracies, images/s; ``done`` when the fold is finished
    MODEL_DIR/fold{k}.history.csv  the same, flat
    MODEL_DIR/folds.json           study -> fold (or train/val/test for the hold-out splits)
    MODEL_DIR/labels.csv           the training labels (train.csv rows of the studies used)
    MODEL_DIR/oof.csv              out-of-fold (or held-out) probabilities, uncalibrated, wide format
    MODEL_DIR/oof_calibrated.csv   the same after temperature scaling
    MODEL_DIR/calibration.json     temperatures, log loss before/after
    MODEL_DIR/history.json         all folds' epoch rows (curves)
    MODEL_DIR/metrics.json         summary: OOF metrics, per fold, speed, timings
    MODEL_DIR/eval/                cspine evaluate output on the OOF predictions (report.md, PNGs)
    MODEL_DIR/run.json             run record: versions, config, device, timings
    MODEL_DIR/work/                resume states (fold{k}.state.pt) while training (removed when all folds are done)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from cspine.cls.config import TrainConfig, config_from_dict
from cspine.engine.config import to_dict
from cspine.engine.model_dir import check_resumable

#: Settings that may change between a run and its resumption (they do not change what is learned).
RESUMABLE_CHANGES = ("fold", "device", "workers", "threads", "data", "out", "crops_dir", "progress")


def load_config(model_dir: Path) -> TrainConfig:
    """The resolved TrainConfig of a model directory."""
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{model_dir}: not a cspine classifier directory (no config.json)")
    return config_from_dict(json.loads(path.read_text()), f"{path}: classifier model directory")


def fold_checkpoints(model_dir: Path) -> list[Path]:
    """fold{k}.pt files of a model directory, by k."""
    found = []
    for p in Path(model_dir).glob("fold*.pt"):
        m = re.fullmatch(r"fold(\d+)\.pt", p.name)
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def check_resume(cfg: TrainConfig) -> None:
    """A model directory holds one configuration: resuming with other settings is an error that says which."""
    path = cfg.out / "config.json"
    if not path.exists():
        return
    # compared as resolved TrainConfigs, whose top-level names RESUMABLE_CHANGES lists (config.json nests them
    # under "train", where a changed --threads or --fold would count as another configuration)
    old = to_dict(config_from_dict(json.loads(path.read_text())))
    hint = "use a new --out folder, or the same settings to resume"
    check_resumable(cfg.out, old, to_dict(cfg), RESUMABLE_CHANGES, hint)


__all__ = ["RESUMABLE_CHANGES", "check_resume", "fold_checkpoints", "load_config"]
