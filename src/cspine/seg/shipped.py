"""The segmenter that ships with cspine: where it lives in the package, and the one command that rebuilds it.

``cspine build-segmenter --out DIR`` generates its training data (tight cervical scans and wide fields of view,
head to abdomen), prepares them, trains the coarse stage (and the refinement stage beside it, unless the recipe
keeps the installed one) with domain randomisation, scores the result on held-out generated studies of fresh seeds,
and writes ``DIR/model`` (a model directory: the coarse stage with ``refine/``) and ``DIR/model/recipe.json`` (this
recipe, seeds, steps, times, figures). ``--install`` copies the model into the package (:data:`SHIPPED_DIR`),
where ``cspine segment``, ``predict`` and the demo find it when no ``--model`` is given. Rerunning the command
resumes every stage.

Seeds of the training and held-out sets are disjoint from the demo's (seed 0) and from the held-out sets the
README's figures use, so no figure is measured on a study the shipped segmenter trained on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cspine.runtime import versions, write_json

log = logging.getLogger(__name__)

#: Where the shipped model directory lives inside the package.
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "weights" / "segmenter"
#: Files of a model directory that ship (no resume state: it would triple the size); format 1.2 names, then 1.1's.
SHIPPED_FILES = ("config.json", "labels.json", "model.pt", "model.history.json", "run.json", "best.pt", "log.json")


@dataclass(frozen=True)
class GeneratedSet:
    """One ``cspine synth`` call of the recipe."""

    name: str
    studies: int
    seed: int
    profile: str = "default"
    size: str = "small"


@dataclass(frozen=True)
class ShippedRecipe:
    """Everything ``cspine build-segmenter`` does, saved as ``recipe.json`` beside the model."""

    train_sets: tuple[GeneratedSet, ...] = (
        GeneratedSet("default", 48, 1101),
        GeneratedSet("wide", 48, 1102, profile="wide"),
        GeneratedSet("wide2", 48, 1104, profile="wide"),
    )
    heldout_sets: tuple[GeneratedSet, ...] = (
        GeneratedSet("heldout-default-small", 10, 1201),
        GeneratedSet("heldout-default-full", 3, 1202, size="full"),
        GeneratedSet("heldout-wide-small", 10, 1203, profile="wide"),
    )
    # train-seg overrides of each stage (the rest: TrainSegConfig's defaults and REFINE_RECIPE)
    coarse: dict[str, Any] = field(
        default_factory=lambda: {"fold": -1, "epochs": 70, "iters_per_epoch": 100, "randomize": True, "seed": 0}
    )
    # later runs of the coarse stage, each resumed with more epochs (train-seg stretches its cosine schedule over
    # the new total, so each is a warm restart at the learning rate that schedule has there)
    coarse_continue_to: tuple[int, ...] = ()
    refine: dict[str, Any] = field(
        default_factory=lambda: {
            "fold": -1, "epochs": 60, "iters_per_epoch": 100, "randomize": True, "seed": 0, "cervical_box_mm": 40.0
        }
    )
    # Keep the refinement stage of the segmenter installed in the package instead of training one. It outlines
    # vertebra against background and names no level, so a new coarse stage (which names them) can reuse it; its
    # own config.json and run.json say what it was trained on, and recipe.json records where it came from.
    keep_refine: bool = True
    threads: int = 2  # in all: shared by the stages that train at the same time
    workers: int = 2


def _flags(overrides: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False:
            out.append("--no-" + key.replace("_", "-"))
        else:
            out += [flag, *(map(str, value) if isinstance(value, list | tuple) else [str(value)])]
    return out


def _cspine(*args: str) -> list[str]:
    return [sys.executable, "-m", "cspine.cli", *args]


def _generate(work: Path, sets: tuple[GeneratedSet, ...], workers: int) -> None:
    """``cspine synth`` + ``cspine prepare`` of each set (each skipped when already complete)."""
    for s in sets:
        data, cache = work / "data" / s.name, work / "cache" / s.name
        if not (data / "synth.json").exists():
            subprocess.run(
                _cspine("synth", "--out", str(data), "--studies", str(s.studies), "--test-studies", "0",
                        "--segmented", "1", "--seed", str(s.seed), "--size", s.size, "--profile", s.profile,
                        "--workers", str(workers), "--no-progress"),
                check=True,
            )
        subprocess.run(_cspine("prepare", "--data", str(data), "--out", str(cache), "--workers", str(workers),
                               "--no-progress"), check=True, stdout=subprocess.DEVNULL)


def _union_cache(work: Path, sets: tuple[GeneratedSet, ...]) -> Path:
    """One cache whose train/ links to every set's prepared studies (UIDs differ by seed)."""
    union = work / "cache" / "train-union" / "train"
    union.mkdir(parents=True, exist_ok=True)
    for s in sets:
        for study in sorted((work / "cache" / s.name / "train").iterdir()):
            link = union / study.name
            if study.is_dir() and not link.exists():
                link.symlink_to(study.resolve(), target_is_directory=True)
    return union.parent


