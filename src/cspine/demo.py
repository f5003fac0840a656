"""`cspine demo`: the whole pipeline on generated data, in minutes, on a laptop CPU.

Generate a small RSNA-layout dataset -> prepare -> segment every training study with the shipped segmenter
(:mod:`cspine.seg.shipped`; it trained on generated studies of other seeds, so no study's mask comes from a
segmenter that trained on it) -> train the `sequence` classifier on those masks (its network the shipped one,
:mod:`cspine.cls.shipped`, which trained on other seeds too) -> bundle -> submit on the generated
test studies -> evaluate against their hidden labels -> predict one study with a report. Every stage is the same
library call the CLI makes, so the demo is also the end-to-end check of the tool. The bundle it leaves in
OUT/model works with predict, submit and segment.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cspine.labels import PREDICTION_TYPES
from cspine.runtime import run_record, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes chosen so the demo finishes in a few minutes on 2 CPU cores; scale them up for a real look."""

    out: Path = Path("cspine-demo")
    # The demo's own test draw only shows submit and evaluate at work: its figures are measured on fresh held-out
    # sets of >= 64 studies (benchmarks/bench_heldout.py), where a 16-study draw's base rates do not decide them.
    # With the shipped network and statistics' regression kept (session 16) these studies fit only the calibration
    # (one temperature per column: the ranking does not depend on them), so fewer suffice (96 vs 128 measured in
    # benchmarks/cls_results.md, session 17)
    train_studies: int = 96
    test_studies: int = 16
    segmented: float = 0.5
    seed: int = 0
    device: str = "auto"
    workers: int = 2  # generation and decoding in parallel processes
    # the segmenter: None = the shipped one (cspine build-segmenter); any segmentation model directory otherwise
    seg_model: Path | None = None
    # the fracture network: True = every fold is the shipped classifier (cspine.cls.shipped: lite0 fine-tuned on
    # generated studies of other seeds, in the shipped segmenter's crops, over its statistics' regression), kept
    # as it is (cls_epochs default 0), the calibration fitted here; on a scan coarser than its training studies
    # the network is left out (cspine.cls.domain). False = a small ResNet trained from scratch for cls_epochs
    # (default 2; at these sizes on a CPU it ranks at chance and the fitted statistics carry the result), with
    # the statistics fitted here. benchmarks/cls_results.md, sessions 15-16
    shipped_network: bool = True
    cls_epochs: int | None = None
    cls_folds: int = 3
    # where the lucency statistics are counted: in the shipped segmenter's masks themselves ("bone", the bone the
    # image shows labelled by the nearest masked vertebra, scores the same with these masks and costs more:
    # benchmarks/cls_results.md, session 9)
    stats_region: str = "mask"


def _stage(name: str, timings: dict[str, float], fn: Callable[[], Any]) -> Any:
    log.info("demo: %s ...", name)
    t = time.perf_counter()
    result = fn()
    timings[name] = time.perf_counter() - t
    log.info("demo: %s done in %.1f s", name, timings[name])
    return result


def _segmenter(cfg: DemoConfig) -> Path:
    from cspine.errors import UsageError
    from cspine.seg.shipped import shipped_model

    model = cfg.seg_model or shipped_model()
    if model is None:
        raise UsageError("this installation has no shipped segmenter (cspine/weights/segmenter): build it with "
                         "cspine build-segmenter --out DIR --install, or give the demo a segmenter")
    return model


