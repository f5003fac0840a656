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
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cspine import __version__
from cspine.errors import CspineInputError
from cspine.io.volume import Volume
from cspine.labels import CERVICAL, LABEL_VALUES, PATIENT

log = logging.getLogger(__name__)

#: Output file names inside OUT/dicom/.
SEG_FILE, SR_FILE, KO_FILE = "seg.dcm", "sr.dcm", "ko.dcm"
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


def _sct_vertebra(name: str) -> Any:
    from pydicom.sr.codedict import codes

    return getattr(codes.SCT, f"{name}Vertebra")


def _private(value: str, meaning: str) -> Any:
    """A concept of cspine's own coding scheme (private schemes start with 99)."""
    from pydicom.sr.coding import Code

    return Code(value, "99CSPINE", meaning)


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


def key_slices(
    mask: np.ndarray,
    result: Mapping[str, Any],
    slice_scores: Mapping[str, Sequence[tuple[int, float]]] | None,
    threshold: float,
) -> dict[str, list[int]]:
    """Per flagged vertebra (probability >= threshold, in the field of view), the z index where its slice-level
    score peaks; without scores, its middle masked slice."""
    out: dict[str, list[int]] = {}
    for name in CERVICAL:
        p = result.get(name)
        if p is None or float(p) < threshold or not result.get("vertebrae", {}).get(name, {}).get("present", True):
            continue
        scored = sorted((slice_scores or {}).get(name, []), key=lambda t: -t[1])
        if scored:
            out[name] = [int(scored[0][0])]
            continue
        zz = np.flatnonzero((mask == LABEL_VALUES[name]).any(axis=(1, 2)))
        if len(zz):
            out[name] = [int(zz[len(zz) // 2])]
    return out


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


def _label_counts(mask: np.ndarray) -> np.ndarray:
    """Voxels per label value (256 bins), counted inside the mask's bounding box only (a 512x512x400 mask is
    mostly zeros, and bincount over all of it costs seconds)."""
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.max(axis=others))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1) if len(hit) else slice(0, 0))
    counts = np.bincount(mask[tuple(box)].ravel(), minlength=256)
    counts[0] += mask.size - int(counts.sum())
    return counts


@contextmanager
def _multiframe_check_once_per_class() -> Iterator[None]:
    """While a SEG is built, answer highdicom's "is this a multi-frame IOD?" once per SOP class.

    highdicom 0.28 asks it for every source slice and walks the IOD's module tables each time: for 400 slices that
    was ~45 % of building the SEG. The answer depends only on the SOP class, so it is cached here, for the duration
    of the call only (the pinned version's ``highdicom.utils.is_multiframe_image``; a version without it is left
    alone).
    """
    import highdicom.utils as hd_utils

    original = getattr(hd_utils, "is_multiframe_image", None)
    if original is None:
        yield
        return
    answers: dict[str, bool] = {}

    def once(ds: Any) -> bool:
        key = str(ds.SOPClassUID)
        if key not in answers:
            answers[key] = bool(original(ds))
        return answers[key]

    hd_utils.is_multiframe_image = once
    try:
        yield
    finally:
        hd_utils.is_multiframe_image = original


