"""The ``cspine`` command: subcommands parse and validate, then call one library function.

Heavy imports (torch, monai, pydicom) happen inside the subcommand that needs them so
``cspine --help`` answers at once. Bad input of any kind ends with one line on stderr
and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cspine import __version__
from cspine.errors import UsageError

log = logging.getLogger("cspine")

#: Exit code for bad input (missing path, unreadable DICOM, broken model directory ...).
EXIT_BAD_INPUT = 2


def _existing(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such file or folder")
    return p


# ----------------------------------------------------------------------------------------------------------------------
# Subcommands: each takes the parsed arguments and returns an exit code.
# ----------------------------------------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    """Print the geometry and encoding of a study."""
    from cspine.io import load_study

    vol = load_study(_existing(args.study), series_uid=args.series_uid)
    hu = vol.array
    print(
        json.dumps(
            {
                "shape_zyx": vol.shape,
                "spacing_zyx_mm": [round(s, 4) for s in vol.spacing],
                "affine_zyx_to_lps": [[round(float(v), 4) for v in row] for row in vol.affine],
                "instance_numbers_first_last": [int(vol.instance_numbers[0]), int(vol.instance_numbers[-1])],
                "hu_min_max": [int(hu.min()), int(hu.max())],
                **vol.meta,
            },
            indent=2,
        )
    )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Axial/coronal/sagittal view with the mask overlaid."""
    from cspine.io import load_segmentation, load_study
    from cspine.plots import show_spine

    vol = load_study(_existing(args.study), series_uid=args.series_uid)
    mask = load_segmentation(_existing(args.seg), vol) if args.seg else None
    out = show_spine(vol, mask, args.out)
    print(out)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    """Generate a synthetic RSNA-layout dataset."""
    from cspine.data.synth import SynthConfig, generate_dataset

    if args.studies < 1:
        raise UsageError("--studies must be at least 1")
    if not 0.0 <= args.segmented <= 1.0:
        raise UsageError("--segmented must be a fraction between 0 and 1")
    cfg = SynthConfig(
        out=Path(args.out),
        studies=args.studies,
        seed=args.seed,
        size=args.size,
        segmented=args.segmented,
        test_studies=args.test_studies,
        workers=args.workers,
    )
    summary = generate_dataset(cfg, progress=not args.no_progress)
    print(json.dumps(summary if isinstance(summary, dict) else getattr(summary, "__dict__", str(summary)), default=str))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Cache every study of an RSNA-layout dataset as a compact volume (+ mask)."""
    from cspine.data.cache import PrepareConfig, prepare_dataset

    shard = _parse_shard(args.shard)
    cfg = PrepareConfig(data=_existing(args.data), out=Path(args.out), workers=args.workers, shard=shard)
    report = prepare_dataset(cfg, progress=not args.no_progress)
    print(json.dumps(report, indent=2))
    return 1 if report["failed"] else 0


def cmd_predict(args: argparse.Namespace) -> int:
    """One study -> probabilities, mask, report."""
    from cspine.predict import PredictConfig, format_table, predict_study

    if not 0.0 < args.threshold < 1.0:
        raise UsageError("--threshold must be between 0 and 1")
    cfg = PredictConfig(
        study=_existing(args.study),
        model=_existing(args.model),
        out=Path(args.out),
        device=args.device,
        threshold=args.threshold,
        series_uid=args.series_uid,
        report=not args.no_report,
        dicom=args.dicom,
    )
    if cfg.dicom:
        from cspine.dicom_out import require_dicom

        require_dicom(cfg.study)
    result = predict_study(cfg)
    print(format_table(result))
    for w in result["warnings"]:
        print(f"warning: {w}")
    print(f"outputs in {cfg.out} (result.json, mask.nii.gz{', report.png, report.html' if cfg.report else ''}"
          f"{', dicom/' if cfg.dicom else ''})")
    return 0


def cmd_dicom_out(args: argparse.Namespace) -> int:
    """An existing result folder + its DICOM study -> RESULT_DIR/dicom/ (SEG, SR, key objects)."""
    from cspine.dicom_out import dicom_out

    written = dicom_out(_existing(args.result_dir), _existing(args.study), Path(args.out) if args.out else None,
                        series_uid=args.series_uid)
    print(json.dumps(written, indent=2))
    return 0


def cmd_pacs(args: argparse.Namespace) -> int:
    """Studies from a DICOMweb PACS -> predictions -> SEG + SR stored back."""
    from cspine.pacs import PacsConfig, run_pacs

    query: dict[str, str] = {}
    for item in args.query or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--query must look like KEY=VALUE (e.g. ModalitiesInStudy=CT), got {item!r}")
        query[key] = value
    if not 0.0 < args.threshold < 1.0:
        raise UsageError("--threshold must be between 0 and 1")
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    if not args.url.startswith(("http://", "https://")):
        raise UsageError(f"--url must be a DICOMweb root such as http://127.0.0.1:8042/dicom-web, got {args.url!r}")
    cfg = PacsConfig(url=args.url, model=_existing(args.model), out=Path(args.out), studies=tuple(args.study or ()),
                     query=query, store=not args.no_store, device=args.device, threshold=args.threshold,
                     limit=args.limit)
    summary = run_pacs(cfg, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 1 if summary["failed"] else 0


def cmd_submit(args: argparse.Namespace) -> int:
    """test.csv + test_images/ -> submission.csv."""
    from cspine.submit import SubmitConfig, submit

    cfg = SubmitConfig(data=_existing(args.data), model=_existing(args.model), out=Path(args.out), device=args.device)
    summary = submit(cfg, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole pipeline on generated data."""
    from cspine.demo import DemoConfig, format_summary, run_demo

    cfg = DemoConfig(out=Path(args.out), seed=args.seed, device=args.device)
    print(format_summary(run_demo(cfg, progress=not args.no_progress)))
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    """Assemble a model bundle from a segmentation and a classification model directory."""
    from cspine.bundle import make_bundle

    out = make_bundle(_existing(args.seg), _existing(args.cls), Path(args.out))
    print(out)
    return 0


