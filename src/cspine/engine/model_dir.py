"""The model-folder schema both learning stages write: file names and checkpoint keys, read back the same way.

One training run (a classifier fold, a seed-baseline vertebra net, a segmentation stage) named ``NAME`` leaves::

    FOLDER/config.json            {"format": "major.minor", "kind", "arch": network name, "arch_args": what it is
                                  built from, the stage's facts (classes ...), "train": resolved training config}
    FOLDER/NAME.pt                best weights: {"format", "model", "epoch", "score", "run", "config"}
    FOLDER/NAME.history.json      {"done", "stopped_early", "best_score", "best_epoch", "epochs": [one row per epoch]}
    FOLDER/NAME.history.csv       the same rows, flat (nested values as NAME_key columns)
    FOLDER/work/NAME.state.pt     resume state: {"format", "model", "optimizer", "epoch", "best", "best_epoch", "bad"}
    FOLDER/run.json               run record: versions, config, device, timings (cspine.runtime.run_record)

Everything is written atomically and read with ``weights_only=True``. A segmentation model folder holds one run
(``model``); a classifier folder one per fold (``fold{k}``). Torch is imported only by the functions that need it.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cspine.engine.formats import check_format
from cspine.errors import ConfigError
from cspine.runtime import write_json

#: major.minor of the ``.pt`` files written here (weights and resume state).
CHECKPOINT_FORMAT = "1.0"
#: The key of the network weights in every checkpoint (weights and resume state).
WEIGHTS = "model"


@dataclass(frozen=True)
class RunFiles:
    """The files of one training run (see the module docstring)."""

    name: str
    weights: Path
    state: Path
    history: Path

    @classmethod
    def standard(cls, folder: Path, name: str) -> RunFiles:
        """The schema's layout: FOLDER/NAME.pt, FOLDER/work/NAME.state.pt, FOLDER/NAME.history.json."""
        folder = Path(folder)
        return cls(name, folder / f"{name}.pt", folder / "work" / f"{name}.state.pt", folder / f"{name}.history.json")


def save_weights(
    path: Path, state_dict: dict[str, Any], epoch: int, score: float | None, run: str, config: Any
) -> None:
    """FOLDER/NAME.pt: the weights with the epoch and validation score they came from, and the run's config."""
    from cspine.runtime import save_checkpoint

    info = {"format": CHECKPOINT_FORMAT, "epoch": epoch, "score": score, "run": run, "config": config or {}}
    save_checkpoint({**info, WEIGHTS: state_dict}, path)


def load_weights(path: Path, map_location: Any = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """(state dict, the checkpoint's other keys) of a weights or resume-state file. Files written before the
    schema was shared are read too (classifier ``state_dict`` key, segmenter best.pt/last.pt)."""
    from cspine.runtime import load_checkpoint

    ckpt = load_checkpoint(path, map_location=map_location)
    key = WEIGHTS if isinstance(ckpt, dict) and WEIGHTS in ckpt else "state_dict"
    if not isinstance(ckpt, dict) or key not in ckpt:
        raise ConfigError(f"{path}: not a cspine checkpoint (no {WEIGHTS!r} weights)")
    return ckpt[key], {k: v for k, v in ckpt.items() if k not in (key, "optimizer")}


def save_state(path: Path, state_dict: dict[str, Any], optimizer: dict[str, Any], progress: dict[str, Any]) -> None:
    """FOLDER/work/NAME.state.pt: what a killed run needs to continue after its last finished epoch."""
    from cspine.runtime import save_checkpoint

    save_checkpoint({"format": CHECKPOINT_FORMAT, WEIGHTS: state_dict, "optimizer": optimizer, **progress}, path)


def load_state(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A resume state, its format checked (one line naming the file if this cspine cannot continue it)."""
    from cspine.runtime import load_checkpoint

    state = load_checkpoint(path, map_location=map_location)
    hint = "start over (--fresh) or use another --out"
    check_format(state.get("format"), CHECKPOINT_FORMAT, f"{path}: resume state", hint)
    return state


def read_history(path: Path) -> dict[str, Any]:
    """FOLDER/NAME.history.json, or an empty, unfinished history."""
    return json.loads(path.read_text()) if path.exists() else {"done": False, "epochs": []}


def write_history(path: Path, hist: dict[str, Any]) -> None:
    """The history as JSON and as CSV beside it (nested values such as per-vertebra Dice flattened)."""
    write_json(path, hist)
    rows = [flat_row(r) for r in hist["epochs"]]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    csv_path = path.with_suffix(".csv")
    tmp = csv_path.with_name(f".{csv_path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            w.writerow(["" if r.get(c) is None else r[c] for c in columns])
    os.replace(tmp, csv_path)


def flat_row(row: dict[str, Any]) -> dict[str, Any]:
    """{"val_dice": {"C1": .9}} -> {"val_dice_C1": .9}; other values unchanged."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update({f"{k}_{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def model_config(
    fmt: str, kind: str, arch: str, arch_args: dict[str, Any], train: dict[str, Any], **facts: Any
) -> dict[str, Any]:
    """FOLDER/config.json: {"format", "kind", "arch" (network name), "arch_args" (what it is built from), the
    stage's other ``facts`` (classes ...), "train" (the resolved training config)}."""
    return {"format": fmt, "kind": kind, "arch": arch, "arch_args": arch_args, **facts, "train": train}


def training_config(data: dict[str, Any]) -> dict[str, Any]:
    """The resolved training config of a config.json (under "train"; classifier directories before 4.1 kept it at
    the top level, beside "format")."""
    return dict(data["train"]) if "train" in data else {k: v for k, v in data.items() if k != "format"}


def check_resumable(
    path: Path, saved: dict[str, Any], now: dict[str, Any], may_change: Iterable[str], hint: str
) -> None:
    """A folder holds one configuration: refuse to continue it with other settings than ``may_change``,
    naming each that differs (one line)."""
    allowed = set(may_change)
    diffs = [d for k in sorted(now) if k not in allowed for d in differences(k, saved.get(k), now[k])]
    if diffs:
        raise ConfigError(f"{path} was trained with other settings (a different config: {'; '.join(diffs)}); {hint}")


def differences(name: str, saved: Any, now: Any) -> list[str]:
    """'name: saved x, now y' for each differing value, nested settings by their dotted names."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [d for k in sorted(set(saved) | set(now)) for d in differences(f"{name}.{k}", saved.get(k), now.get(k))]
    return [] if saved == now else [f"{name}: saved {saved!r}, now {now!r}"]


__all__ = [
    "CHECKPOINT_FORMAT",
    "WEIGHTS",
    "RunFiles",
    "check_resumable",
    "flat_row",
    "load_state",
    "load_weights",
    "model_config",
    "read_history",
    "save_state",
    "save_weights",
    "training_config",
    "write_history",
]
