"""The DICOM SEG of C1..C7: a binary Segmentation whose frames are the source CT slices, one segment per vertebra
in view, labelled with its SNOMED CT code (highdicom).

Apart from the SR and key-object builders (:mod:`cspine.dicom_out.reports`), which reference its segments.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

from cspine import __version__
from cspine.dicom_out.source import SourceSeries, _algorithm, _fill_type2, _new_series
from cspine.errors import CspineInputError
from cspine.labels import CERVICAL, LABEL_VALUES


def _sct_vertebra(name: str) -> Any:
    from pydicom.sr.codedict import codes

    return getattr(codes.SCT, f"{name}Vertebra")


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
