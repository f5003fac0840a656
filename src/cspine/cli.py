"""The ``cspine`` command: subcommands parse and validate, then call one library function.

Heavy imports (torch, monai, pydicom) happen inside the subcommand that needs them so
``cspine --help`` answers at once. Bad input of any kind ends with one line on stderr
and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cspine import __version__

log = logging.getLogger("cspine")

#: Exit code for bad input (missing path, unreadable DICOM, broken model directory ...).
EXIT_BAD_INPUT = 2


class UsageError(ValueError):
    """Bad input detected by the CLI itself."""


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
    from cspine.io import load_series

    vol = load_series(_existing(args.study), series_uid=args.series_uid)
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
    from cspine.io import load_segmentation, load_series
    from cspine.plots import show_spine

    vol = load_series(_existing(args.study), series_uid=args.series_uid)
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
    )
    result = predict_study(cfg)
    print(format_table(result))
    for w in result["warnings"]:
        print(f"warning: {w}")
    print(f"outputs in {cfg.out} (result.json, mask.nii.gz{', report.png, report.html' if cfg.report else ''})")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """test.csv + test_images/ -> submission.csv."""
    from cspine.submit import SubmitConfig, submit

    cfg = SubmitConfig(data=_existing(args.data), model=_existing(args.model), out=Path(args.out), device=args.device)
    summary = submit(cfg, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    """Assemble a model bundle from a segmentation and a classification model directory."""
    from cspine.bundle import make_bundle

    out = make_bundle(_existing(args.seg), _existing(args.cls), Path(args.out))
    print(out)
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

    p = sub.add_parser("info", help="geometry and encoding of a DICOM study (folder, .zip or file)")
    p.add_argument("study")
    p.add_argument("--series-uid", default=None, help="pick this SeriesInstanceUID (default: the largest series)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("show", help="axial/coronal/sagittal views with the vertebra mask overlaid (PNG)")
    p.add_argument("study")
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
    p.add_argument("study", help="DICOM folder, .zip or file")
    p.add_argument("--model", required=True, help="model bundle directory")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threshold", type=float, default=0.5, help="probability marked as positive in the report")
    p.add_argument("--series-uid", default=None)
    p.add_argument("--no-report", action="store_true", help="skip report.png / report.html")
    p.set_defaults(func=cmd_predict)

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cspine`` console script."""
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
        return func(args)
    except KeyboardInterrupt:
        print("cspine: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        # DicomError, UsageError, config errors: the message already names the file and the problem.
        if args.verbose:
            log.exception("failed")
        print(f"cspine {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
