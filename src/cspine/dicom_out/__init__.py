"""A prediction as DICOM objects a PACS can store and a viewer can show: SEG, Comprehensive 3D SR, key images.

Everything is built by highdicom (no hand-made DICOM):

* ``seg.dcm``: a binary Segmentation of C1..C7 whose frames are the source CT slices (same rows, columns, positions),
  each segment labelled with the vertebra's SNOMED CT code, referencing the CT's SOP instances;
* ``sr.dcm``: a Comprehensive 3D SR holding a TID 1500 measurement report: per vertebra a fracture probability,
  whether it is in the field of view and whether it is cut off, the model that said so, a reference to its SEG
  segment and, for flagged vertebrae, to the slices where the slice-level score peaks; one group for the patient;
* ``ko.dcm``: a Key Object Selection document pointing at those key slices.

Every object gets new UIDs (a new series each). The patient and study modules are copied from the source CT so that
the objects file under the same patient and study in the PACS they came from: this is the one output of cspine that
carries identifying fields, by design. Nothing else of the source's headers is copied (no institution, operator,
device serial number or series description).

A package so no module grows past a few hundred lines: :mod:`cspine.dicom_out.source` (the source series and what
each object takes from it), :mod:`cspine.dicom_out.segmentation` (SEG), :mod:`cspine.dicom_out.reports` (SR and
key objects); this module writes them (:func:`write_dicom_outputs`, :func:`dicom_out`).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cspine.dicom_out.reports import build_ko, build_sr, key_slices
from cspine.dicom_out.segmentation import build_seg
from cspine.dicom_out.source import SourceSeries, read_source_series, require_dicom
from cspine.errors import CspineInputError
from cspine.io.volume import Volume

log = logging.getLogger(__name__)


def warm_up() -> None:
    """Import highdicom and load the standard's tables it reads on first use (about a second), so that a caller
    can do it in a background thread while the study is decoded and segmented, instead of after.

    The tables are loaded through highdicom's private, cached loaders (the version is pinned in pyproject): where a
    later highdicom moves them, they are simply loaded on first use, as without the warm-up.
    """
    import highdicom.ko
    import highdicom.seg
    import highdicom.sr  # noqa: F401

    try:
        from highdicom import _standard_utils as standard
    except ImportError:
        return
    for loader in ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map"):
        if callable(getattr(standard, loader, None)):
            getattr(standard, loader)()

__all__ = [
    "KO_FILE",
    "SEG_FILE",
    "SR_FILE",
    "SourceSeries",
    "build_ko",
    "build_seg",
    "build_sr",
    "dicom_out",
    "key_slices",
    "read_source_series",
    "require_dicom",
    "write_dicom_outputs",
]


#: Output file names inside OUT/dicom/.
SEG_FILE, SR_FILE, KO_FILE = "seg.dcm", "sr.dcm", "ko.dcm"


def write_dicom_outputs(
    out_dir: Path,
    study: Path,
    vol: Volume,
    mask: np.ndarray,
    result: Mapping[str, Any],
    slice_scores: Mapping[str, Sequence[tuple[int, float]]] | None = None,
    threshold: float | None = None,
) -> dict[str, str]:
    """Write seg.dcm, sr.dcm and (when a vertebra is flagged) ko.dcm into ``out_dir``, atomically as a folder.

    Args:
        out_dir: the folder to create (e.g. OUT/dicom); replaced when it exists.
        study: the DICOM folder / zip / file ``vol`` was read from.
        vol, mask: the study and its C1..C7 label map on the same grid.
        result: the result dict (probabilities, vertebrae, model summary, threshold).
        slice_scores: per vertebra, (z, score) of its sampled slices: the peak is the key slice.
        threshold: flagging threshold (default: result's).

    Returns:
        file kind -> path, for result.json.
    """
    thr = float(result.get("threshold", 0.5) if threshold is None else threshold)
    source = read_source_series(study, vol)
    seg, numbers = build_seg(source, mask, result)
    keys = key_slices(mask, result, slice_scores, thr)
    sr = build_sr(source, seg, numbers, result, keys, thr)
    ko = build_ko(source, keys, result)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    written = {"seg": SEG_FILE, "sr": SR_FILE}
    seg.save_as(tmp / SEG_FILE, enforce_file_format=True)
    sr.save_as(tmp / SR_FILE, enforce_file_format=True)
    if ko is not None:
        ko.save_as(tmp / KO_FILE, enforce_file_format=True)
        written["ko"] = KO_FILE
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    log.info("DICOM outputs in %s: %s", out_dir, ", ".join(written.values()))
    return {k: str(out_dir / v) for k, v in written.items()}


def dicom_out(
    result_dir: Path, study: Path, out_dir: Path | None = None, series_uid: str | None = None
) -> dict[str, str]:
    """DICOM outputs for an existing result folder (result.json + mask.nii.gz) and the study it was made from."""
    import json

    from cspine.io import load_segmentation, load_study

    for name in ("result.json", "mask.nii.gz"):
        if not (result_dir / name).exists():
            raise CspineInputError(f"{result_dir}: not a cspine result folder ({name} is missing)")
    require_dicom(study)
    try:
        result = json.loads((result_dir / "result.json").read_text())
    except json.JSONDecodeError as exc:
        raise CspineInputError(f"{result_dir / 'result.json'}: unreadable ({exc})") from exc
    vol = load_study(study, series_uid=series_uid or result.get("SeriesInstanceUID"))
    if result.get("StudyInstanceUID") and vol.meta.get("StudyInstanceUID") != result["StudyInstanceUID"]:
        raise CspineInputError(
            f"{study}: study {vol.meta.get('StudyInstanceUID')} is not the one of {result_dir} "
            f"({result['StudyInstanceUID']})"
        )
    mask = load_segmentation(result_dir / "mask.nii.gz", vol)
    return write_dicom_outputs(out_dir or result_dir / "dicom", study, vol, mask, result)