def build_seg(source: SourceSeries, mask: np.ndarray, result: Mapping[str, Any]) -> tuple[Any, dict[str, int]]:
    """The SEG of C1..C7 on the source slices; returns it and vertebra -> segment number."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if mask.shape != (len(source.headers), int(source.headers[0].Rows), int(source.headers[0].Columns)):
        raise ValueError(f"mask shape {mask.shape} does not match the source series")
    counts = _label_counts(mask)
    present = [n for n in CERVICAL if counts[LABEL_VALUES[n]]]
    if not present:
        raise CspineInputError("the mask holds no vertebra C1-C7: there is nothing to write as a DICOM SEG")
    numbers = {n: i + 1 for i, n in enumerate(present)}
    labels = mask
    if any(LABEL_VALUES[n] != k for n, k in numbers.items()) or counts[8:].any():
        # Label values -> segment numbers (1..n, consecutive, as the standard wants); anything else -> 0.
        lut = np.zeros(256, dtype=np.uint8)
        for n, k in numbers.items():
            lut[LABEL_VALUES[n]] = k
        labels = lut[mask]
    name, version = _algorithm(result)
    algo = hd.AlgorithmIdentificationSequence(name=name, version=version, family=codes.cid7162.ArtificialIntelligence)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=k,
            segment_label=n,
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=_sct_vertebra(n),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            tracking_uid=hd.UID(),
            tracking_id=f"{n} vertebra",
        )
        for n, k in numbers.items()
    ]
    with _multiframe_check_once_per_class():
        seg = hd.seg.Segmentation(
            source_images=source.headers,
            pixel_array=labels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            **_new_series("seg"),
            manufacturer_model_name=name,
            software_versions=f"cspine {__version__}",
            device_serial_number="none",
            series_description="cspine C1-C7 vertebrae",
            content_label="VERTEBRAE",
            content_description="C1-C7 vertebra masks (cspine, research software)",
        )
    _fill_type2(seg)
    return seg, numbers


def build_sr(
    source: SourceSeries,
    seg: Any,
    segment_numbers: Mapping[str, int],
    result: Mapping[str, Any],
    keys: Mapping[str, list[int]],
    threshold: float,
) -> Any:
    """The Comprehensive 3D SR (TID 1500): probabilities, field-of-view facts, model, SEG and key-slice links."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    name, version = _algorithm(result)
    algo = hd.sr.AlgorithmIdentification(name=name, version=version, parameters=[f"threshold {threshold:g}"])
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="cspine", manufacturer_name="cspine", model_name=name
        ),
    )
    fracture = Code("125605004", "SCT", "Fracture of bone")
    probability, no_units = codes.DCM.Probability, codes.UCUM.NoUnits
    yes, no = Code("373066001", "SCT", "Yes"), Code("373067005", "SCT", "No")
    in_fov, cut_off = _private("FOV", "In field of view"), _private("CUTOFF", "Cut off by the field of view")
    flagged = _private("FLAG", "At or above the decision threshold")
    groups: list[Any] = []
    verts = result.get("vertebrae", {})
    for n in CERVICAL:
        if result.get(n) is None:
            continue
        info = verts.get(n, {})
        p = float(result[n])
        refs = [hd.sr.SourceImageForMeasurement.from_source_image(source.headers[z]) for z in keys.get(n, [])]
        measurement = hd.sr.Measurement(
            name=probability, value=round(p, 6), unit=no_units, algorithm_id=algo, referenced_images=refs or None
        )
        evaluations = [
            hd.sr.QualitativeEvaluation(in_fov, codes.SCT.Present if info.get("present", True) else codes.SCT.Absent),
            hd.sr.QualitativeEvaluation(cut_off, yes if info.get("cut_off") else no),
            hd.sr.QualitativeEvaluation(flagged, yes if p >= threshold else no),
        ]
        common = {
            "tracking_identifier": hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{n} fracture"),
            "finding_type": fracture,
            "finding_sites": [hd.sr.FindingSite(_sct_vertebra(n))],
            "algorithm_id": algo,
            "measurements": [measurement],
            "qualitative_evaluations": evaluations,
        }
        if n in segment_numbers:
            segment = hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID,
                sop_instance_uid=seg.SOPInstanceUID,
                segment_number=segment_numbers[n],
                source_series=hd.sr.SourceSeriesForSegmentation(source.series_uid),
            )
            roi = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_segment=segment, **common)
            groups.append(roi)
        else:
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(**common))
    p_patient = float(result[PATIENT])
    groups.append(
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="patient fracture"),
            finding_type=fracture,
            finding_sites=[hd.sr.FindingSite(codes.SCT.CervicalSpine)],
            algorithm_id=algo,
            measurements=[hd.sr.Measurement(name=probability, value=round(p_patient, 6), unit=no_units,
                                            algorithm_id=algo)],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(flagged, yes if p_patient >= threshold else no)],
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=Code("418023006", "SCT", "CT of cervical spine"),
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*source.headers, seg],
        content=report,
        **_new_series("sr"),
        is_complete=True,
        series_description="cspine fracture probabilities",
    )
    _fill_type2(sr)
    return sr


def build_ko(source: SourceSeries, keys: Mapping[str, list[int]], result: Mapping[str, Any]) -> Any | None:
    """A Key Object Selection of the flagged vertebrae's key slices (None when nothing is flagged)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    zs = sorted({z for zz in keys.values() for z in zz})
    if not zs:
        return None
    name, _ = _algorithm(result)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(uid=hd.UID(), name="cspine"),
    )
    described = ", ".join(f"{n} p={float(result[n]):.2f}" for n in keys)
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest,
        referenced_objects=[source.headers[z] for z in zs],
        observer_device_context=observer,
        description=f"cspine: slices where the fracture score peaks ({described})"[:1024],
    )
    ko = hd.ko.KeyObjectSelectionDocument(
        evidence=[source.headers[z] for z in zs],
        content=content,
        **_new_series("ko"),
        series_description=f"cspine key slices ({name})"[:64],
    )
    _fill_type2(ko)
    return ko


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