def _train(cache: Path, model: Path, recipe: ShippedRecipe) -> dict[str, float]:
    """The stages not yet trained, at once, one process each (they train independently; the refinement stage learns
    vertebra vs background from the true masks)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    commands = {
        "coarse": _cspine("train-seg", "--data", str(cache), "--out", str(model), *_flags(recipe.coarse)),
        "refine": _cspine("train-seg", "--stage", "refine", "--data", str(cache), "--out", str(model / "refine"),
                          *_flags(recipe.refine)),
    }
    phases = {  # per stage: (directory, epochs it ends at, extra arguments), run in order
        "coarse": [(model, int(recipe.coarse["epochs"]), [])]
        + [(model, n, ["--epochs", str(n)]) for n in recipe.coarse_continue_to],
        "refine": [(model / "refine", int(recipe.refine["epochs"]), [])],
    }
    model.mkdir(parents=True, exist_ok=True)
    left = {name: [extra for stage, n, extra in runs if not _finished(stage, n)] for name, runs in phases.items()}
    threads = ["--threads", str(max(1, recipe.threads // max(1, sum(map(bool, left.values()))))), "--no-progress"]
    todo = {name: [[*commands[name], *threads, *extra] for extra in runs] for name, runs in left.items()}
    t0 = time.perf_counter()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    seconds: dict[str, float] = {}
    while any(todo.values()) or procs:
        for name, p in list(procs.items()):
            if p.poll() is None:
                continue
            if p.returncode != 0:
                for other in procs.values():
                    other.terminate()
                raise RuntimeError(f"train-seg ({name}) failed with exit code {p.returncode}")
            del procs[name]
            if not todo[name]:
                seconds[name] = round(time.perf_counter() - t0, 1)
        for name, cmds in todo.items():
            if cmds and name not in procs:
                procs[name] = subprocess.Popen(cmds.pop(0), env=env, stdout=subprocess.DEVNULL)
        time.sleep(2)
    return seconds


def _stage_record(model: Path) -> dict[str, Any]:
    """Steps and training seconds of one trained stage, from its history (the wall clock of a resumed build
    would miss the earlier runs)."""
    from cspine.engine.model_dir import read_history

    rows = read_history(model / "model.history.json")["epochs"]
    config = json.loads((model / "config.json").read_text())
    train = config.get("train", config)
    return {
        "epochs": len(rows),
        "steps": len(rows) * int(train["iters_per_epoch"]),
        "train_seconds": round(sum(float(r.get("train_seconds") or 0.0) for r in rows), 1),
        "final_train_loss": rows[-1].get("train_loss") if rows else None,
    }


def _finished(stage: Path, epochs: int) -> bool:
    """A stage whose training ran to its end at ``epochs`` or later (a rerun of the build then skips it)."""
    from cspine.engine.model_dir import read_history

    hist = read_history(stage / "model.history.json")
    return bool(hist.get("done")) and len(hist["epochs"]) >= epochs


def _evaluate(work: Path, model: Path, sets: tuple[GeneratedSet, ...]) -> dict[str, Any]:
    """``cspine eval-seg`` on each held-out set: mean Dice, per-vertebra Dice, identification."""
    figures: dict[str, Any] = {}
    for s in sets:
        out = work / "eval" / s.name
        subprocess.run(_cspine("eval-seg", "--model", str(model), "--data", str(work / "cache" / s.name),
                               "--out", str(out)), check=True, stdout=subprocess.DEVNULL)
        figures[s.name] = json.loads((out / "eval.json").read_text())["summary"]
    return figures


def install(model: Path, dest: Path = SHIPPED_DIR) -> Path:
    """Copy a built model (coarse + refine, weights and records only) into ``dest``, replacing it as a whole."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("", "refine"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
        for name in SHIPPED_FILES:
            if (model / sub / name).exists():
                shutil.copy2(model / sub / name, tmp / sub / name)
    for name in ("recipe.json", "curve.png"):
        if (model / name).exists():
            shutil.copy2(model / name, tmp / name)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def build(out: Path, recipe: ShippedRecipe | None = None, install_into: Path | None = None) -> dict[str, Any]:
    """Generate, prepare, train both stages, evaluate, and write ``out/model/recipe.json``; resumable."""
    recipe = recipe or ShippedRecipe()
    work, model = out / "work", out / "model"
    timings: dict[str, Any] = {}
    t = time.perf_counter()
    _generate(work, recipe.train_sets + recipe.heldout_sets, recipe.workers)
    timings["generate_and_prepare"] = round(time.perf_counter() - t, 1)
    cache = _union_cache(work, recipe.train_sets)
    kept = {"kept_from": _keep_refine(model)} if recipe.keep_refine else {}
    timings["train"] = _train(cache, model, recipe)
    t = time.perf_counter()
    figures = _evaluate(work, model, recipe.heldout_sets)
    timings["evaluate"] = round(time.perf_counter() - t, 1)
    record = {
        "recipe": asdict(recipe),
        "command": f"cspine build-segmenter --out {out}",
        "seconds": timings,
        "stages": {"coarse": _stage_record(model), "refine": _stage_record(model / "refine") | kept},
        "heldout": figures,
        # what it trained on, so that anyone can check a study was not among them (the demo's test does)
        "train_uids": sorted(p.name for p in (cache / "train").iterdir()),
        "versions": versions(),
        "machine": {"cpus": os.cpu_count()},
    }
    write_json(model / "recipe.json", record)
    if install_into is not None:
        install(model, install_into)
    return record


