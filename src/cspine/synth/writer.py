"""Write synthetic studies in the RSNA layout: DICOM series, NIfTI masks and the CSV tables.

Why this is its own module: file fidelity is what the readers are tested against, so every encoding that real RSNA
files vary in (transfer syntax, stored bits, signedness, intercept, which end is instance 1, mask axis order) is
defined here, explicitly; folder, file and column names come from :mod:`cspine.data.rsna`, the module that reads
them; every write is atomic (a study folder appears complete or not at all). The writer knows nothing of how a
study was generated: it takes anything shaped like :class:`SeriesSource`.

Encoding happens in-process: JPEG Lossless SV1 through python-gdcm's ImageChangeTransferSyntax (pydicom cannot
encode it), JPEG 2000 lossless and RLE through pydicom 3's ``Dataset.compress`` with the pylibjpeg plugins.
All are lossless; :func:`encode_frame` is checked by the tests to round-trip exactly.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    PYDICOM_ROOT_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)

from cspine.data.rsna import (
    BOX_COLUMNS,
    BOXES_CSV,
    SAMPLE_SUBMISSION_CSV,
    SUBMISSION_COLUMNS,
    TEST_COLUMNS,
    TEST_CSV,
    TRAIN_COLUMNS,
    TRAIN_CSV,
    slice_filename,
)
from cspine.io.volume import Volume
from cspine.labels import PREDICTION_TYPES, row_id

#: Transfer syntaxes used, cycled across studies so any four consecutive studies contain all of them.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, Non-Hierarchical, First-Order Prediction (SV1)
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.5",  # RLE Lossless
)

#: Pixel storage variants: (name, RescaleIntercept, PixelRepresentation, BitsStored).
STORAGE: tuple[tuple[str, float, int, int], ...] = (
    ("u12", -1024.0, 0, 12),  # the common RSNA case
    ("u16", -1024.0, 0, 16),
    ("s16", 0.0, 1, 16),  # signed HU, intercept 0
    ("s16i", -1024.0, 1, 16),
)


class SeriesSource(Protocol):
    """What the writer needs of a study: its UID, HU volume (with instance numbers), mask and encoding choices."""

    uid: str
    volume: Volume
    mask: np.ndarray
    storage: str
    transfer_syntax: str


def _jpeg_lossless_sv1(stored: np.ndarray, bits_stored: int, signed: bool) -> bytes:
    """One frame -> JPEG Lossless SV1 codestream via GDCM (in-process, no temp files)."""
    import gdcm

    rows, cols = stored.shape
    writer = gdcm.ImageWriter()
    image = writer.GetImage()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((cols, rows, 1))
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(gdcm.PhotometricInterpretation.MONOCHROME2))
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.ImplicitVRLittleEndian))
    image.SetPixelFormat(gdcm.PixelFormat(1, 16, bits_stored, bits_stored - 1, int(signed)))
    elem = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    elem.SetByteStringValue(stored.astype("<i2" if signed else "<u2").tobytes())
    image.SetDataElement(elem)
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(image)
    if not change.Change():
        raise RuntimeError("GDCM could not encode JPEG Lossless SV1")
    seq = change.GetOutput().GetDataElement().GetSequenceOfFragments()
    if seq is None or seq.GetNumberOfFragments() != 1:
        raise RuntimeError("GDCM returned an unexpected number of JPEG fragments")
    # GDCM's SWIG binding hands bytes back as a surrogate-escaped str (same trick as pydicom's gdcm encoder)
    return seq.GetFragment(0).GetByteValue().GetBuffer().encode("utf-8", "surrogateescape")


def set_pixels(ds: Dataset, stored: np.ndarray, syntax: str) -> None:
    """Put ``stored`` (uint16 or int16, 2-D) into ``ds`` under ``syntax``; pixel module tags must be set."""
    signed = bool(ds.PixelRepresentation)
    arr = stored.astype(np.int16 if signed else np.uint16)
    if syntax == ExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = arr.tobytes()
        ds["PixelData"].VR = "OW"
    elif syntax == JPEGLosslessSV1:
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.PixelData = encapsulate([_jpeg_lossless_sv1(arr, int(ds.BitsStored), signed)])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    elif syntax in (JPEG2000Lossless, RLELossless):
        ds.compress(UID(syntax), arr, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    else:
        raise ValueError(f"unsupported transfer syntax {syntax}")


def encode_frame(stored: np.ndarray, syntax: str, bits_stored: int, signed: bool) -> bytes:
    """A minimal one-frame CT file in memory (for round-trip tests of the codecs)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["frame"])
    _pixel_module(ds, stored.shape, bits_stored, signed)
    set_pixels(ds, stored, syntax)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _pixel_module(ds: Dataset, shape: tuple[int, ...], bits_stored: int, signed: bool) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(shape[0]), int(shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)


