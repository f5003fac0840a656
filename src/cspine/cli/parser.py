"""The ``cspine`` argument parser: every subcommand, its options and the shared option groups.

Apart from the subcommands so the long option lists sit in one place; it imports only torch-free registries, so
``cspine --help`` answers at once.
"""

from __future__ import annotations

import argparse

from cspine import __version__
from cspine.cli.args import _size
from cspine.cli.commands import (
    cmd_build_segmenter,
    cmd_bundle,
    cmd_crops,
    cmd_demo,
    cmd_dicom_out,
    cmd_eval_seg,
    cmd_evaluate,
    cmd_info,
    cmd_pacs,
    cmd_predict,
    cmd_prepare,
    cmd_pseudo_label,
    cmd_segment,
    cmd_show,
    cmd_submit,
    cmd_synth,
    cmd_train_cls,
    cmd_train_seg,
)
from cspine.synth.config import PROFILES, SIZES


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


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")


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
    p.add_argument("--shipped-network", action=argparse.BooleanOptionalAction, default=True,
                   help="the classifier's network is the fracture network in the package (default); "
                        "--no-shipped-network trains a small ResNet from scratch instead (it ranks at chance)")
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
        TTA_MODES,
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
                              "feature_fit": FEATURE_FITS, "stem_stride": (1, 2), "tta": TTA_MODES})
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
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming from OUT/work/model.state.pt")
    _add_progress(p)
    p.set_defaults(func=cmd_train_seg)

    p = sub.add_parser("segment", help="one study -> C1-C7 mask NIfTI on its own grid + per-vertebra report")
    p.add_argument("study", help="DICOM folder / .zip / file, NIfTI volume, or prepared study folder")
    p.add_argument("--model", default=None,
                   help="segmentation model directory (or a bundle with seg/); default: the shipped segmenter")
    p.add_argument("--engine", choices=ENGINES, default="cspine",
                   help="cspine's network or TotalSegmentator (where installed)")
    p.add_argument("--out", required=True, help="mask file (.nii.gz)")
    p.add_argument("--report", default=None, help="JSON report file (default: printed)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    _add_reading(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("build-segmenter", help="rebuild the shipped segmenter from generated data (resumable)")
    p.add_argument("--out", required=True, help="work folder: generated data, caches, OUT/model, evaluation")
    p.add_argument("--install", action="store_true", help="copy OUT/model into the package as the shipped segmenter")
    p.set_defaults(func=cmd_build_segmenter)

    p = sub.add_parser("pseudo-label", help="masks + quality records for studies without masks (resumable)")
    p.add_argument("--data", required=True, help="prepared cache or RSNA-layout folder")
    p.add_argument("--model", required=True, help="segmentation model directory (or a bundle with seg/)")
    p.add_argument("--out", required=True, help="folder for <uid>.nii.gz, <uid>.json, quality.csv")
    p.add_argument("--split", default="train")
    p.add_argument("--all", action="store_true", help="also studies that already have a mask")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=1,
                   help="studies segmented at once, one process each with a share of the CPU threads")
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