def _add_masks_first(p: argparse.ArgumentParser) -> None:
    p.add_argument("--masks-first", action="store_true",
                   help="use the --masks folder's mask even where the cache has a ground-truth one (train on the "
                        "segmenter's masks, as predict will see them)")


def _add_stats_region(p: argparse.ArgumentParser, default: str | None) -> None:
    from cspine.cls.config import STATS_REGIONS  # torch-free

    p.add_argument("--stats-region", choices=STATS_REGIONS, default=default,
                   help="count the lucency statistics inside the vertebra's mask (ground truth, good segmenter) or "
                        "in the bone the image shows, labelled by the nearest masked vertebra (coarse masks)")


def cmd_crops(args: argparse.Namespace) -> int:
    """Per-vertebra 2.5D crops of a prepared cache (cached; optional PNG grids to look at)."""
    from cspine.cls.config import CropConfig
    from cspine.cls.crops import CropsConfig, build_crops

    crop = CropConfig(slices=args.slices, size=args.size, margin=args.margin, context=args.context,
                      context_stride=args.context_stride, window=args.window, stats_region=args.stats_region)
    cfg = CropsConfig(data=_existing(args.data), out=Path(args.out) if args.out else None, crop=crop,
                      masks=_existing(args.masks) if args.masks else None, masks_first=args.masks_first,
                      split=args.split, limit=args.limit,
                      workers=args.workers, png=args.png)
    studies = build_crops(cfg, progress=not args.no_progress)
    index = json.loads((cfg.folder / "index.json").read_text())
    print(json.dumps({"folder": str(cfg.folder), "studies": len(studies), "built": index["built"],
                      "cached": index["cached"], "skipped": index["skipped"]}, indent=2))
    return 0