def _ds_str(x: float) -> str:
    """DICOM DS value: at most 16 characters, no exponent for sensible magnitudes."""
    s = f"{x:.6f}".rstrip("0").rstrip(".")
    return s if s not in ("-0", "") else "0"


def write_series(study: SeriesSource, folder: Path, patient_number: int) -> int:
    """Write ``study`` as ``folder/<InstanceNumber>.dcm`` atomically; returns bytes written.

    The folder is first written as a hidden sibling and renamed into place, replacing any older copy.
    """
    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    vol = study.volume
    _name, intercept, signed, bits = next(s for s in STORAGE if s[0] == study.storage)
    uid = study.uid
    ent = ["cspine-synth", uid]
    series_uid = generate_uid(PYDICOM_ROOT_UID, entropy_srcs=[*ent, "series"])
    for_uid = generate_uid(PYDICOM_ROOT_UID, entropy_srcs=[*ent, "frame-of-reference"])
    dz, dy, dx = vol.spacing
    origin = vol.affine[:3, 3]
    date = f"2022{1 + patient_number % 12:02d}{1 + patient_number % 28:02d}"
    base: dict[str, Any] = {
        "SpecificCharacterSet": "ISO_IR 100",
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "SOPClassUID": CTImageStorage,
        "StudyDate": date,
        "SeriesDate": date,
        "StudyTime": "120000",
        "AccessionNumber": "",
        "Modality": "CT",
        "Manufacturer": "CSPINE SYNTHETIC",
        "ManufacturerModelName": "cspine-synth",
        "ReferringPhysicianName": "",
        "StudyDescription": "CT CERVICAL SPINE WO CONTRAST",
        "SeriesDescription": "BONE 1.0" if dz <= 1.0 else "BONE",
        "PatientName": f"SYNTH^{patient_number}",
        "PatientID": f"SYNTH{patient_number:05d}",
        "PatientBirthDate": "",
        "PatientSex": "O",
        "BodyPartExamined": "CSPINE",
        "SliceThickness": _ds_str(dz),
        "KVP": "120",
        "ConvolutionKernel": "BONE",
        "PatientPosition": "HFS",
        "StudyInstanceUID": uid,
        "SeriesInstanceUID": series_uid,
        "StudyID": "1",
        "SeriesNumber": 2,
        "FrameOfReferenceUID": for_uid,
        "PositionReferenceIndicator": "",
        "ImageOrientationPatient": ["1", "0", "0", "0", "1", "0"],
        "PixelSpacing": [_ds_str(dy), _ds_str(dx)],
        "RescaleIntercept": _ds_str(intercept),
        "RescaleSlope": "1",
        "RescaleType": "HU",
        "WindowCenter": "500",
        "WindowWidth": "2000",
    }
    total = 0
    for k in range(vol.shape[0]):
        inst = int(vol.instance_numbers[k])
        sop = generate_uid(PYDICOM_ROOT_UID, entropy_srcs=[*ent, "sop", str(inst)])
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.ImplementationVersionName = "CSPINE_SYNTH"
        for key, value in base.items():
            setattr(ds, key, value)
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = inst
        z = float(origin[2] + k * dz)
        ds.ImagePositionPatient = [_ds_str(float(origin[0])), _ds_str(float(origin[1])), _ds_str(z)]
        ds.SliceLocation = _ds_str(z)
        _pixel_module(ds, vol.shape[1:], bits, bool(signed))
        stored = vol.array[k].astype(np.int32) - int(intercept)
        set_pixels(ds, stored, study.transfer_syntax)
        path = tmp / slice_filename(inst)
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return total


