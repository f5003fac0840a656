"""The segmentation model directory: what ``cspine train-seg`` writes besides the weights, and the resume check.

MODEL_DIR after training (format 1.2; the run files follow the schema both stages share,
:mod:`cspine.engine.model_dir`, with the run name ``model``): config.json (format version, network name and
``arch_args``, classes, the resolved training config), labels.json, model.pt, model.history.json and .csv,
work/model.state.pt, curve.png, run.json (docs/segmentation.md). 1.0/1.1 directories (best.pt, last.pt, log.json)
are still read for inference.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cspine.engine.config import from_dict, to_dict
from cspine.engine.formats import parse_format
from cspine.engine.model_dir import RunFiles, model_config
from cspine.engine.model_dir import check_resumable as check_resumable_config
from cspine.errors import ConfigError
from cspine.seg.config import (
    CLASS_TO_VALUE,
    CLASSES,
    CONFIG_FORMAT,
    OTHER_VALUE,
    RESUMABLE_FIELDS,
    RUN_NAME,
    STAGE_CLASSES,
    TrainSegConfig,
)


def labels_json(stage: str = "coarse") -> dict[str, Any]:
    """MODEL_DIR/labels.json: network classes, the values written in masks, and how training masks are read."""
    if stage == "refine":
        return {
            "classes": dict(enumerate(STAGE_CLASSES[stage])),
            "input_values": "any non-zero mask value -> vertebra",
            "use": "which voxels are vertebra; the coarse model in the parent directory names them",
        }
    return {
        "classes": dict(enumerate(CLASSES)),
        "output_values": {name: int(v) for name, v in zip(CLASSES, CLASS_TO_VALUE, strict=True)},
        "input_values": "mask values 1..7 -> C1..C7; any other non-zero value (T1.., 255) -> other",
        "other_value": OTHER_VALUE,
    }


def model_config_json(cfg: TrainSegConfig) -> dict[str, Any]:
    """MODEL_DIR/config.json: everything inference needs, plus the resolved training config."""
    from cspine.seg.models import get_spec

    spec = get_spec(cfg.arch)
    facts = {"arch_description": spec.description, "stage": cfg.stage, "classes": list(STAGE_CLASSES[cfg.stage])}
    return model_config(CONFIG_FORMAT, "cspine-seg", cfg.arch, spec.arch(), to_dict(cfg), **facts, in_channels=1)


def check_resumable(out: Path, cfg: TrainSegConfig) -> None:
    """Refuse to continue a run whose saved config differs in anything but RESUMABLE_FIELDS, or whose directory
    is of another format (a 1.0/1.1 run is first brought to this one by :func:`upgrade_legacy_run`)."""
    import json

    path = out / "config.json"
    if not path.exists():
        return
    data = json.loads(path.read_text())
    if parse_format(data.get("format")) != parse_format(CONFIG_FORMAT):
        raise ConfigError(
            f"{out}: a training run of model-directory format {data.get('format')}; this cspine continues only "
            f"{CONFIG_FORMAT} runs: use --fresh to start over, or another --out"
        )
    try:  # fields added since the run started take their defaults
        saved = to_dict(from_dict(TrainSegConfig, data.get("train", {})))
    except ValueError as exc:
        raise ConfigError(f"{path}: saved config is not readable by this cspine ({exc}); use --fresh") from exc
    check_resumable_config(out, saved, to_dict(cfg), RESUMABLE_FIELDS, "use another --out, or --fresh to start over")


def upgrade_legacy_run(out: Path) -> None:
    """Bring a 1.0/1.1 training run to this format so that it can continue: last.pt -> work/model.state.pt, best.pt
    -> model.pt, log.json -> model.history.json, config.json's format. Same weights, optimiser state and counters,
    and both formats re-derive the patches from (seed, rank, epoch), so the run continues as it would have."""
    import json

    from cspine.engine.model_dir import load_weights, save_state, save_weights, write_history
    from cspine.runtime import load_checkpoint, write_json

    last = load_checkpoint(out / "last.pt")
    if last.get("format") != 1:
        raise ConfigError(f"{out / 'last.pt'}: unknown checkpoint format {last.get('format')!r}; use --fresh")
    data = json.loads((out / "config.json").read_text())
    run = RunFiles.standard(out, RUN_NAME)
    best = float(last["best_score"]) if last["best_score"] >= 0 else None
    progress = {"epoch": int(last["epoch"]), "best": best, "best_epoch": int(last["best_epoch"])}
    save_state(run.state, last["model"], last["optimizer"], {**progress, "bad": int(last["bad_epochs"])})
    if (out / "best.pt").exists():
        weights, info = load_weights(out / "best.pt")
        save_weights(run.weights, weights, info.get("epoch"), info.get("score"), RUN_NAME, data.get("train"))
    rows, running = [], None
    for r in last["log"]:
        improved = bool(r.get("best"))
        running = r.get("val_dice_mean") if improved and r.get("val_dice_mean") is not None else running
        rows.append({"run": RUN_NAME, **r, "best": running, "improved": improved, "train_seconds": r.get("seconds")})
    write_history(run.history, {"done": False, "epochs": rows, "best_score": best, "best_epoch": last["best_epoch"]})
    write_json(out / "config.json", {**data, "format": CONFIG_FORMAT})
    for name in ("last.pt", "best.pt", "log.json", "log.csv"):
        (out / name).unlink(missing_ok=True)


def weights_path(model_dir: Path, fmt: Any) -> Path:
    """The weights inference reads: MODEL_DIR/model.pt (1.2), best.pt (1.0/1.1); a run still in progress that has
    none yet: its resume state (work/model.state.pt, or last.pt)."""
    run = RunFiles.standard(model_dir, RUN_NAME)
    legacy = (parse_format(fmt) or (1, 0)) < (1, 2)
    best, state = (model_dir / "best.pt", model_dir / "last.pt") if legacy else (run.weights, run.state)
    return best if best.exists() or not state.exists() else state


def plot_curve(rows: list[dict[str, Any]], path: Path) -> Path:
    """Learning curve: training loss and validation Dice per epoch (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(epochs, [r["train_loss"] for r in rows], color="tab:blue", label="train loss (Dice + CE)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss", color="tab:blue")
    val = [(r["epoch"], r["val_dice_mean"]) for r in rows if r.get("val_dice_mean") is not None]
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val, strict=True), color="tab:orange", marker=".", label="validation Dice C1-C7")
        ax2.set_ylabel("mean Dice C1-C7", color="tab:orange")
        ax2.set_ylim(0, 1)
    ax.set_title("vertebra segmentation")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


#: What a fresh start (``--fresh``) removes from MODEL_DIR: this format's files and those of 1.0/1.1 runs.
TRAINING_FILES = (
    "config.json", "run.json", "curve.png", f"{RUN_NAME}.pt", f"{RUN_NAME}.history.json", f"{RUN_NAME}.history.csv",
    f"work/{RUN_NAME}.state.pt", "best.pt", "last.pt", "log.json", "log.csv",
)  # fmt: skip


__all__ = [
    "TRAINING_FILES",
    "check_resumable",
    "labels_json",
    "model_config_json",
    "plot_curve",
    "upgrade_legacy_run",
    "weights_path",
]
