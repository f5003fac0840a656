"""One slice's pixels to int16 Hounsfield units: :func:`read_hu` and the decoding it shares with the pool.

Every transfer syntax goes through pydicom's backends (GDCM, OpenJPEG, RLE; no GPL decoders), with libjpeg-turbo
(through imagecodecs, BSD) as the fallback for the 12-bit and progressive JPEG those refuse. Why careful: a misread
slice silently spoils every later number, so decoded values must fit the declared bit depth, a J2K codestream's
signedness wins over the header's, and the modality LUT's result must fit int16. Each failure is one
:class:`~cspine.io.dicom_error.DicomError` naming the file and, where it matters, the transfer syntax.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from cspine.errors import ResourceLimitError
from cspine.io.dicom_error import DicomError
from cspine.io.dicom_header import _header_from, _read_dataset

log = logging.getLogger(__name__)

#: Video transfer syntaxes: no CT series comes this way and no installed backend decodes them.
UNSUPPORTED_SYNTAXES: dict[str, str] = {
    "1.2.840.10008.1.2.4.100": "MPEG2 Main Profile / Main Level",
    "1.2.840.10008.1.2.4.101": "MPEG2 Main Profile / High Level",
    "1.2.840.10008.1.2.4.102": "MPEG-4 AVC/H.264 High Profile",
    "1.2.840.10008.1.2.4.103": "MPEG-4 AVC/H.264 BD-compatible High Profile",
    "1.2.840.10008.1.2.4.104": "MPEG-4 AVC/H.264 High Profile for 2D Video",
    "1.2.840.10008.1.2.4.105": "MPEG-4 AVC/H.264 High Profile for 3D Video",
    "1.2.840.10008.1.2.4.106": "MPEG-4 AVC/H.264 Stereo High Profile",
    "1.2.840.10008.1.2.4.107": "HEVC/H.265 Main Profile",
    "1.2.840.10008.1.2.4.108": "HEVC/H.265 Main 10 Profile",
}
#: JPEG (ISO 10918) syntaxes that GDCM/Pillow refuse at 12 bits or when progressive; libjpeg-turbo
#: (through imagecodecs, BSD) decodes them, so they are retried there.
_JPEG_FALLBACK = {
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.53",
    "1.2.840.10008.1.2.4.55",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
}
_J2K = {
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
}


def read_hu(path: str) -> np.ndarray:
    """Decode one single-frame slice to HU as int16 (rescale applied, J2K sign mismatch corrected).

    Raises DicomError naming the file and transfer syntax when the pixels cannot be decoded.
    """

    try:
        ds = _read_dataset(path)
    except ResourceLimitError:
        raise
    except Exception as exc:
        raise DicomError(f"{path}: corrupt DICOM file ({type(exc).__name__}: {exc})") from exc
    header = _header_from(ds, path)
    if isinstance(header, str):
        raise DicomError(header)
    try:
        return _decode_ds(ds, path)
    except (KeyboardInterrupt, SystemExit):
        raise
    except DicomError:
        raise
    except BaseException as exc:  # a native decoder's panic (pyo3 PanicException is a BaseException)
        raise DicomError(_decoder_failed(path, exc)) from None


def _decoder_failed(path: str, exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{path}: the pixel decoder failed on this file ({type(exc).__name__}: {first}); corrupt pixel data"


def _decode_ds(ds: Any, path: str) -> np.ndarray:
    """Pixels of a parsed single-frame dataset as int16 HU (see :func:`read_hu`)."""
    ts = str(ds.file_meta.TransferSyntaxUID) if "TransferSyntaxUID" in ds.file_meta else "1.2.840.10008.1.2"
    if ts in UNSUPPORTED_SYNTAXES:
        raise DicomError(
            f"{path}: unsupported transfer syntax {ts} ({UNSUPPORTED_SYNTAXES[ts]}); not a CT slice encoding"
        )
    if "PixelData" not in ds:
        raise DicomError(f"{path}: no pixel data")
    if int(ds.get("NumberOfFrames") or 1) != 1:
        raise DicomError(f"{path}: multi-frame images ({ds.NumberOfFrames} frames) are not supported")
    try:
        stored = ds.pixel_array
    except Exception as exc:
        stored = _fallback_decode(ds, ts) if ts in _JPEG_FALLBACK else None
        if stored is None:
            name = getattr(ds.file_meta.TransferSyntaxUID, "name", ts)
            raise DicomError(f"{path}: cannot decode pixel data ({name}, {ts}): {type(exc).__name__}: {exc}") from exc
    if stored.ndim != 2:
        raise DicomError(f"{path}: expected a 2-D grayscale slice, got pixel array of shape {stored.shape}")
    if ts in _J2K and int(ds.get("PixelRepresentation", 0)) == 0:
        stored = _j2k_signed_fix(ds, stored)
    _check_bit_depth(ds, stored, path)
    return _to_hu(ds, stored, path)


def _check_bit_depth(ds: Any, stored: np.ndarray, path: str) -> None:
    """Stored values must fit the declared BitsStored: a codec fed a corrupt stream can return any numbers."""
    bits = int(ds.get("BitsStored") or 0)
    if not 1 <= bits < 32 or not stored.size:
        return
    if stored.dtype.kind == "i" or int(ds.get("PixelRepresentation", 0)) == 1:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        lo, hi = 0, (1 << bits) - 1
    smin, smax = int(stored.min()), int(stored.max())
    if smin < lo or smax > hi:
        raise DicomError(
            f"{path}: decoded values {smin}..{smax} lie outside the declared {bits}-bit range {lo}..{hi}; "
            "corrupt pixel data"
        )


def _first_frame(ds: Any) -> bytes:
    from pydicom.encaps import generate_frames

    return next(generate_frames(ds.PixelData, number_of_frames=1))


def _fallback_decode(ds: Any, ts: str) -> np.ndarray | None:
    """Decode ISO 10918 JPEG with libjpeg-turbo (12-bit and progressive included); None if that fails too."""
    try:
        import imagecodecs

        arr = imagecodecs.jpeg8_decode(_first_frame(ds))
    except Exception:
        return None
    if arr.shape != (int(ds.Rows), int(ds.Columns)):
        return None
    log.debug("decoded %s with libjpeg-turbo fallback", ts)
    return arr


def _j2k_signed_fix(ds: Any, stored: np.ndarray) -> np.ndarray:
    """The J2K codestream says signed but the header says unsigned (PixelRepresentation 0): trust the codestream.

    Without this, negative values wrap (air reads as ~65000) on some Toshiba files.
    """
    from pydicom.pixels.utils import get_j2k_parameters

    params = get_j2k_parameters(_first_frame(ds))
    if not params.get("is_signed"):
        return stored
    bits = int(params.get("precision") or ds.BitsStored)
    out = stored.astype(np.int32)
    out[out >= 1 << (bits - 1)] -= 1 << bits
    return out


def _to_hu(ds: Any, stored: np.ndarray, path: str) -> np.ndarray:
    """Apply the modality LUT (RescaleSlope/Intercept or a LUT sequence) and return rounded int16 HU."""
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        hu = apply_modality_lut(stored, ds)
    else:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        if slope == 1.0 and intercept.is_integer():
            hu = stored.astype(np.int32) + int(intercept)
        else:
            hu = np.rint(stored.astype(np.float64) * slope + intercept)
    lo, hi = np.iinfo(np.int16).min, np.iinfo(np.int16).max
    if hu.size and (hu.min() < lo or hu.max() > hi):
        raise DicomError(
            f"{path}: HU values {hu.min()}..{hu.max()} do not fit int16: a wrong RescaleSlope/Intercept, or corrupt "
            "pixel data"
        )
    return hu.astype(np.int16)