def cmd_train_cls(args: argparse.Namespace) -> int:
    """Train a fracture classifier recipe with study-grouped CV (or a hold-out split)."""
    from cspine.cls.config import resolve_train_config
    from cspine.cls.train import train_cls

    top = {k: getattr(args, k) for k in ("split", "folds", "fold", "holdout", "epochs", "batch_size", "lr",
                                          "patience", "seed", "device", "workers", "threads", "limit")}
    crop = {"slices": args.slices, "size": args.size, "context": args.context, "context_stride": args.context_stride,
            "margin": args.margin, "stats_region": args.stats_region}
    model = {"encoder": args.encoder, "width": args.width, "hidden": args.hidden, "pretrained": args.pretrained,
             "patient_from": args.patient_from, "stem_stride": args.stem_stride, "aux_weight": args.aux_weight,
             "density_bins": args.density_bins, "feature_weight": args.feature_weight, "feature_l2": args.feature_l2,
             "feature_fit": args.feature_fit, "feature_c": args.feature_c,
             "lucency": False if args.no_lucency else None}
    overrides: dict[str, object] = {k: v for k, v in top.items() if v is not None}
    overrides["crop"] = {k: v for k, v in crop.items() if v is not None}
    overrides["model"] = {k: v for k, v in model.items() if v is not None}
    if args.crops:
        overrides["crops_dir"] = args.crops
    if args.masks:
        overrides["masks"] = str(_existing(args.masks))
        overrides["masks_first"] = args.masks_first
    if args.no_augment:
        overrides["augment"] = False
    if args.pretrained:
        _existing(args.pretrained)
    cfg = resolve_train_config(args.recipe, _existing(args.data), Path(args.out), overrides)
    summary = train_cls(cfg, progress=not args.no_progress)
    if not summary:  # under torchrun the other ranks return nothing: rank 0 prints
        return 0
    keys = ("status", "recipe", "split", "studies", "competition_loss", "competition_loss_uncalibrated",
            "mean_vertebra_auc", "patient_auc", "speed", "folds_done")
    print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2, default=str))
    print(f"model directory: {cfg.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score predictions against labels: metrics.json, report.md and PNGs."""
    from cspine.cls.evaluate import EvaluateConfig, evaluate

    if not 0.0 < args.sensitivity < 1.0:
        raise UsageError("--sensitivity must be between 0 and 1")
    cfg = EvaluateConfig(pred=_existing(args.pred), labels=_existing(args.labels), out=Path(args.out),
                         history=_existing(args.history) if args.history else None, sensitivity=args.sensitivity,
                         train_labels=_existing(args.train_labels) if args.train_labels else None)
    m = evaluate(cfg)
    auc = m["mean_vertebra_auc"]
    print(f"{m['n_studies']} studies: competition log loss {m['competition_loss']:.4f}, mean vertebra AUC "
          f"{'n/a' if auc is None else f'{auc:.3f}'}; report in {cfg.out / 'report.md'}")
    return 0


def cmd_train_seg(args: argparse.Namespace) -> int:
    """Train the vertebra segmenter (rerun the same command to resume)."""
    from cspine.seg.train import train_config, train_segmentation

    names = ("stage", "arch", "split", "fold", "folds", "epochs", "iters_per_epoch", "batch_size", "lr", "patience",
             "seed", "device", "threads", "max_studies")
    overrides = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.patch:
        overrides["patch"] = tuple(args.patch)
    if args.spacing:
        overrides["preprocess"] = {"spacing": (args.spacing,) * 3}
    cfg = train_config(data=_existing(args.data), out=Path(args.out), **overrides)
    summary = train_segmentation(cfg, resume=not args.fresh, progress=not args.no_progress)
    if summary.pop("is_main"):  # under torchrun only rank 0 prints
        print(json.dumps({k: v for k, v in summary.items() if not k.endswith("_studies")}, indent=2))
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    """One study -> vertebra mask NIfTI on its own grid + JSON report."""
    from cspine.seg.infer import InferConfig, segment_study

    cfg = InferConfig(device=args.device, threads=args.threads)
    res = segment_study(_existing(args.study), _existing(args.model), Path(args.out), args.report, cfg)
    report = res.to_json()
    if args.report:  # details are in the file; print the gist
        report = {"report": args.report, "found": report["found"], "warnings": report["warnings"]}
    print(json.dumps({"mask": args.out, **report}, indent=2))
    return 0


def cmd_pseudo_label(args: argparse.Namespace) -> int:
    """Masks + quality records for every study without a mask (resumable)."""
    from cspine.seg.pseudo import PseudoLabelConfig, pseudo_label

    cfg = PseudoLabelConfig(data=_existing(args.data), model=_existing(args.model), out=Path(args.out),
                            split=args.split, all_studies=args.all, device=args.device)
    print(json.dumps(pseudo_label(cfg, progress=not args.no_progress), indent=2))
    return 0


def cmd_eval_seg(args: argparse.Namespace) -> int:
    """Per-vertebra Dice and identification rate: a model on a dataset, or mask files against references."""
    from cspine.seg.evaluate import evaluate_files, evaluate_model, markdown_table

    if bool(args.model) == bool(args.pred):
        raise UsageError("give either --model with --data, or --pred with --truth")
    if args.model:
        if not args.data:
            raise UsageError("--model needs --data (prepared cache or RSNA folder with masks)")
        uids = None
        if args.fold is not None:
            from cspine.seg.data import discover_studies, fold_of

            refs = [r.uid for r in discover_studies(_existing(args.data), args.split) if r.has_mask]
            folds = fold_of(refs, args.folds, args.seed)
            uids = [u for u in refs if folds[u] == args.fold]
        summary = evaluate_model(_existing(args.model), _existing(args.data), Path(args.out), args.split, uids,
                                 args.device, progress=not args.no_progress)
    else:
        if not args.truth:
            raise UsageError("--pred needs --truth")
        summary = evaluate_files(_existing(args.pred), _existing(args.truth), Path(args.out), args.pred_labels,
                                 args.truth_labels)
    print(markdown_table(summary), end="")
    print(f"written: {Path(args.out) / 'eval.json'}, {Path(args.out) / 'eval.md'}")
    return 0


def _parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return (0, 1)
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError as exc:
        raise UsageError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from exc
    if not (n >= 1 and 0 <= i < n):
        raise UsageError(f"--shard {text!r}: need 0 <= i < n")
    return (i, n)


# ----------------------------------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------------------------------


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")


def build_parser() -> argparse.ArgumentParser:
    """The whole command-line interface, for ``main`` and for documentation."""
    parser = argparse.ArgumentParser(
        prog="cspine",
        description="Cervical spine (C1-C7) fracture detection on CT.",
    )
    parser.add_argument("--version", action="version", version=f"cspine {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="the whole pipeline on generated data (a few minutes on a laptop CPU)")
    p.add_argument("--out", default="cspine-demo", help="where data, models and outputs go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    _add_progress(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("info", help="geometry and encoding of a study (DICOM folder, .zip or file, or NIfTI)")
    p.add_argument("study", help="DICOM folder, .zip or file, or a NIfTI CT (.nii / .nii.gz)")
    p.add_argument("--series-uid", default=None, help="pick this SeriesInstanceUID (default: the largest series)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("show", help="axial/coronal/sagittal views with the vertebra mask overlaid (PNG)")
    p.add_argument("study", help="DICOM folder, .zip or file, or a NIfTI CT (.nii / .nii.gz)")
    p.add_argument("--seg", default=None, help="NIfTI label mask (RSNA segmentations/*.nii or cspine output)")
    p.add_argument("--out", default="view.png")
    p.add_argument("--series-uid", default=None)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("synth", help="generate a synthetic RSNA-layout dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--studies", type=int, default=20, help="training studies")
    p.add_argument("--test-studies", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=("small", "full"), default="small")
    p.add_argument("--segmented", type=float, default=0.5, help="fraction of training studies with a mask")
    p.add_argument("--workers", type=int, default=1)
    _add_progress(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prepare", help="cache every study of an RSNA-layout dataset for training")
    p.add_argument("--data", required=True, help="RSNA-layout folder (train_images/, segmentations/ ...)")
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--workers", type=int, default=1, help="studies prepared in parallel")
    p.add_argument("--shard", default=None, help="i/n: prepare only every n-th study starting at i")
    _add_progress(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("predict", help="one CT study -> fracture probabilities, vertebra masks and a report")
    p.add_argument("study", help="DICOM folder, .zip or file, or a NIfTI CT (.nii / .nii.gz)")
    p.add_argument("--model", required=True, help="model bundle directory")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threshold", type=float, default=0.5, help="probability marked as positive in the report")
    p.add_argument("--series-uid", default=None)
    p.add_argument("--no-report", action="store_true", help="skip report.png / report.html")
    p.add_argument("--dicom", action="store_true",
                   help="also OUT/dicom/: DICOM SEG of C1-C7, Comprehensive 3D SR, key-object selection")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("dicom-out", help="an existing result folder -> DICOM SEG + SR + key objects")
    p.add_argument("result_dir", help="a cspine predict output folder (result.json, mask.nii.gz)")
    p.add_argument("--study", required=True, help="the DICOM folder / .zip / file the result was made from")
    p.add_argument("--out", default=None, help="output folder (default RESULT_DIR/dicom)")
    p.add_argument("--series-uid", default=None, help="the series predicted (default: the one in result.json)")
    p.set_defaults(func=cmd_dicom_out)

    p = sub.add_parser("pacs", help="studies from a DICOMweb PACS -> predict -> SEG + SR stored back (STOW-RS)")
    p.add_argument("--url", required=True, help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    p.add_argument("--model", required=True, help="model bundle directory")
    p.add_argument("--out", required=True, help="folder of result folders (one per study) and the journal")
    p.add_argument("--study", action="append", metavar="UID", help="StudyInstanceUID (repeatable)")
    p.add_argument("--query", action="append", metavar="KEY=VALUE",
                   help="batch: every study matching these QIDO-RS filters (repeatable), e.g. ModalitiesInStudy=CT")
    p.add_argument("--limit", type=int, default=None, help="batch: at most this many studies")
    p.add_argument("--no-store", action="store_true", help="predict only; store nothing back")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threshold", type=float, default=0.5, help="probability flagged as positive")
    _add_progress(p)
    p.set_defaults(func=cmd_pacs)

    p = sub.add_parser("submit", help="RSNA test set -> Kaggle submission.csv (resumable)")
    p.add_argument("--data", required=True, help="RSNA-layout folder with test.csv and test_images/")
    p.add_argument("--model", required=True, help="model bundle directory")
    p.add_argument("--out", default="submission.csv")
    p.add_argument("--device", default="auto")
    _add_progress(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("bundle", help="assemble a model bundle from seg and cls model directories")
    p.add_argument("--seg", required=True, help="segmentation model directory (cspine train-seg --out)")
    p.add_argument("--cls", required=True, help="classification model directory (cspine train-cls --out)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_bundle)
    from cspine.cls.config import ENCODERS, FEATURE_FITS, PATIENT_SOURCES, RECIPES, SPLITS  # torch-free names

    p = sub.add_parser("crops", help="per-vertebra 2.5D crops of a prepared cache (+ PNG grids with --png)")
    p.add_argument("--data", required=True, help="prepared cache folder (cspine prepare --out)")
    p.add_argument("--out", default=None, help="crop cache root (default: DATA/crops)")
    p.add_argument("--masks", default=None, help="folder of predicted masks <uid>.nii[.gz] (default: cache masks)")
    _add_masks_first(p)
    p.add_argument("--split", choices=("train", "test"), default="train")
    p.add_argument("--slices", type=int, default=10, help="K slices per vertebra")
    p.add_argument("--size", type=int, default=48, help="S: crop side in pixels")
    p.add_argument("--margin", type=float, default=0.1, help="margin around the vertebra box (fraction)")
    p.add_argument("--context", type=int, default=1, help="neighbouring slices on each side as channels")
    p.add_argument("--context-stride", type=int, default=1, help="slice step between those neighbours")
    p.add_argument("--window", default="bone")
    _add_stats_region(p, "mask")
    p.add_argument("--limit", type=int, default=0, help="at most this many studies (0 = all)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--png", action="store_true", help="write a PNG grid per study (fracture boxes in red)")
    _add_progress(p)
    p.set_defaults(func=cmd_crops)

    p = sub.add_parser("train-cls", help="train the fracture classifier (study-grouped CV, OOF, calibration)")
    p.add_argument("--data", required=True, help="prepared cache folder with masks (cspine prepare --out)")
    p.add_argument("--out", required=True, help="model directory (rerun the same command to resume)")
    p.add_argument("--recipe", choices=tuple(RECIPES), default="sequence")
    p.add_argument("--split", choices=SPLITS, default=None,
                   help="folds (CV), study (hold-out) or image (the seed's leaky split); default per recipe")
    p.add_argument("--folds", type=int, default=None)
    p.add_argument("--fold", type=int, default=None, help="train only this fold (parallel runs)")
    p.add_argument("--holdout", type=float, default=None, help="held-out fraction for split study/image")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--patience", type=int, default=None, help="early stopping patience (epochs)")
    p.add_argument("--slices", type=int, default=None, help="K slices per vertebra")
    p.add_argument("--size", type=int, default=None, help="S: crop side in pixels")
    p.add_argument("--context", type=int, default=None, help="neighbouring slices on each side as channels")
    p.add_argument("--context-stride", type=int, default=None, help="slice step between those neighbours")
    p.add_argument("--margin", type=float, default=None, help="margin around the vertebra box (fraction)")
    _add_stats_region(p, None)
    p.add_argument("--encoder", choices=ENCODERS, default=None)
    p.add_argument("--width", type=float, default=None, help="ResNet width multiplier")
    p.add_argument("--hidden", type=int, default=None, help="GRU hidden size")
    p.add_argument("--stem-stride", type=int, choices=(1, 2), default=None,
                   help="first convolution stride (sequence default 1: full resolution; 2 is 4x cheaper on CPU)")
    p.add_argument("--aux-weight", type=float, default=None, help="weight of the per-slice box loss")
    p.add_argument("--patient-from", choices=PATIENT_SOURCES, default=None)
    p.add_argument("--density-bins", type=int, default=None,
                   help="bins of the density histogram inside the vertebra mask fed to the sequence model (0 = off)")
    p.add_argument("--no-lucency", action="store_true",
                   help="leave out the per-vertebra lucency statistics (dark voxels inside the mask, height)")
    p.add_argument("--feature-fit", choices=FEATURE_FITS, default=None,
                   help="linear feature path: 'logistic' (the lucency statistics through a logistic regression "
                   "fitted on the training fold, frozen; default) or 'joint' (trained with the network)")
    p.add_argument("--feature-c", type=float, default=None, help="inverse L2 strength of the logistic fit")
    p.add_argument("--feature-weight", type=float, default=None,
                   help="weight of the linear feature path's own loss (deep supervision; 0 = off)")
    p.add_argument("--feature-l2", type=float, default=None,
                   help="L2 penalty on the linear feature path's weights (as in a logistic regression)")
    p.add_argument("--pretrained", default=None, help="local file with ImageNet encoder weights (never downloaded)")
    p.add_argument("--crops", default=None, help="crop cache root (default: DATA/crops)")
    p.add_argument("--masks", default=None,
                   help="folder of predicted masks <uid>.nii[.gz] for studies the cache has no mask for")
    _add_masks_first(p)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (DDP under torchrun)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (0 = torch default)")
    p.add_argument("--limit", type=int, default=None, help="at most this many studies (quick runs)")
    _add_progress(p)
    p.set_defaults(func=cmd_train_cls)

    p = sub.add_parser("evaluate", help="score predictions against labels: metrics.json, report.md, PNGs")
    p.add_argument("--pred", required=True, help="Kaggle submission (row_id,fractured) or wide CSV")
    p.add_argument("--labels", required=True, help="train.csv-style labels")
    p.add_argument("--out", required=True)
    p.add_argument("--history", default=None, help="training history.json for loss/accuracy curves")
    p.add_argument("--sensitivity", type=float, default=0.9, help="target sensitivity of the operating point")
    p.add_argument("--train-labels", default=None,
                   help="the labels the model was trained on: adds their per-column prevalence as a baseline")
    p.set_defaults(func=cmd_evaluate)
    from cspine.seg.config import LABEL_CONVENTION_NAMES  # torch-free registries
    from cspine.seg.models import DEFAULT_MODEL, MODEL_NAMES

    p = sub.add_parser("train-seg", help="train the C1-C7 segmenter (3D U-Net; resumable; DDP under torchrun)")
    p.add_argument("--data", required=True, help="prepared cache (cspine prepare --out) or RSNA-layout folder")
    p.add_argument("--out", required=True, help="model directory (rerun the same command to resume)")
    p.add_argument("--arch", choices=MODEL_NAMES, default=None, help=f"network (default {DEFAULT_MODEL})")
    p.add_argument("--stage", choices=("coarse", "refine"), default=None,
                   help="coarse (default): C1-C7 + other; refine: vertebra vs background on a finer grid, "
                        "trained into COARSE_MODEL_DIR/refine")
    p.add_argument("--split", default=None, help="split holding the masks (default train)")
    p.add_argument("--fold", type=int, default=None, help="validation fold, grouped by study; -1 = train on all")
    p.add_argument("--folds", type=int, default=None, help="number of folds (default 5)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--iters-per-epoch", type=int, default=None, help="optimiser steps per epoch and process")
    p.add_argument("--batch-size", type=int, default=None, help="patches per step and process")
    p.add_argument("--patch", type=int, nargs=3, metavar=("Z", "Y", "X"), default=None, help="patch in voxels")
    p.add_argument("--spacing", type=float, default=None,
                   help="isotropic model spacing in mm (default 2.0; refine stage 1.25)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--patience", type=int, default=None, help="early stopping patience in epochs (0 = off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-studies", type=int, default=None, help="use at most this many studies (smoke runs)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming from OUT/last.pt")
    _add_progress(p)
    p.set_defaults(func=cmd_train_seg)

    p = sub.add_parser("segment", help="one study -> C1-C7 mask NIfTI on its own grid + per-vertebra report")
    p.add_argument("study", help="DICOM folder / .zip / file, NIfTI volume, or prepared study folder")
    p.add_argument("--model", required=True, help="segmentation model directory (or a bundle with seg/)")
    p.add_argument("--out", required=True, help="mask file (.nii.gz)")
    p.add_argument("--report", default=None, help="JSON report file (default: printed)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("pseudo-label", help="masks + quality records for studies without masks (resumable)")
    p.add_argument("--data", required=True, help="prepared cache or RSNA-layout folder")
    p.add_argument("--model", required=True, help="segmentation model directory (or a bundle with seg/)")
    p.add_argument("--out", required=True, help="folder for <uid>.nii.gz, <uid>.json, quality.csv")
    p.add_argument("--split", default="train")
    p.add_argument("--all", action="store_true", help="also studies that already have a mask")
    p.add_argument("--device", default="auto")
    _add_progress(p)
    p.set_defaults(func=cmd_pseudo_label)

    p = sub.add_parser("eval-seg", help="per-vertebra Dice + identification rate (JSON + markdown table)")
    p.add_argument("--model", default=None, help="segment the studies of --data with this model and score them")
    p.add_argument("--data", default=None, help="prepared cache or RSNA folder with masks (with --model)")
    p.add_argument("--split", default="train")
    p.add_argument("--fold", type=int, default=None, help="score only this validation fold (as in train-seg)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="fold seed (as in train-seg)")
    p.add_argument("--pred", default=None, help="mask file or folder to score (instead of --model)")
    p.add_argument("--truth", default=None, help="reference mask file, folder or prepared cache (with --pred)")
    p.add_argument("--pred-labels", choices=LABEL_CONVENTION_NAMES, default="project")
    p.add_argument("--truth-labels", choices=LABEL_CONVENTION_NAMES, default="project")
    p.add_argument("--out", required=True, help="folder for eval.json and eval.md")
    p.add_argument("--device", default="auto")
    _add_progress(p)
    p.set_defaults(func=cmd_eval_seg)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cspine`` console script."""
    # Before torch loads OpenMP: idle threads sleep instead of spinning. On a shared or busy machine spinning
    # threads wait for a core another job holds; the segmenter's many small windows took 8.2 s instead of 2.4 s.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    # Our own messages at INFO; third-party libraries (openjpeg logs every tile) only from WARNING up.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("cspine").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        code = func(args)
    except KeyboardInterrupt:
        print("cspine: interrupted", file=sys.stderr)
        code = 130
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        # DicomError, UsageError, config errors: the message already names the file and the problem.
        if args.verbose:
            log.exception("failed")
        print(f"cspine {args.command}: error: {exc}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    if argv is None:  # the process's own entry point (console script, python -m): a torchrun worker ends here
        from cspine.runtime import exit_worker

        return exit_worker(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
