"""The segmentation model directory: what ``cspine train-seg`` writes besides the weights, and the resume check.

MODEL_DIR after training: config.json (format version, network name and ``arch_args``, classes, the resolved
training config), labels.json, best.pt, last.pt, log.csv, log.json, curve.png, run.json (docs/segmentation.md).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from cspine.engine.config import from_dict, to_dict
from cspine.labels import CERVICAL
from cspine.runtime import write_json
from cspine.seg.config import (
    CLASS_TO_VALUE,
    CLASSES,
    CONFIG_FORMAT,
    OTHER_VALUE,
    RESUMABLE_FIELDS,
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
    return {
        "format": CONFIG_FORMAT,
        "kind": "cspine-seg",
        "arch": cfg.arch,
        "arch_args": spec.arch(),
        "arch_description": spec.description,
        "stage": cfg.stage,
        "classes": list(STAGE_CLASSES[cfg.stage]),
        "in_channels": 1,
        "train": to_dict(cfg),
    }


def check_resumable(out: Path, cfg: TrainSegConfig) -> None:
    """Refuse to continue a run whose saved config differs in anything but RESUMABLE_FIELDS."""
    import json

    path = out / "config.json"
    if not path.exists():
        return
    saved = json.loads(path.read_text()).get("train", {})
    try:  # fields added since the run started take their defaults
        saved = to_dict(from_dict(TrainSegConfig, saved))
    except ValueError as exc:
        raise ValueError(f"{path}: saved config is not readable by this cspine ({exc}); use --fresh") from exc
    now = to_dict(cfg)
    diffs = [k for k in now if k not in RESUMABLE_FIELDS and saved.get(k) != now[k]]
    if diffs:
        detail = "; ".join(f"{k}: saved {saved.get(k)!r}, now {now[k]!r}" for k in diffs)
        raise ValueError(
            f"{out}: holds a run with a different config ({detail}); use another --out, or --fresh to start over"
        )


def write_log(out: Path, rows: list[dict[str, Any]]) -> None:
    write_json(out / "log.json", rows)
    columns = ["epoch", "train_loss", "lr", "val_dice_mean", *[f"val_dice_{n}" for n in CERVICAL], "best", "seconds"]
    tmp = out / f".log.csv.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            flat = {**r, **{f"val_dice_{k}": v for k, v in (r.get("val_dice") or {}).items()}}
            w.writerow(["" if flat.get(c) is None else flat.get(c) for c in columns])
    os.replace(tmp, out / "log.csv")


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


__all__ = ["check_resumable", "labels_json", "model_config_json", "plot_curve", "write_log"]
