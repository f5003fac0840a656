"""The ``cspine`` command: subcommands parse and validate, then call one library function.

Heavy imports (torch, monai, pydicom) happen inside the subcommand that needs them so
``cspine --help`` answers at once. Bad input of any kind ends with one line on stderr
and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cspine import __version__
from cspine.errors import CspineInputError, UsageError
from cspine.synth.config import PROFILES, SIZES

log = logging.getLogger("cspine")

#: Exit code for bad input (missing path, unreadable DICOM, broken model directory ...).
EXIT_BAD_INPUT = 2


def _existing(path: str) -> Path:
    p = Path(path)
    try:
        p.stat()
    except FileNotFoundError:
        raise UsageError(f"{p}: no such file or folder") from None
    except OSError as exc:  # a name longer than PATH_MAX, a loop of links, a folder we may not enter ...
        raise UsageError(f"{p}: {exc.strerror or exc}") from None
    return p


def _output_file(path: str, suffixes: tuple[str, ...] = ()) -> Path:
    """Check an output file's name before any work: the right extension, not a folder, a parent that can be made."""
    p = Path(path)
    if p.is_dir():
        ending = f" ending in {' or '.join(suffixes)}" if suffixes else ""
        raise UsageError(f"{p}: is a folder; give a file name{ending}")
    if suffixes and not p.name.lower().endswith(suffixes):
        raise UsageError(f"{p}: the output must end in {' or '.join(suffixes)}")
    _writable_parent(p)
    return p


def _writable_parent(p: Path) -> None:
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{p}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{p}: cannot write in {parent} (permission denied)")


def _output_folder(path: str) -> Path:
    """Check an output folder before any work: not a file, writable, and (if it has files) an earlier output of
    the same command (it is then replaced as a whole), never someone's folder of other files."""
    from cspine.predict import check_out_folder

    p = Path(path)
    check_out_folder(p)
    _writable_parent(p)  # the folder is built beside it, then renamed into place
    return p


def _limits(args: argparse.Namespace) -> None:
    """Apply the resource-limit options (commands that read studies have them) process-wide."""
    from cspine.io.limits import Limits, configure

    if not hasattr(args, "max_slice_pixels"):
        configure(Limits())
        return
    configure(Limits(**{name: getattr(args, name) for name in Limits.__dataclass_fields__}))


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


def _add_crop_flags(p: argparse.ArgumentParser, note: str = "") -> None:
    """One flag per CropConfig field (cspine.engine.cli_flags): a new crop setting is one line in its dataclass."""
    from cspine.cls.config import STATS_REGIONS, CropConfig  # torch-free
    from cspine.engine.cli_flags import add_config_flags

    g = p.add_argument_group("crops (cspine.cls.config.CropConfig)")
    add_config_flags(g, CropConfig, "crop", choices={"stats_region": STATS_REGIONS}, defaults_note=note)


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

    cfg = InferConfig(device=args.device, threads=args.threads)
    if args.engine == "cspine" and not args.model:
        raise UsageError("--model is required with the cspine engine (a segmentation model or bundle directory)")
    study = _existing(args.study)
    model = _existing(args.model) if args.model else None
    out = _output_file(args.out, (".nii.gz", ".nii"))
    if args.report:
        _output_file(args.report, (".json",))
    res = segment_study(study, model, out, args.report, cfg, engine=args.engine)
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


def _size(text: str) -> int:
    from cspine.io.limits import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_reading(p: argparse.ArgumentParser, hu_offset: bool = True) -> None:
    """Options of commands that read studies: resource limits (README "Limits and reruns") and --hu-offset."""
    from cspine.io.limits import Limits

    d = Limits()
    g = p.add_argument_group("input limits (checked from headers before anything is allocated)")
    g.add_argument("--max-slice-pixels", type=_size, default=d.max_slice_pixels,
                   help=f"rows x columns of one DICOM image (default {d.max_slice_pixels:,})")
    g.add_argument("--max-series-voxels", type=_size, default=d.max_series_voxels,
                   help=f"voxels of one series or NIfTI volume (default {d.max_series_voxels:,})")
    g.add_argument("--max-grid-voxels", type=_size, default=d.max_grid_voxels,
                   help=f"voxels of a grid a study is resampled onto (default {d.max_grid_voxels:,})")
    g.add_argument("--max-zip-bytes", type=_size, default=d.max_zip_bytes,
                   help="total uncompressed size of a zip's members, e.g. 8G (default 4G)")
    g.add_argument("--max-fov-mm", type=float, default=d.max_fov_mm,
                   help=f"field of view along any axis in mm (default {d.max_fov_mm:g})")
    if hu_offset:
        p.add_argument("--hu-offset", type=float, default=None,
                       help="add this to every value: for a series whose rescale was lost (air reads 0: "
                            "--hu-offset -1024); never guessed")