def _keep_refine(model: Path, source: Path = SHIPPED_DIR) -> dict[str, Any]:
    """Copy ``source``'s refinement stage into ``model/refine`` and return where it came from (the build that
    trained it, from ``source``'s recipe.json); a resumed build keeps the copy and the record made with it."""
    origin = model / "refine" / "kept_from.json"
    if not origin.exists():
        record = json.loads((source / "recipe.json").read_text()) if (source / "recipe.json").exists() else {}
        refine = record.get("stages", {}).get("refine", {})
        kept = refine.get("kept_from") or {
            "command": record.get("command"),
            "recipe": record.get("recipe"),
            "stage": refine,
        }
        tmp = model / "refine.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source / "refine", tmp)
        write_json(tmp / "kept_from.json", kept)
        shutil.rmtree(model / "refine", ignore_errors=True)
        tmp.rename(model / "refine")
    return json.loads(origin.read_text())


def heldout_dice(record: dict[str, Any]) -> dict[str, float | None]:
    """Mean Dice per held-out set of a build record (``recipe.json``)."""
    return {name: summary.get("mean_dice") for name, summary in record["heldout"].items()}


def shipped_model() -> Path | None:
    """The shipped model directory, or None when this installation has none."""
    return SHIPPED_DIR if any((SHIPPED_DIR / n).exists() for n in ("model.pt", "best.pt")) else None


__all__ = ["SHIPPED_DIR", "GeneratedSet", "ShippedRecipe", "build", "heldout_dice", "install", "shipped_model"]
