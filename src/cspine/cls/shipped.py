"""The fracture network that ships with cspine: where it lives in the package, and how it is installed there.

It is one fold of the classifier benchmark (``benchmarks/bench_classifier.py --seg-masks ... --install``; the exact
command is in its ``recipe.json``): the ImageNet EfficientNet-lite0 fine-tuned as the ``sequence`` recipe's
network on the crops of generated studies (seed 2101), cut by the shipped segmenter's masks, on top of its fitted
regression on the lucency statistics. A classifier that starts from it (``train-cls --init shipped``; ``cspine
demo`` by default, which keeps the regression too: ``--init-statistics``) has a network that has already learned
what a generated fracture looks like in a segmenter's crops, which a few dozen studies on a CPU cannot teach. Its
seeds are disjoint from the demo's (0) and from the held-out sets of the README (11-13), and ``recipe.json`` lists
the studies it trained on. ``network_domain.json`` holds the coarsest spacing of those studies: a classifier built
on it leaves it out of coarser scans (:mod:`cspine.cls.domain`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from cspine.runtime import write_json

#: Where the shipped classifier directory lives inside the package.
SHIPPED_CLS_DIR = Path(__file__).resolve().parents[1] / "weights" / "classifier"
#: Files of a classifier directory that ship: one fold's weights, its statistics model and history, the config.
SHIPPED_FILES = ("config.json", "fold0.pt", "fold0.features.json", "fold0.history.json")


def shipped_classifier() -> Path | None:
    """The shipped classifier directory, or None when this installation has none."""
    return SHIPPED_CLS_DIR if (SHIPPED_CLS_DIR / "fold0.pt").exists() else None


def _half(path: Path) -> None:
    """Rewrite a weights file with its floating-point tensors in float16 (counters stay integers)."""
    from cspine.engine.model_dir import load_weights, save_weights

    state, info = load_weights(path)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    save_weights(path, half, info["epoch"], info["score"], info["run"], {})


def install(model: Path, record: dict[str, Any], cache: Path, dest: Path = SHIPPED_CLS_DIR) -> Path:
    """Copy fold 0 of a trained classifier directory and its build ``record`` (recipe.json) into ``dest``, with
    the network's domain (cspine.cls.domain: the coarsest spacing of the studies of ``cache`` it trained and was
    selected on, listed in the run's folds.json).

    The weights are stored in float16 (half the bytes in git; loading casts them back). The pretrained file's path
    in config.json is a path on the machine that trained it; only its name is kept.
    """
    from cspine.cls.domain import cache_spacings, spacing_domain

    domain = spacing_domain(cache_spacings(cache, json.loads((model / "folds.json").read_text())))
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in SHIPPED_FILES:
        shutil.copy2(model / name, tmp / name)
    _half(tmp / "fold0.pt")
    config = json.loads((tmp / "config.json").read_text())
    for section in (config.get("arch_args", {}), config.get("train", {})):
        net = section.get("model", {})
        if net.get("pretrained"):
            net["pretrained"] = Path(net["pretrained"]).name
    write_json(tmp / "config.json", config)
    write_json(tmp / "recipe.json", record)
    if domain is not None:
        domain.save(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


__all__ = ["SHIPPED_CLS_DIR", "SHIPPED_FILES", "install", "shipped_classifier"]
