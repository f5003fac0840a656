"""`cspine predict`: one CT study -> calibrated probabilities, vertebra masks and a report.

The study passes through the stages in order and never comes back: decode (DICOM ->
Volume), segment (Volume -> C1..C7 mask on the study's grid), classify (crops -> calibrated
probabilities and per-slice scores), report (PNG + HTML). Every output carries timings.
"""

from __future__ import annotations

import logging
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
    dicom: bool = False  # also OUT/dicom/: SEG + SR (+ key-object selection), see cspine.dicom_out


def predict_study(cfg: PredictConfig, bundle: Any = None) -> dict[str, Any]:
    """Run the whole pipeline on one study and write result.json, mask.nii.gz, report.png, report.html.

    Args:
        cfg: paths and options.
        bundle: an already loaded :class:`cspine.bundle.Bundle` (to predict many studies with one load).

    Returns:
        The result dict written to result.json.
    """
    from cspine.bundle import load_bundle
    from cspine.io import load_study, save_nifti
    from cspine.report import write_report

    timings: dict[str, float] = {}
    t = time.perf_counter()
    if bundle is None:
        bundle = load_bundle(cfg.model, device=cfg.device)
    timings["load_model"] = time.perf_counter() - t
    t = time.perf_counter()
    vol = load_study(cfg.study, series_uid=cfg.series_uid)
    timings["decode"] = time.perf_counter() - t
    out = bundle.predict(vol, timings=timings)
    result: dict[str, Any] = {
        "StudyInstanceUID": vol.meta.get("StudyInstanceUID"),
        "SeriesInstanceUID": vol.meta.get("SeriesInstanceUID"),
        **{k: round(float(out.probabilities[k]), 6) for k in PREDICTION_TYPES},
        "threshold": cfg.threshold,
        "vertebrae": out.vertebrae,
        "warnings": list(vol.meta.get("warnings", [])) + list(out.warnings),
        "mask_cleanup": list(out.cleanup),
        "model": bundle.summary(),
    }
    t = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    save_nifti(out.mask, vol, cfg.out / "mask.nii.gz")
    timings["write"] = time.perf_counter() - t
    if cfg.report:
        t = time.perf_counter()
        write_report(cfg.out, vol, out.mask, result, out.slice_scores, threshold=cfg.threshold)
        timings["report"] = time.perf_counter() - t
    if cfg.dicom:
        from cspine.dicom_out import write_dicom_outputs

        t = time.perf_counter()
        result["dicom"] = write_dicom_outputs(cfg.out / "dicom", cfg.study, vol, out.mask, result, out.slice_scores)
        timings["dicom"] = time.perf_counter() - t
    result["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    write_json(cfg.out / "result.json", result)
    return result


def format_table(result: dict[str, Any]) -> str:
    """A short plain-text table for the terminal."""
    lines = [f"{'target':<16}{'probability':>12}  note"]
    for key in (PATIENT, *CERVICAL):
        note = ""
        info = result.get("vertebrae", {}).get(key, {})
        if key != PATIENT and not info.get("present", True):
            note = "not in field of view"
        elif key != PATIENT and info.get("cut_off"):
            note = "partly outside field of view"
        flag = " *" if result[key] >= result.get("threshold", 0.5) else ""
        lines.append(f"{key:<16}{result[key]:>12.3f}{flag}  {note}".rstrip())
    return "\n".join(lines)