def build_parser() -> argparse.ArgumentParser:
    """The whole command-line interface, for ``main`` and for documentation."""
    from cspine.labels import MASK_CONVENTION_ALIASES, MASK_CONVENTIONS  # torch-free registries
    from cspine.seg.totalsegmentator import ENGINES

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
    _add_reading(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("show", help="axial/coronal/sagittal views with the vertebra mask overlaid (PNG)")
    p.add_argument("study", help="DICOM folder, .zip or file, or a NIfTI CT (.nii / .nii.gz)")
    p.add_argument("--seg", default=None, help="NIfTI label mask (RSNA segmentations/*.nii or cspine output)")
    p.add_argument("--out", default="view.png")
    p.add_argument("--series-uid", default=None)
    _add_reading(p)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("synth", help="generate a synthetic RSNA-layout dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--studies", type=int, default=20, help="training studies")
    p.add_argument("--test-studies", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=SIZES, default="small")
    p.add_argument("--segmented", type=float, default=0.5, help="fraction of training studies with a mask")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument(
        "--profile",
        choices=PROFILES,
        default="default",
        help="default: tight cervical-spine scans; wide: head to abdomen fields of view (some without a cervical "
        "spine), 0.3-5 mm voxels, scanner artefacts",
    )
    _add_progress(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prepare", help="cache every study of an RSNA-layout dataset for training")
    p.add_argument("--data", required=True, help="RSNA-layout folder (train_images/, segmentations/ ...)")
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--workers", type=int, default=1, help="studies prepared in parallel")
    p.add_argument("--shard", default=None, help="i/n: prepare only every n-th study starting at i")
    _add_reading(p, hu_offset=False)
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
    p.add_argument("--assume-cervical", action="store_true",
                   help="the study is known to be a cervical spine CT: skip the check that one is in view")
    p.add_argument("--mask", default=None, help="your own vertebra mask (NIfTI), used instead of the segmenter")
    p.add_argument("--labels", choices=tuple(MASK_CONVENTIONS), default="rsna",
                   help="label convention of --mask (rsna and verse: 1..7 = C1..C7; totalsegmentator: 50..44)")
    _add_reading(p)
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
    p.add_argument("--no-retry-failed", action="store_true",
                   help="on a rerun, keep the journal's failed studies failed instead of trying them again")
    _add_reading(p, hu_offset=False)
    _add_progress(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("bundle", help="assemble a model bundle from seg and cls model directories")
    p.add_argument("--seg", required=True, help="segmentation model directory (cspine train-seg --out)")
    p.add_argument("--cls", required=True, help="classification model directory (cspine train-cls --out)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_bundle)
    from cspine.cls.config import (  # torch-free names
        ENCODERS,
        FEATURE_FITS,
        OPTIMIZERS,
        PATIENT_SOURCES,
        POOLS,
        RECIPES,
        SCHEDULES,
        SPLITS,
        ModelConfig,
        TrainConfig,
    )
    from cspine.engine.cli_flags import add_config_flags

    p = sub.add_parser("crops", help="per-vertebra 2.5D crops of a prepared cache (+ PNG grids with --png)")
    p.add_argument("--data", required=True, help="prepared cache folder (cspine prepare --out)")
    p.add_argument("--out", default=None, help="crop cache root (default: DATA/crops)")
    p.add_argument("--masks", default=None, help="folder of predicted masks <uid>.nii[.gz] (default: cache masks)")
    _add_masks_first(p)
    p.add_argument("--split", choices=("train", "test"), default="train")
    _add_crop_flags(p)
    p.add_argument("--limit", type=int, default=0, help="at most this many studies (0 = all)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--png", action="store_true", help="write a PNG grid per study (fracture boxes in red)")
    _add_progress(p)
    p.set_defaults(func=cmd_crops)

    p = sub.add_parser("train-cls", help="train the fracture classifier (study-grouped CV, OOF, calibration)")
    p.add_argument("--data", required=True, help="prepared cache folder with masks (cspine prepare --out)")
    p.add_argument("--out", required=True, help="model directory (rerun the same command to resume)")
    p.add_argument("--recipe", choices=tuple(RECIPES), default="sequence")
    _add_progress(p)
    note = "; a recipe may set another"
    g = p.add_argument_group("training (cspine.cls.config.TrainConfig)")
    add_config_flags(g, TrainConfig, "train", skip=("data", "out", "recipe"), defaults_note=note,
                     choices={"split": SPLITS, "optimizer": OPTIMIZERS, "schedule": SCHEDULES})
    p.add_argument("--crops", dest="train.crops_dir", default=None, help="the same as --crops-dir")
    _add_crop_flags(p, note)
    g = p.add_argument_group("model (cspine.cls.config.ModelConfig)")
    add_config_flags(g, ModelConfig, "model", defaults_note=note,
                     choices={"encoder": ENCODERS, "patient_from": PATIENT_SOURCES, "pool": POOLS,
                              "feature_fit": FEATURE_FITS, "stem_stride": (1, 2)})
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
    from cspine.seg.config import STAGE_CLASSES, TrainSegConfig  # torch-free registries
    from cspine.seg.models import MODEL_NAMES

    p = sub.add_parser("train-seg", help="train the C1-C7 segmenter (3D U-Net; resumable; DDP under torchrun)")
    p.add_argument("--data", required=True, help="prepared cache (cspine prepare --out) or RSNA-layout folder")
    p.add_argument("--out", required=True, help="model directory (rerun the same command to resume)")
    g = p.add_argument_group("training (cspine.seg.config.TrainSegConfig)")
    add_config_flags(g, TrainSegConfig, "train", skip=("data", "out"),
                     choices={"arch": MODEL_NAMES, "stage": tuple(STAGE_CLASSES)})
    p.add_argument("--spacing", type=float, default=None,
                   help="isotropic model spacing in mm (PreprocessConfig.spacing; default 2.0, refine stage 1.25)")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming from OUT/last.pt")
    _add_progress(p)
    p.set_defaults(func=cmd_train_seg)

    p = sub.add_parser("segment", help="one study -> C1-C7 mask NIfTI on its own grid + per-vertebra report")
    p.add_argument("study", help="DICOM folder / .zip / file, NIfTI volume, or prepared study folder")
    p.add_argument("--model", default=None, help="segmentation model directory (or a bundle with seg/)")
    p.add_argument("--engine", choices=ENGINES, default="cspine",
                   help="cspine's network (needs --model) or TotalSegmentator (where installed)")
    p.add_argument("--out", required=True, help="mask file (.nii.gz)")
    p.add_argument("--report", default=None, help="JSON report file (default: printed)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    _add_reading(p)
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
    conventions = (*MASK_CONVENTIONS, *MASK_CONVENTION_ALIASES)
    p.add_argument("--pred-labels", choices=conventions, default="rsna")
    p.add_argument("--truth-labels", choices=conventions, default="rsna")
    p.add_argument("--out", required=True, help="folder for eval.json and eval.md")
    p.add_argument("--device", default="auto")
    _add_progress(p)
    p.set_defaults(func=cmd_eval_seg)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cspine`` console script.

    Exit codes: 0 done, 2 bad input (a :class:`~cspine.errors.CspineInputError`, or an OS error about a path the
    user gave: one line on stderr), 130 interrupted; anything else is a bug and shows its traceback (1).
    """
    # Before torch loads OpenMP: idle threads sleep instead of spinning. On a shared or busy machine spinning
    # threads wait for a core another job holds; the segmenter's many small windows took 8.2 s instead of 2.4 s.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _tolerant_streams()
    parser = build_parser()
    args = parser.parse_args(argv)
    # Our own messages at INFO; third-party libraries (openjpeg logs every tile) only from WARNING up.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("cspine").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    from cspine.runtime import remove_stale_decode_buffers

    remove_stale_decode_buffers()
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        _limits(args)
        from cspine.io import set_default_hu_offset

        set_default_hu_offset(getattr(args, "hu_offset", None))
        code = func(args)
    except KeyboardInterrupt:
        print("cspine: interrupted", file=sys.stderr)
        code = 130
    except (CspineInputError, OSError) as exc:
        message = _input_error(exc)
        if message is None:
            raise  # an OS error that is not about a path the user gave: a bug or the machine, shown as such
        if args.verbose:
            log.exception("failed")
        print(f"cspine {args.command}: error: {message}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    if argv is None:  # the process's own entry point (console script, python -m): a torchrun worker ends here
        from cspine.runtime import exit_worker

        return exit_worker(code)
    return code


#: OS errors that say something about a path the user gave (missing, not allowed, wrong kind, too long, full).
_PATH_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
                errno.ENAMETOOLONG, errno.ELOOP, errno.ENOSPC, errno.EROFS, errno.EDQUOT}  # fmt: skip


def _input_error(exc: BaseException) -> str | None:
    """The one line for a bad-input exception, or None when it is not one (then it is re-raised as a bug)."""
    if isinstance(exc, CspineInputError):
        return str(exc).strip().replace("\n", " ")
    if isinstance(exc, OSError):
        if exc.errno in _PATH_ERRNOS and exc.filename is not None:
            return f"{exc.filename}: {exc.strerror}"
        if exc.errno is None and isinstance(exc, (FileNotFoundError, NotADirectoryError)) and exc.args:
            return str(exc)  # raised by cspine itself with a message naming the path
    return None


def _tolerant_streams() -> None:
    """Never fail on printing: a path that is not valid UTF-8 (kept by Python as surrogates) is printed escaped
    instead of raising UnicodeEncodeError after every output was written."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError):
                reconfigure(errors="backslashreplace")


if __name__ == "__main__":
    sys.exit(main())
