"""The source CT series of a prediction's DICOM outputs, and what every output object takes from it.

Reads the CT's headers (no pixel data) matched to the volume's slices, keeps only geometry, identity and the
patient/study modules (:data:`SOURCE_TAGS`), and gives each output its new series, its algorithm identity and its
type 2 patient/study attributes. Apart from the object builders (:mod:`cspine.dicom_out.segmentation`,
:mod:`cspine.dicom_out.reports`) because it is the one place that decides what of the source's headers is copied.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cspine import __version__
from cspine.errors import CspineInputError
from cspine.io.volume import Volume

log = logging.getLogger(__name__)


#: Series numbers of the new series (high, so they sort after the scanner's own).
SERIES_NUMBERS = {"seg": 9701, "sr": 9702, "ko": 9703}


#: What is kept of each source header: geometry, identity, and the patient/study modules. Everything else (station,
#: institution, operators, device serial numbers ...) is dropped before highdicom sees the header, which would
#: otherwise copy the acquisition equipment into the outputs.
SOURCE_TAGS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "Modality",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "Rows", "Columns",
    "InstanceNumber", "SpecificCharacterSet",
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "IssuerOfPatientID", "OtherPatientIDsSequence",
    "PatientAge", "PatientWeight", "PatientSize",
    "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription",
)  # fmt: skip


#: The patient/study attributes that must be there (type 2) in every output; empty when the source lacks them.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
          "AccessionNumber", "ReferringPhysicianName")  # fmt: skip


@dataclass(frozen=True)
class SourceSeries:
    """The source CT headers, one per slice of the Volume (index z), read without pixel data."""

    headers: list[Any]

    @property
    def series_uid(self) -> str:
        return str(self.headers[0].SeriesInstanceUID)


def require_dicom(study: Path) -> None:
    """DICOM outputs reference the source's instances: a NIfTI study has none (checked before any work)."""
    if study.is_file() and study.name.lower().endswith((".nii", ".nii.gz")):
        raise CspineInputError(f"{study}: DICOM outputs need a DICOM study to reference; this is a NIfTI file")


def read_source_series(study: Path, vol: Volume) -> SourceSeries:
    """The headers of the DICOM files that ``vol`` was read from, ordered as its slices.

    Files are matched to slices by series UID and by where their ImagePositionPatient falls on the volume's slice
    axis, the same geometry the reader sorted by, so the SEG's frames are the source slices exactly.

    Raises:
        CspineInputError: a NIfTI study (no DICOM to reference), a gantry-tilted series (the mask lies on a
            resampled grid, not on the source slices), or files that do not cover every slice.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    from cspine.io.dicom import _input_files  # the reader's own file finder (folder / zip / file)

    require_dicom(study)
    if float(vol.meta.get("gantry_tilt_deg") or 0.0) > 0.5:
        raise CspineInputError(
            f"{study}: gantry tilt {vol.meta['gantry_tilt_deg']} deg; the mask lies on a corrected grid, not on the "
            "source slices, so no SEG can reference them"
        )
    series_uid = vol.meta.get("SeriesInstanceUID")
    slots: list[Any] = [None] * vol.shape[0]
    with _input_files(study) as files:
        for f in files:
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)  # (specific_tags would parse slower)
            except (InvalidDicomError, OSError):
                continue
            if str(ds.get("SeriesInstanceUID", "")) != series_uid or "ImagePositionPatient" not in ds:
                continue
            _identity_from_file_meta(ds)
            ds = _slim(ds)
            z = float(vol.patient_to_index(np.array([float(v) for v in ds.ImagePositionPatient]))[0, 0])
            k = round(z)
            if abs(z - k) < 0.05 and 0 <= k < len(slots) and slots[k] is None:
                slots[k] = ds
    missing = [k for k, ds in enumerate(slots) if ds is None]
    if missing:
        raise CspineInputError(
            f"{study}: no file of series {series_uid} at {len(missing)} of {len(slots)} slice positions "
            f"(first z index {missing[0]}); is this the study the result was made from?"
        )
    _fill_missing_uids(slots, study)
    return SourceSeries(slots)


def _fill_missing_uids(headers: list[Any], study: Path) -> None:
    """Give a series that lacks a study, series or frame-of-reference UID (type 1 in every CT, yet blank in some
    anonymised or old files: TotalSegmentator's example CT, the Slicer neck CT) a stand-in derived from its first
    instance, the same for every slice and every run, so that the outputs are valid and agree with each other. The
    outputs then reference the CT by SOP instance only; a PACS files them under the stand-in study (said in a
    warning)."""
    from pydicom.uid import generate_uid

    first = str(headers[0].SOPInstanceUID)
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        if all(ds.get(key) for ds in headers):
            continue
        uid = generate_uid(entropy_srcs=["cspine-stand-in", key, first])
        log.warning("%s: the source series has no %s; the DICOM outputs use %s", study, key, uid)
        for ds in headers:
            if not ds.get(key):
                setattr(ds, key, uid)


def _slim(ds: Any) -> Any:
    """A copy of a header holding only :data:`SOURCE_TAGS` (and the file meta)."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataset import Dataset

    out = Dataset()
    out.file_meta = ds.file_meta
    for key in SOURCE_TAGS:
        tag = tag_for_keyword(key)
        if tag in ds:
            out[tag] = ds.get_item(tag)  # as read: values are decoded only if something asks for them
    return out


def _identity_from_file_meta(ds: Any) -> None:
    """Some anonymisers blank SOPClassUID / SOPInstanceUID in the dataset (TotalSegmentator's example CT) and keep
    them only in the file meta; what a reference needs is the instance's identity, which the file meta carries."""
    meta = getattr(ds, "file_meta", None)
    for key, meta_key in (("SOPClassUID", "MediaStorageSOPClassUID"), ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
        if not ds.get(key) and meta is not None and meta.get(meta_key):
            setattr(ds, key, meta.get(meta_key))


def _algorithm(result: Mapping[str, Any]) -> tuple[str, str]:
    """(name, version) of the model that made the result, from result.json's model summary."""
    model = result.get("model") or {}
    name = f"cspine {Path(str(model.get('path', 'model'))).name}"
    version = f"cspine {model.get('cspine') or __version__}"
    if model.get("created"):
        version += f", bundle {model['created']}"
    return name[:64], version[:64]


def _new_series(kind: str) -> dict[str, Any]:
    """New UIDs, the series number of ``kind`` and cspine as the manufacturer: what each output object starts from."""
    import highdicom as hd

    return {"series_instance_uid": hd.UID(), "series_number": SERIES_NUMBERS[kind], "sop_instance_uid": hd.UID(),
            "instance_number": 1, "manufacturer": "cspine"}  # fmt: skip


def _fill_type2(ds: Any) -> None:
    """Type 2 patient/study attributes the source lacked: present and empty, as the standard asks."""
    for key in _TYPE2:
        if key not in ds:
            setattr(ds, key, "")
