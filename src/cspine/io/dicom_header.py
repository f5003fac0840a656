"""The header pass: what one DICOM file declares before any pixel is decoded.

Series identity, geometry, encoding and non-identifying metadata of each file become one :class:`_Header`, the
record every later step works on. Why here and first: declared sizes are checked against :mod:`cspine.io.limits`
before anything is allocated (a deflated data set is measured in bounded chunks before pydicom inflates it whole),
a truncated CT slice is an error, and a file that is not an image (DICOMDIR, a structured report) is skipped.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

from cspine.errors import ResourceLimitError
from cspine.io import limits

_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
#: Non-geometric header fields kept as (non-identifying) metadata.
_INFO_TAGS = (
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "SliceThickness",
    "SpacingBetweenSlices",
    "BitsStored",
    "PixelRepresentation",
    "RescaleIntercept",
    "RescaleSlope",
    "ConvolutionKernel",
    "KVP",
    "ImageType",
    "NumberOfFrames",
)
#: What the header pass reads (geometry, identity of the series, and the metadata above).
_HEADER_TAGS = [
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    *_INFO_TAGS,
]
#: CT image storage classes (CT, enhanced CT, legacy converted enhanced CT): such a file without Rows or pixel
#: data is a truncated slice, not a file to skip.
_CT_IMAGE_CLASSES = {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}


@dataclass(frozen=True)
class _Header:
    """What the header pass learns about one file, before any pixel is decoded."""

    path: str
    study_uid: str
    series_uid: str
    instance_number: int
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    rows: int
    columns: int
    transfer_syntax: str
    info: dict[str, Any]


def _read_header(path: str) -> _Header | str | None:
    """Parse one file's header. None for a non-image file (ignored); a string is an error message."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        _check_deflated(path)
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        ds._cspine_header_only = True
    except InvalidDicomError:
        return None  # not DICOM at all (text file, thumbnail, ...): ignore
    except ResourceLimitError as exc:
        return str(exc)
    except Exception as exc:  # truncated header, bad VR ...
        return f"{path}: corrupt DICOM header ({type(exc).__name__}: {exc})"
    return _header_from(ds, path)


_DEFLATED = "1.2.840.10008.1.2.1.99"


def _check_deflated(path: str) -> None:
    """A Deflated Explicit VR data set is inflated whole by pydicom; refuse one that inflates past what a slice
    within the ``max_slice_pixels`` limit can hold, counting in bounded chunks (a 2 MB file can inflate to 2 GB)."""
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_file_meta_info

    try:
        meta = read_file_meta_info(path)
    except (InvalidDicomError, OSError, ValueError, KeyError, EOFError, TypeError, AttributeError):
        return  # no usable file meta: dcmread says what is wrong
    if str(meta.get("TransferSyntaxUID", "")) != _DEFLATED:
        return
    cap = limits.active().max_slice_pixels * 4 + (16 << 20)
    inflate = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    with open(path, "rb") as f:
        f.seek(_meta_end(f))
        while chunk := f.read(1 << 16):
            data = chunk
            while data:
                total += len(inflate.decompress(data, 1 << 20))
                data = inflate.unconsumed_tail
                if total > cap:
                    raise ResourceLimitError(
                        f"{path}: deflated DICOM inflates to more than {cap:,} bytes, more than a slice within the "
                        f"limit of {limits.active().max_slice_pixels:,} pixels holds "
                        f"({limits.OPTIONS['max_slice_pixels']} raises it)"
                    )
            if inflate.eof:
                break


def _meta_end(f: Any) -> int:
    """Byte offset where the data set starts after the preamble and the group-2 file meta elements."""
    import struct

    f.seek(0)
    start = 132 if f.read(132)[128:132] == b"DICM" else 0
    f.seek(start)
    while True:
        head = f.read(6)
        if len(head) < 6 or struct.unpack("<H", head[:2])[0] != 2:
            return start
        vr = head[4:6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            length = struct.unpack("<I", f.read(6)[2:])[0]
            start += 12 + length
        else:
            length = struct.unpack("<H", f.read(2))[0]
            start += 8 + length
        f.seek(start)


def _header_from(ds: Any, path: str) -> _Header | str | None:
    """The geometry and encoding facts of a parsed dataset (see :func:`_read_header`)."""
    meta = getattr(ds, "file_meta", None)
    sop_class = str(getattr(meta, "MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
    if sop_class in _CT_IMAGE_CLASSES and ("Rows" not in ds or ("PixelData" not in ds and not _header_only(ds))):
        return f"{path}: truncated or corrupt CT image (no {'Rows' if 'Rows' not in ds else 'pixel data'} element)"
    if sop_class == _DICOMDIR_CLASS or "Rows" not in ds:
        return None  # DICOMDIR, structured report, ...: not an image
    try:
        ts = str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else "1.2.840.10008.1.2"
        ipp = ds.get("ImagePositionPatient")
        iop = ds.get("ImageOrientationPatient")
        ps = ds.get("PixelSpacing")
        info = {key: _plain(ds.get(key)) for key in _INFO_TAGS if key in ds}
        rows, columns, frames = int(ds.Rows), int(ds.Columns), int(ds.get("NumberOfFrames") or 1)
        declared = f"{path}: {rows} x {columns} pixels x {frames} frame(s)"
        limits.check("max_slice_pixels", rows * columns * frames, declared)
        return _Header(
            path=path,
            study_uid=str(ds.get("StudyInstanceUID", "")),
            series_uid=str(ds.get("SeriesInstanceUID", "")),
            instance_number=int(ds.get("InstanceNumber") or 0),
            position=tuple(float(v) for v in ipp) if ipp is not None and len(ipp) == 3 else None,
            orientation=tuple(round(float(v), 6) for v in iop) if iop is not None and len(iop) == 6 else None,
            pixel_spacing=(float(ps[0]), float(ps[1])) if ps is not None and len(ps) == 2 else None,
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            transfer_syntax=ts,
            info=info,
        )
    except ResourceLimitError as exc:
        return str(exc)
    except Exception as exc:
        return f"{path}: unreadable geometry in DICOM header ({type(exc).__name__}: {exc})"


def _header_only(ds: Any) -> bool:
    """True for a dataset read with stop_before_pixels (the header pass), where no PixelData is expected."""
    return bool(getattr(ds, "_cspine_header_only", False))


def _read_dataset(path: str) -> Any:
    """Read a whole file; a file that ends before its last element (pydicom only warns) is corrupt."""
    import warnings

    import pydicom

    _check_deflated(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = pydicom.dcmread(path)
    for w in caught:
        text = str(w.message)
        if "End of file" in text or "truncat" in text.lower():
            raise ValueError(f"file ends early: {text}")
    return ds


def _plain(value: Any) -> Any:
    """DICOM values (DS, IS, MultiValue, PersonName ...) -> JSON-friendly Python values."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_plain(v) for v in value]
    if isinstance(value, (int, float)):
        if not math.isfinite(float(value)):
            return None
        return int(value) if float(value).is_integer() and not isinstance(value, float) else float(value)
    text = str(value)
    try:
        number = float(text)
    except ValueError:
        return text
    if not math.isfinite(number):
        return None  # NaN / inf in a header field: not a value (and not valid JSON)
    return int(number) if number.is_integer() and "." not in text else number