def _cls_overrides(cfg: DemoConfig, work: Path) -> dict[str, Any]:
    """train-cls settings of the demo: on the segmenter's masks, a ResNet from scratch or the shipped network."""
    common: dict[str, Any] = {
        "folds": cfg.cls_folds,
        "device": cfg.device,
        # every training study through the segmenter, ground truth or not: the classifier learns from the masks it
        # will be given at prediction time, errors included
        "masks": str(work / "pseudo"),
        "masks_first": True,
        # ~25 studies per fold: two per step
        "batch_size": 2,
        "crop": {"stats_region": cfg.stats_region},
    }
    if cfg.shipped_network:
        from cspine.cls.shipped import shipped_classifier
        from cspine.errors import UsageError

        init = shipped_classifier()
        if init is None:
            raise UsageError("this installation has no shipped classifier (cspine/weights/classifier): build it with "
                             "benchmarks/bench_classifier.py --install (see its recipe.json)")
        # network and crop settings come from init (resolve_train_config); a low rate if it fine-tunes
        epochs = 0 if cfg.cls_epochs is None else cfg.cls_epochs
        # workers: the crops in parallel processes (also the DataLoader's, idle unless it fine-tunes)
        # its statistics' regression too: the network learned on top of it, and one fitted on the shipped
        # network's training studies ranks fresh sets better than one fitted on the demo's (cls_results.md, session 16)
        return {**common, "init": str(init), "init_statistics": True, "epochs": epochs, "lr": 1e-4,
                "workers": cfg.workers}  # fmt: skip
    # CPU-sized: small crops, a quarter-width ResNet10 with a stride-2 stem and a small GRU, patient from noisy-or:
    # at tens of studies smaller nets memorise less (60-study CV: AUC 0.78 vs 0.73 at width 0.5); a higher rate
    # gives the optimiser enough steps to move
    return {
        **common,
        "epochs": 2 if cfg.cls_epochs is None else cfg.cls_epochs,
        "lr": 3e-3,
        "crop": {"slices": 10, "size": 48, "stats_region": cfg.stats_region},
        "model": {"encoder": "resnet10", "width": 0.25, "hidden": 32, "stem_stride": 2, "patient_from": "noisy-or"},
    }


def _heldout_dice(model: Path) -> dict[str, float] | None:
    """The segmenter's held-out mean Dice per generated set, from its recipe.json (None for other models)."""
    recipe = model / "recipe.json"
    if not recipe.exists():
        return None
    from cspine.seg.shipped import heldout_dice

    return heldout_dice(json.loads(recipe.read_text()))


