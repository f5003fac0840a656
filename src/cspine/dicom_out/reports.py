"""The Comprehensive 3D SR (TID 1500: per vertebra a fracture probability, whether it is in view or cut off, and
references to its SEG segment and key slices) and the Key Object Selection of those key slices (highdicom).

Apart from the SEG (:mod:`cspine.dicom_out.segmentation`) because these are the reports about it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cspine.dicom_out.segmentation import _sct_vertebra
from cspine.dicom_out.source import SourceSeries, _algorithm, _fill_type2, _new_series
from cspine.labels import CERVICAL, LABEL_VALUES, PATIENT


def _private(value: str, meaning: str) -> Any:
    """A concept of cspine's own coding scheme (private schemes start with 99)."""
    from pydicom.sr.coding import Code

    return Code(value, "99CSPINE", meaning)


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
