"""The ``cspine`` subcommands: each takes the parsed arguments, calls one library function and returns an exit code.

Heavy imports (torch, monai, pydicom) happen inside the subcommand that needs them, so importing this module (as
the parser does) stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cspine.cli.args import _existing, _output_file, _output_folder, _parse_shard
from cspine.errors import UsageError


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

    out = _output_file(args.out)
    vol = load_study(_existing(args.study), series_uid=args.series_uid)
    mask = load_segmentation(_existing(args.seg), vol) if args.seg else None
    out = show_spine(vol, mask, out)
    print(out)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    """Generate a synthetic RSNA-layout dataset."""
    from cspine.synth import SynthConfig, generate_dataset

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
        profile=args.profile,
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
        out=_output_folder(args.out),
        device=args.device,
        threshold=args.threshold,
        series_uid=args.series_uid,
        report=not args.no_report,
        hu_offset=args.hu_offset,
        assume_cervical=args.assume_cervical,
        mask=_existing(args.mask) if args.mask else None,
        mask_labels=args.labels,
        dicom=args.dicom,
    )
    if cfg.dicom:
        from cspine.dicom_out import require_dicom

        require_dicom(cfg.study)
    result = predict_study(cfg)
    print(format_table(result))
    if result["cervical_spine"] == "present":
        for w in result["warnings"]:
            print(f"warning: {w}")
    print(f"outputs in {cfg.out} (result.json, mask.nii.gz{', report.png, report.html' if cfg.report else ''}"
          f"{', dicom/' if result.get('dicom') else ''})")
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

    cfg = SubmitConfig(data=_existing(args.data), model=_existing(args.model), out=_output_file(args.out),
                       device=args.device, retry_failed=not args.no_retry_failed)
    summary = submit(cfg, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole pipeline on generated data."""
    from cspine.demo import DemoConfig, format_summary, run_demo

    cfg = DemoConfig(out=Path(args.out), seed=args.seed, device=args.device, shipped_network=args.shipped_network)
    print(format_summary(run_demo(cfg, progress=not args.no_progress)))
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    """Assemble a model bundle from a segmentation and a classification model directory."""
    from cspine.bundle import make_bundle

    out = make_bundle(_existing(args.seg), _existing(args.cls), Path(args.out))
    print(out)
    return 0


def cmd_crops(args: argparse.Namespace) -> int:
    """Per-vertebra 2.5D crops of a prepared cache (cached; optional PNG grids to look at)."""
    from cspine.cls.config import CropConfig
    from cspine.cls.crop_cache import CropsConfig, build_crops
    from cspine.engine.cli_flags import config_overrides
    from cspine.engine.config import from_dict

    crop = from_dict(CropConfig, config_overrides(args, "crop"))
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
    from cspine.engine.cli_flags import config_overrides

    overrides: dict[str, object] = config_overrides(args, "train")
    overrides["crop"] = config_overrides(args, "crop")
    overrides["model"] = config_overrides(args, "model")
    if "masks" in overrides:
        overrides["masks"] = str(_existing(str(overrides["masks"])))
    if "pretrained" in overrides["model"]:
        _existing(str(overrides["model"]["pretrained"]))
    if overrides.get("init") == "shipped":  # the fracture network in the package (cspine.cls.shipped)
        from cspine.cls.shipped import shipped_classifier

        shipped = shipped_classifier()
        if shipped is None:
            raise UsageError("--init shipped: this installation has no shipped classifier (cspine/weights/classifier)")
        overrides["init"] = str(shipped)
    elif "init" in overrides:
        overrides["init"] = str(_existing(str(overrides["init"])))
    cfg = resolve_train_config(args.recipe, _existing(args.data), Path(args.out), overrides)
    summary = train_cls(cfg, progress=not args.no_progress)
    if not summary:  # under torchrun the other ranks return nothing: rank 0 prints
        return 0
    keys = ("status", "recipe", "split", "studies", "competition_loss", "competition_loss_uncalibrated",
            "mean_vertebra_auc", "patient_auc", "speed", "folds_done")
    print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2, default=str))
    if summary.get("paths"):
        from cspine.cls.oof import paths_line

        print(f"out of fold, mean vertebra AUC by path: {paths_line(summary['paths'])}")
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
    from cspine.engine.cli_flags import config_overrides
    from cspine.seg.train import train_config, train_segmentation

    overrides = config_overrides(args, "train")
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
    from cspine.seg.shipped import shipped_model

    cfg = InferConfig(device=args.device, threads=args.threads)
    model = _existing(args.model) if args.model else shipped_model() if args.engine == "cspine" else None
    if args.engine == "cspine" and model is None:
        raise UsageError("this installation has no shipped segmenter: give --model (a segmentation model or bundle "
                         "directory), or build one with cspine build-segmenter --out DIR --install")
    study = _existing(args.study)
    out = _output_file(args.out, (".nii.gz", ".nii"))
    if args.report:
        _output_file(args.report, (".json",))
    res = segment_study(study, model, out, args.report, cfg, engine=args.engine)
    report = res.to_json()
    if args.report:  # details are in the file; print the gist
        report = {"report": args.report, "found": report["found"], "warnings": report["warnings"]}
    print(json.dumps({"mask": args.out, **report}, indent=2))
    return 0


def cmd_build_segmenter(args: argparse.Namespace) -> int:
    """Rebuild the shipped segmenter from generated data (resumable); --install puts it into the package."""
    from cspine.seg.shipped import SHIPPED_DIR, build, heldout_dice

    record = build(Path(args.out), install_into=SHIPPED_DIR if args.install else None)
    print(json.dumps({"model": str(Path(args.out) / "model"), "seconds": record["seconds"],
                      "heldout": heldout_dice(record),
                      "installed": str(SHIPPED_DIR) if args.install else None}, indent=2))
    return 0


def cmd_pseudo_label(args: argparse.Namespace) -> int:
    """Masks + quality records for every study without a mask (resumable)."""
    from cspine.seg.pseudo import PseudoLabelConfig, pseudo_label

    cfg = PseudoLabelConfig(data=_existing(args.data), model=_existing(args.model), out=Path(args.out),
                            split=args.split, all_studies=args.all, device=args.device, workers=args.workers)
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
            from cspine.data.splits import fold_members
            from cspine.seg.data import discover_studies

            refs = [r.uid for r in discover_studies(_existing(args.data), args.split) if r.has_mask]
            folds = fold_members(_existing(args.data), args.split, args.folds, args.seed, refs)
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