def nifti_bytes(study: SeriesSource) -> bytes:
    """The study's mask as an RSNA-style NIfTI-1 file (bytes).

    RSNA stores the data array as (x, y, z) = (column, mirrored row, slice in ascending patient z), which is why
    ``seg[:, ::-1, ::-1].transpose(2, 1, 0)`` works for studies whose instance 1 is the top slice and fails for the
    others. The affine here is the correct one (RAS+), so alignment through geometry works for both.
    """
    import nibabel as nib

    vol = study.volume
    dz, dy, dx = vol.spacing
    n_rows = vol.shape[1]
    data = np.ascontiguousarray(study.mask.transpose(2, 1, 0)[:, ::-1, :])
    x0, y0, z0 = (float(v) for v in vol.affine[:3, 3])  # LPS of voxel (0, 0, 0), the lowest slice
    aff = np.array(
        [
            [-dx, 0.0, 0.0, -x0],
            [0.0, dy, 0.0, -(y0 + (n_rows - 1) * dy)],
            [0.0, 0.0, dz, z0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    img = nib.Nifti1Image(data.astype(np.uint8), aff)
    img.header.set_xyzt_units("mm")
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    return img.to_bytes()


def write_atomic(path: Path, data: bytes) -> int:
    """Write bytes to ``path`` via a temporary sibling and ``os.replace``; returns the size."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return len(data)


def csv_bytes(rows: Sequence[Sequence[Any]]) -> bytes:
    """CSV bytes with '\n' line ends and plain formatting, so equal inputs give equal bytes on every platform."""
    out = io.StringIO()
    for r in rows:
        out.write(",".join(_fmt(v) for v in r) + "\n")
    return out.getvalue().encode()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(round(v, 3)) if not v.is_integer() else f"{v:.1f}"
    return str(v)


def write_tables(
    out: Path, train: Sequence[tuple[str, dict[str, int], Sequence[dict[str, Any]]]], test_uids: Sequence[str]
) -> int:
    """Write train.csv, train_bounding_boxes.csv, test.csv and sample_submission.csv; returns bytes written.

    ``train`` holds (uid, labels, published boxes) per training study, ``test_uids`` the test studies, in order.
    """
    out = Path(out)
    nbytes = write_atomic(
        out / TRAIN_CSV,
        csv_bytes([list(TRAIN_COLUMNS)] + [[uid, *(labels[p] for p in PREDICTION_TYPES)] for uid, labels, _ in train]),
    )
    box_rows: list[list[Any]] = [list(BOX_COLUMNS)]
    for uid, _, boxes in train:
        box_rows += [
            [uid, float(b["x"]), float(b["y"]), float(b["width"]), float(b["height"]), b["slice_number"]] for b in boxes
        ]
    nbytes += write_atomic(out / BOXES_CSV, csv_bytes(box_rows))
    test_rows: list[list[Any]] = [list(TEST_COLUMNS)]
    sub_rows: list[list[Any]] = [list(SUBMISSION_COLUMNS)]
    for uid in test_uids:
        for p in PREDICTION_TYPES:
            test_rows.append([row_id(uid, p), uid, p])
            sub_rows.append([row_id(uid, p), 0.5])
    nbytes += write_atomic(out / TEST_CSV, csv_bytes(test_rows))
    nbytes += write_atomic(out / SAMPLE_SUBMISSION_CSV, csv_bytes(sub_rows))
    return nbytes