def _write_test_labels(data: Path, out: Path) -> Path:
    """The generator's hidden test labels (synth.json) as a train.csv-style file, for evaluation."""
    info = json.loads((data / "synth.json").read_text())
    rows = [s for s in info["studies"] if s["split"] == "test"]
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["StudyInstanceUID", *PREDICTION_TYPES])
        for s in rows:
            w.writerow([s["uid"], *(int(s["labels"][k]) for k in PREDICTION_TYPES)])
    return out


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict[str, Any]:
    """Run every stage; return a summary (paths, metric table, timings) and write OUT/demo.json."""
    from cspine.bundle import make_bundle
    from cspine.cls.config import resolve_train_config
    from cspine.cls.evaluate import EvaluateConfig, evaluate
    from cspine.cls.train import train_cls
    from cspine.data.cache import PrepareConfig, prepare_dataset
    from cspine.predict import PredictConfig, predict_study
    from cspine.seg.pseudo import PseudoLabelConfig, pseudo_label
    from cspine.submit import SubmitConfig, submit
    from cspine.synth import SynthConfig, generate_dataset

    out = cfg.out
    data, cache, work = out / "data", out / "cache", out / "work"
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    _stage(
        "synth",
        timings,
        lambda: generate_dataset(
            SynthConfig(
                out=data,
                studies=cfg.train_studies,
                seed=cfg.seed,
                size="small",
                segmented=cfg.segmented,
                test_studies=cfg.test_studies,
                workers=cfg.workers,
            ),
            progress=progress,
        ),
    )
    _stage(
        "prepare",
        timings,
        lambda: prepare_dataset(PrepareConfig(data=data, out=cache, workers=cfg.workers), progress=progress),
    )
    seg_model = _segmenter(cfg)
    pseudo = PseudoLabelConfig(
        data=cache, model=seg_model, out=work / "pseudo", all_studies=True, device=cfg.device, workers=cfg.workers
    )
    seg_summary = _stage("segment", timings, lambda: pseudo_label(pseudo, progress=progress))
    cls_cfg = resolve_train_config("sequence", cache, work / "cls", _cls_overrides(cfg, work))
    cls_summary = _stage("train-cls", timings, lambda: train_cls(cls_cfg, progress=progress))
    bundle = _stage(
        "bundle",
        timings,
        lambda: make_bundle(
            seg_model,
            work / "cls",
            out / "model",
            metrics={
                "segmentation": {"model": str(seg_model), "heldout": _heldout_dice(seg_model)},
                "classification_oof": {
                    k: cls_summary.get(k) for k in ("competition_loss", "mean_vertebra_auc", "paths")
                },
            },
        ),
    )
    sub = _stage(
        "submit",
        timings,
        lambda: submit(
            SubmitConfig(data=data, model=bundle, out=out / "submission.csv", device=cfg.device), progress=progress
        ),
    )
    labels = _write_test_labels(data, work / "test_labels.csv")
    metrics = _stage(
        "evaluate",
        timings,
        lambda: evaluate(
            EvaluateConfig(
                pred=out / "submission.csv", labels=labels, out=out / "evaluation", train_labels=data / "train.csv"
            )
        ),
    )
    first_test = sorted(p for p in (data / "test_images").iterdir() if p.is_dir())[0]
    result = _stage(
        "predict",
        timings,
        lambda: predict_study(PredictConfig(study=first_test, model=bundle, out=out / "predict", device=cfg.device)),
    )
    timings["total"] = time.perf_counter() - t0
    summary = {
        "out": str(out),
        "model": str(bundle),
        "submission": sub["submission"],
        "evaluation": str(out / "evaluation" / "report.md"),
        "predict": str(out / "predict"),
        "test_studies": sub["studies"],
        "test_competition_loss": metrics["competition_loss"],
        "test_prevalence_baseline_loss": metrics["baselines"]["rsna_prevalence"],
        "test_train_prevalence_loss": metrics["baselines"]["train_prevalence"],
        "test_mean_vertebra_auc": metrics.get("mean_vertebra_auc"),
        "test_patient_auc": metrics.get("patient_auc"),
        "cv_competition_loss": cls_summary.get("competition_loss"),
        "cv_paths": cls_summary.get("paths"),
        "segmenter": str(seg_model),
        "segmented_studies": seg_summary.get("studies"),
        "predicted_study": result["StudyInstanceUID"],
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    write_json(out / "demo.json", run_record(None, asdict(cfg), timings, summary=summary))
    return summary


def format_summary(s: dict[str, Any]) -> str:
    """What the demo prints at the end: where everything is and the metric table."""
    from cspine.cls.oof import paths_line

    auc = s.get("test_mean_vertebra_auc")
    pauc = s.get("test_patient_auc")
    lines = [
        "",
        f"cspine demo finished in {s['timings_s']['total']:.0f} s",
        "",
        f"  model bundle   {s['model']}   (cspine predict STUDY --model {s['model']} --out DIR)",
        f"  submission     {s['submission']}",
        f"  evaluation     {s['evaluation']}",
        f"  one study      {s['predict']}/report.html",
        "",
        f"  held-out generated test studies: {s['test_studies']}",
        f"  {'metric':<40}{'value':>10}",
        f"  {'competition log loss (cspine)':<40}{s['test_competition_loss']:>10.4f}",
        f"  {'competition log loss (RSNA prevalence)':<40}{s['test_prevalence_baseline_loss']:>10.4f}",
        f"  {'competition log loss (train prevalence)':<40}{s['test_train_prevalence_loss']:>10.4f}",
        f"  {'mean vertebra AUC':<40}{'n/a' if auc is None else f'{auc:.3f}':>10}",
        f"  {'patient_overall AUC':<40}{'n/a' if pauc is None else f'{pauc:.3f}':>10}",
        f"  {'classifier CV log loss (train studies)':<40}{s['cv_competition_loss'] or float('nan'):>10.4f}",
        *([f"  classifier CV mean vertebra AUC by path: {paths_line(s['cv_paths'])}"] if s.get("cv_paths") else []),
        "",
        "  stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in s["timings_s"].items() if k != "total"),
    ]
    return "\n".join(lines)
