"""`cspine predict`: one CT study -> calibrated probabilities, vertebra masks and a report.

The study passes through the stages in order and never comes back: decode (DICOM ->
Volume), segment (Volume -> C1..C7 mask on the study's grid), classify (crops -> calibrated
probabilities and per-slice scores), report (PNG + HTML). Every output carries timings.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cspine.labels import CERVICAL, PATIENT, PREDICTION_TYPES
from cspine.runtime import write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictConfig:
    """One study in, one output folder out."""

    study: Path
    model: Path
    out: Path
    device: str = "auto"
    threshold: float = 0.5
    series_uid: str | None = None
    report: bool = True
    hu_offset: float | None = None
    assume_cervical: bool = False
    mask: Path | None = None  # the user's own vertebra mask, used instead of the segmenter
    mask_labels: str = "rsna"  # its label convention (cspine.labels.MASK_CONVENTIONS)
    dicom: bool = False  # also OUT/dicom/: SEG + SR (+ key-object selection), see cspine.dicom_out


#: The file that marks a folder as predict's output (a folder holding it may be replaced as a whole).
RESULT_FILE = "result.json"


def check_out_folder(out: Path) -> None:
    """Refuse an output folder that cannot be predict's: an existing file, or a folder of other files.

    Checked before any work, because predict replaces the folder as a whole: it must never delete someone's files.
    """
    from cspine.errors import UsageError

    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder; --out names the output folder")
    if out.is_dir() and any(out.iterdir()) and not (out / RESULT_FILE).is_file():
        raise UsageError(
            f"{out}: a folder that holds other files and no {RESULT_FILE}; give a new or empty folder (an earlier "
            "predict output folder is replaced as a whole)"
        )


def _replace_folder(tmp: Path, out: Path) -> None:
    """Put the finished ``tmp`` folder at ``out``; an earlier output there is moved aside first, then deleted."""
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def predict_study(cfg: PredictConfig, bundle: Any = None) -> dict[str, Any]:
    """Run the whole pipeline on one study and write result.json, mask.nii.gz, report.png, report.html.

    The output folder is checked before any work and written as a whole (a temporary sibling renamed into place).
    A study too thin to hold a vertebra (one slice, a few millimetres) is refused.

    Args:
        cfg: paths and options.
        bundle: an already loaded :class:`cspine.bundle.Bundle` (to predict many studies with one load).

    Returns:
        The result dict written to result.json.
    """
    from cspine.bundle import check_bundle, load_bundle
    from cspine.errors import ResourceLimitError
    from cspine.io import load_study, save_nifti
    from cspine.io.volume import check_can_hold_vertebra
    from cspine.report import write_report

    check_out_folder(cfg.out)
    warming = None
    if cfg.dicom:  # highdicom's import overlaps decoding and segmentation instead of following them
        import threading

        from cspine.dicom_out import warm_up

        warming = threading.Thread(target=warm_up, name="cspine-dicom-warm-up", daemon=True)
        warming.start()
    if bundle is None:
        check_bundle(cfg.model)  # its files, cheaply, before the study is read
    timings: dict[str, float] = {}
    t = time.perf_counter()
    vol = load_study(cfg.study, series_uid=cfg.series_uid, hu_offset=cfg.hu_offset)
    check_can_hold_vertebra(vol, str(cfg.study))
    timings["decode"] = time.perf_counter() - t
    t = time.perf_counter()
    if bundle is None:
        bundle = load_bundle(cfg.model, device=cfg.device)
    timings["load_model"] = time.perf_counter() - t
    try:
        labels = None
        if cfg.mask is not None:
            from cspine.io import load_segmentation
            from cspine.labels import to_project_labels

            labels = to_project_labels(load_segmentation(cfg.mask, vol), cfg.mask_labels)
        out = bundle.predict(vol, timings=timings, assume_cervical=cfg.assume_cervical, labels=labels)
    except ResourceLimitError as exc:  # the model grid of this study: say which study
        raise ResourceLimitError(f"{cfg.study}: {exc}") from None
    result: dict[str, Any] = {
        "StudyInstanceUID": vol.meta.get("StudyInstanceUID"),
        "SeriesInstanceUID": vol.meta.get("SeriesInstanceUID"),
        # null where the vertebra (or, for every target, the cervical spine) is not in the field of view
        **{k: None if (v := out.probabilities[k]) is None else round(float(v), 6) for k in PREDICTION_TYPES},
        "cervical_spine": out.cervical_spine,
        # null probabilities on a scan coarser than the classifier learned from (cspine.cls.domain)
        "fractures": None if out.cervical_spine == "absent" else ("not assessed" if out.not_assessed else "assessed"),
        "threshold": cfg.threshold,
        "vertebrae": out.vertebrae,
        "warnings": list(vol.meta.get("warnings", [])) + list(out.warnings),
        "mask_cleanup": list(out.cleanup),
        "model": bundle.summary(),
    }
    # Everything goes into a temporary sibling first, renamed into place as a whole: a failure part-way never
    # leaves one study's result.json beside another's mask.
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = cfg.out.with_name(f".{cfg.out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        t = time.perf_counter()
        save_nifti(out.mask, vol, tmp / "mask.nii.gz")
        timings["write"] = time.perf_counter() - t
        if cfg.report:
            t = time.perf_counter()
            write_report(tmp, vol, out.mask, result, out.slice_scores, threshold=cfg.threshold)
            timings["report"] = time.perf_counter() - t
        if cfg.dicom and out.cervical_spine == "absent":
            result["warnings"].append("no DICOM outputs: no cervical spine in the field of view")
        elif cfg.dicom and out.not_assessed:
            result["warnings"].append("no DICOM outputs: fractures not assessed")
        elif cfg.dicom:
            from cspine.dicom_out import write_dicom_outputs

            t = time.perf_counter()
            if warming is not None:
                warming.join()
            written = write_dicom_outputs(tmp / "dicom", cfg.study, vol, out.mask, result, out.slice_scores)
            result["dicom"] = {k: str(cfg.out / "dicom" / Path(v).name) for k, v in written.items()}
            timings["dicom"] = time.perf_counter() - t
        result["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        write_json(tmp / RESULT_FILE, result)
        _replace_folder(tmp, cfg.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def format_table(result: dict[str, Any]) -> str:
    """A short plain-text table for the terminal."""
    from cspine.seg.presence import NO_SPINE_MESSAGE, SPINE_ABSENT

    if result.get("cervical_spine") == SPINE_ABSENT:
        return NO_SPINE_MESSAGE
    lines = [f"{'target':<16}{'probability':>12}  note"]
    for key in (PATIENT, *CERVICAL):
        note = ""
        info = result.get("vertebrae", {}).get(key, {})
        if key != PATIENT and not info.get("present", True):
            note = "not found" + (f" ({info['rejected']})" if info.get("rejected") else "")
        elif key != PATIENT and info.get("cut_off"):
            note = "partly outside field of view"
        p = result[key]
        flag = " *" if p is not None and p >= result.get("threshold", 0.5) else ""
        shown = "-" if p is None else f"{p:.3f}"
        lines.append(f"{key:<16}{shown:>12}{flag}  {note}".rstrip())
    return "\n".join(lines)
