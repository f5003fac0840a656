"""DICOM series -> :class:`~cspine.io.volume.Volume`, exact and fast.

Why this module is careful: a slice out of order, a mirrored axis or a misread JPEG
silently spoils every later number. So slices are ordered by ImagePositionPatient
along the slice normal (never by file name or InstanceNumber), the slice spacing is
measured from positions, every transfer syntax is decoded by pydicom's backends
(GDCM, OpenJPEG, RLE; no GPL decoders) and each problem is reported as one
:class:`DicomError` naming the file and what is wrong with it.

Decoding runs in a process pool that writes straight into a shared RAM-backed buffer, so a
300-slice JPEG-Lossless study costs one header pass plus a parallel decode. It always runs in child processes:
a native decoder that panics (pyo3's PanicException is a BaseException, which ``except Exception`` misses) or
crashes takes down a worker, never the caller; a worker that dies is replaced and the file it was decoding is
reported by name. Declared sizes are checked against :mod:`cspine.io.limits` before anything is allocated.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import shutil
import signal
import stat
import tempfile
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from cspine.errors import CspineInputError, ResourceLimitError
from cspine.io import limits
from cspine.io.volume import Volume, affine_from_dicom, check_geometry

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
#: Angle (degrees) between the slice normal and the slice-to-slice direction above which a series is tilted.
_TILT_TOLERANCE_DEG = 0.5
#: A single position step that is a whole multiple (at least this factor) of the step beside it: a missing slice.
_GAP_FACTOR = 1.5


class DicomError(CspineInputError):
    """A DICOM input cannot be read as a consistent CT volume; the message names the file(s) and the problem."""


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


# ----------------------------------------------------------------------------------------------------------------------
# Finding the files
# ----------------------------------------------------------------------------------------------------------------------


@contextmanager
def _input_files(path: Path) -> Iterable[list[Path]]:
    """Yield the candidate files of a folder, a zip (extracted safely to a temporary folder) or one file."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DicomError(f"{path}: no such file or folder") from None
    except OSError as exc:  # a name longer than PATH_MAX, a loop of links, no permission ...
        raise DicomError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        yield sorted(p for p in path.rglob("*") if p.is_file())
    elif not stat.S_ISREG(st.st_mode):  # a named pipe would block the first read forever
        raise DicomError(f"{path}: not a regular file or folder (a named pipe, socket or device); give a file")
    elif zipfile.is_zipfile(path):
        with tempfile.TemporaryDirectory(prefix="cspine-zip-") as tmp:
            yield _extract_zip(path, Path(tmp))
    else:
        yield [path]


def _extract_zip(path: Path, dest: Path) -> list[Path]:
    """Extract every member of a zip under ``dest``; refuse members that would land outside it, and zips whose
    members add up to more than the ``max_zip_bytes`` limit (declared sizes checked first, bytes counted while
    extracting, since a forged header can understate them)."""
    out: list[Path] = []
    cap = limits.active().max_zip_bytes
    try:
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            for m in members:
                name = PurePosixPath(m.filename.replace("\\", "/"))
                if name.is_absolute() or ".." in name.parts or (name.parts and ":" in name.parts[0]):
                    raise DicomError(
                        f"{path}: zip member {m.filename!r} has an absolute or '..' path; refusing to extract"
                    )
            limits.check("max_zip_bytes", sum(m.file_size for m in members), f"{path}: uncompressed size of the zip")
            written = 0
            for i, m in enumerate(members):
                target = dest / f"{i:06d}"  # flat, numbered names: member names never become paths
                with zf.open(m) as src, open(target, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > cap:
                            limits.check("max_zip_bytes", written, f"{path}: uncompressed size of the zip (at least)")
                        dst.write(chunk)
                out.append(target)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise DicomError(f"{path}: corrupt zip file ({type(exc).__name__}: {exc})") from exc
    except RuntimeError as exc:  # encrypted members
        raise DicomError(f"{path}: cannot extract zip ({exc})") from exc
    except OSError as exc:
        raise DicomError(f"{path}: cannot extract zip ({exc.strerror or exc})") from exc
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Header pass
# ----------------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------------
# Pixel pass
# ----------------------------------------------------------------------------------------------------------------------


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


_ScanResult = tuple[_Header | str | None, str | None]


def _scan(args: tuple[str | None, tuple[int, int, int], list[tuple[int, str]]]) -> list[tuple[int, _ScanResult]]:
    """Worker: read each file once, keep its header and, when it has the expected size, decode it into its slot.

    Returns per file (slot, (header or error or None, decode error or None)); a header whose size differs from the
    slot shape is left undecoded (decoded later if its series is chosen).
    """
    from pydicom.errors import InvalidDicomError

    buf_path, shape, jobs = args
    out = np.memmap(buf_path, dtype=np.int16, mode="r+", shape=shape) if buf_path else None
    results: list[tuple[int, _ScanResult]] = []
    try:
        for slot, path in jobs:
            try:
                ds = _read_dataset(path)
            except InvalidDicomError:
                results.append((slot, (None, None)))
                continue
            except ResourceLimitError as exc:
                results.append((slot, (str(exc), None)))
                continue
            except Exception as exc:
                results.append((slot, (f"{path}: corrupt DICOM file ({type(exc).__name__}: {exc})", None)))
                continue
            header = _header_from(ds, path)
            err = None
            if isinstance(header, _Header) and out is not None and (header.rows, header.columns) == shape[1:]:
                try:
                    out[slot] = _decode_ds(ds, path)
                except DicomError as exc:
                    err = str(exc)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException as exc:  # a native decoder's panic or any other failure on this file
                    err = _decoder_failed(path, exc)
            elif isinstance(header, _Header):
                err = ""  # not decoded here (other size): decode on demand
            results.append((slot, (header, err)))
        if out is not None:
            out.flush()
        return results
    finally:
        del out


@contextmanager
def _decode_buffer(nbytes: int) -> Iterable[Any]:
    """A file of ``nbytes`` the decoding workers write slices into, named after this process so that one left by a
    killed run can be recognised and removed (:func:`cspine.runtime.remove_stale_decode_buffers`)."""
    prefix = f"{DECODE_BUFFER_PREFIX}{os.getpid()}-"
    with tempfile.NamedTemporaryFile(prefix=prefix, suffix=".i16", dir=_shared_dir(nbytes)) as buf:
        buf.truncate(nbytes)
        yield buf


#: Name prefix of the decode buffers (followed by the owner's process id and a dash).
DECODE_BUFFER_PREFIX = "cspine-decode-"


def _decode_in_children(paths: list[str], rows: int, columns: int) -> np.ndarray:
    """Decode the given same-size slices in a child process (see :func:`_run_scan`) and return them stacked."""
    shape = (len(paths), rows, columns)
    limits.check("max_series_voxels", int(np.prod(shape)), f"{paths[0]} ...: {len(paths)} slices of {rows} x {columns}")
    with _decode_buffer(max(1, int(np.prod(shape)) * 2)) as buf:
        scanned = _run_scan(buf.name, shape, list(enumerate(paths)), 1)
        for slot, (header, err) in sorted(scanned, key=lambda t: t[0]):
            if isinstance(header, str):
                raise DicomError(header)
            if header is None or err == "":
                raise DicomError(f"{paths[slot]}: not a {rows} x {columns} DICOM image")
            if err:
                raise DicomError(err)
        mm = np.memmap(buf.name, dtype=np.int16, mode="r", shape=shape)
        array = np.array(mm)
        del mm
    return array


def _shared_dir(nbytes: int) -> str | None:
    """A RAM-backed folder for the decode buffer when it has room (Linux /dev/shm), else the temp folder.

    A container's /dev/shm is often only 64 MB, and writing past its end kills the process, so check first.
    """
    shm = "/dev/shm"
    try:
        if os.path.isdir(shm) and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * nbytes:
            return shm
    except OSError:
        pass
    return None


def _warm_decoders() -> None:
    """Import the pixel decoders once in the parent so forked workers do not each pay for it."""
    import pydicom.pixels.decoders.gdcm
    import pydicom.pixels.decoders.pylibjpeg  # noqa: F401


def default_workers() -> int:
    """Processes for decoding: one per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _mp_context() -> Any:
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _pool(workers: int) -> ProcessPoolExecutor:
    _warm_decoders()
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=_mp_context(), initializer=_init_worker, initargs=(limits.active(),)
    )


#: Address space a decoding worker may add to what it inherits: a decoder that believes a corrupt stream's
#: dimensions fails with MemoryError instead of taking the machine's memory.
_WORKER_EXTRA_BYTES = 4 << 30


def _init_worker(active: limits.Limits) -> None:
    """Set up a decoding process: the parent's limits, native stderr silenced (a Rust panic prints a backtrace
    there; the failure is reported as one line by the parent), and a cap on its address space (Linux)."""
    import faulthandler

    limits.configure(active)
    faulthandler.disable()  # a crash here is the parent's to report, in one line
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    except OSError:
        pass
    try:
        import resource

        with open("/proc/self/statm") as f:
            current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        extra = max(_WORKER_EXTRA_BYTES, 8 * active.max_slice_pixels * 8)
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        want = current + extra
        if hard == resource.RLIM_INFINITY or want < hard:
            resource.setrlimit(resource.RLIMIT_AS, (want, hard))
    except (OSError, ValueError, ImportError):
        pass


def _run_scan(
    buf_name: str | None, shape: tuple[int, int, int], jobs: list[tuple[int, str]], workers: int
) -> list[tuple[int, _ScanResult]]:
    """Header pass + decode of every job in child processes (never in this one).

    Workers take interleaved chunks. If one dies (a native crash, the kernel's OOM killer), the files whose results
    did not come back are decoded again one per fresh process, so the file that kills its process is named and the
    others are still read.
    """
    if not jobs:
        return []
    n_chunks = workers * 4 if workers > 1 else 1
    chunks = [jobs[k::n_chunks] for k in range(n_chunks) if jobs[k::n_chunks]]
    results: list[tuple[int, _ScanResult]] = []
    try:
        with _pool(min(workers, len(chunks))) as pool:
            futures = [pool.submit(_scan, (buf_name, shape, c)) for c in chunks]
            for fut in as_completed(futures):
                results.extend(fut.result())
    except BrokenProcessPool:
        got = {slot for slot, _ in results}
        left = [j for j in jobs if j[0] not in got]
        log.warning("a decoding process died; decoding %d file(s) again one per process", len(left))
        for job in left:
            results.extend(_scan_alone(buf_name, shape, job))
    return results


def _scan_alone(buf_name: str | None, shape: tuple[int, int, int], job: tuple[int, str]) -> list[tuple[int, Any]]:
    """Scan one file in its own process; a process that dies is reported as a decoder crash on that file."""
    ctx = _mp_context()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_scan_child, args=(send, limits.active(), (buf_name, shape, [job])))
    proc.start()
    send.close()
    result: Any = None
    with suppress(EOFError):  # EOF: died before answering
        result = recv.recv()
    proc.join()
    recv.close()
    if result is not None:
        return result
    code = proc.exitcode
    how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
    return [(job[0], (f"{job[1]}: the pixel decoder crashed on this file ({how}); corrupt pixel data", None))]


def _scan_child(conn: Any, active: limits.Limits, args: Any) -> None:
    _init_worker(active)
    conn.send(_scan(args))
    conn.close()


# ----------------------------------------------------------------------------------------------------------------------
# Series assembly and validation
# ----------------------------------------------------------------------------------------------------------------------


def _choose_series(headers: list[_Header], series_uid: str | None, source: Path) -> tuple[list[_Header], list[str]]:
    """Pick the requested series, or the one with most slices; return it and a note per skipped series.

    Several series of one study (a scout, a soft-tissue reconstruction) are normal; several studies are not: that is
    a dataset folder given where one study was meant (test_images/ instead of test_images/<uid>/), and answering
    for the largest of them would be a silent wrong answer.
    """
    groups: dict[str, list[_Header]] = defaultdict(list)
    for h in headers:
        groups[h.series_uid].append(h)
    studies = {h.study_uid for h in headers}
    if series_uid is None and len(studies) > 1:
        first = Path(headers[0].path).parent
        raise DicomError(
            f"{source}: holds {len(studies)} studies ({len(groups)} series), not one; point at a single study's "
            f"folder or zip (e.g. {first})"
        )
    if series_uid is not None:
        if series_uid not in groups:
            raise DicomError(
                f"{source}: series {series_uid} not found; series present: "
                + ", ".join(f"{uid} ({len(g)} files)" for uid, g in groups.items())
            )
        chosen = series_uid
    else:
        chosen = max(groups, key=lambda uid: (len(groups[uid]), uid))
    skipped = [f"{uid} ({len(g)} files)" for uid, g in groups.items() if uid != chosen]
    if skipped:
        listed = "; ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        log.info("%s: using series %s (%d files); skipped %s", source, chosen, len(groups[chosen]), listed)
    return groups[chosen], skipped


def _check_consistent(series: list[_Header]) -> None:
    """All slices must share rows/columns, orientation and pixel spacing."""
    for attr, label in (
        (lambda h: (h.rows, h.columns), "rows/columns"),
        (lambda h: h.orientation, "ImageOrientationPatient"),
        (lambda h: h.pixel_spacing, "PixelSpacing"),
    ):
        values: dict[Any, list[str]] = defaultdict(list)
        for h in series:
            values[attr(h)].append(h.path)
        if len(values) > 1:
            parts = [f"{v} in {len(p)} file(s), e.g. {p[0]}" for v, p in values.items()]
            raise DicomError(f"inconsistent {label} within one series: " + "; ".join(parts))
    first = series[0]
    if first.orientation is None or first.position is None or first.pixel_spacing is None:
        missing = [
            n
            for n, v in (
                ("ImagePositionPatient", first.position),
                ("ImageOrientationPatient", first.orientation),
                ("PixelSpacing", first.pixel_spacing),
            )
            if v is None
        ]
        if len(series) > 1 or first.pixel_spacing is None:
            raise DicomError(f"{first.path}: missing {', '.join(missing)}; cannot place the slice in space")
    assert first.pixel_spacing is not None
    if not all(math.isfinite(v) and v > 0 for v in first.pixel_spacing):
        raise DicomError(f"{first.path}: PixelSpacing {list(first.pixel_spacing)} is not a positive size in mm")
    if first.orientation is not None:
        row, col = np.array(first.orientation[:3]), np.array(first.orientation[3:])
        if not np.isfinite(first.orientation).all() or min(np.linalg.norm(row), np.linalg.norm(col)) < 1e-3:
            raise DicomError(f"{first.path}: ImageOrientationPatient {list(first.orientation)} is not two directions")
        if np.linalg.norm(np.cross(row / np.linalg.norm(row), col / np.linalg.norm(col))) < 0.5:
            raise DicomError(f"{first.path}: ImageOrientationPatient {list(first.orientation)}: rows and columns "
                             "are (nearly) parallel")  # fmt: skip
    for h in series:
        if h.position is not None and not all(math.isfinite(v) for v in h.position):
            raise DicomError(f"{h.path}: ImagePositionPatient {list(h.position)} is not a finite position")


@dataclass(frozen=True)
class _Geometry:
    order: list[int]  # indices into the series, sorted along the normal
    drop: list[tuple[int, int]]  # (duplicate left out, the kept slice at its position)
    affine: np.ndarray
    spacing: tuple[float, float, float]
    shear_px: tuple[float, float]  # per-slice in-plane shift (rows, columns) correcting gantry tilt
    tilt_deg: float
    resample_z: np.ndarray | None = None  # fractional source slice per output slice (slice spacing in regimes)
    regimes: str = ""  # what the regimes were, for the warning


def _step_runs(steps: np.ndarray) -> list[tuple[float, int]]:
    """Consecutive position steps grouped into runs of (nearly) the same step: [(mean step, count), ...]."""
    runs: list[list[float]] = []
    for st in steps:
        if runs and abs(st - np.mean(runs[-1])) <= max(0.02, 0.05 * st):
            runs[-1].append(float(st))
        else:
            runs.append([float(st)])
    return [(float(np.mean(r)), len(r)) for r in runs]


def _is_gap(runs: list[tuple[float, int]], i: int) -> bool:
    """A single step that is a whole multiple (2, 3 ...) of the step beside it: slices are missing there."""
    step, count = runs[i]
    if count != 1:
        return False
    for j in (i - 1, i + 1):
        if 0 <= j < len(runs):
            ratio = step / runs[j][0]
            if ratio > _GAP_FACTOR and abs(ratio - round(ratio)) < 0.1:
                return True
    return False


def _geometry(series: list[_Header]) -> _Geometry:
    """Sort slices along the normal, measure the step, detect gaps, duplicates and gantry tilt."""
    first = series[0]
    assert first.pixel_spacing is not None
    if first.orientation is None or first.position is None:  # lone slice without geometry: identity placement
        row, col, origin = np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.zeros(3)
    else:
        row, col, origin = np.array(first.orientation[:3]), np.array(first.orientation[3:]), np.array(first.position)
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    positions = np.array([h.position if h.position is not None else origin for h in series], dtype=np.float64)
    dist = positions @ normal
    order = [int(i) for i in np.argsort(dist, kind="stable")]
    n = len(order)
    if n == 1:
        thickness = first.info.get("SpacingBetweenSlices") or first.info.get("SliceThickness") or 1.0
        step = normal * float(thickness)
        aff = affine_from_dicom(positions[0], row, col, step, first.pixel_spacing)
        return _Geometry(order, [], aff, (float(thickness), *first.pixel_spacing), (0.0, 0.0), 0.0)

    keep: list[int] = []
    drop: list[tuple[int, int]] = []
    for idx in order:
        if keep and dist[idx] - dist[keep[-1]] < 1e-3:
            drop.append((idx, keep[-1]))
        else:
            keep.append(idx)
    if len(keep) < 2:
        raise DicomError(f"all {n} slices share one position ({series[0].path} ...); not a volume")
    kd = dist[keep]
    ksteps = np.diff(kd)
    runs = _step_runs(ksteps)
    gap_runs = [i for i in range(len(runs)) if _is_gap(runs, i)]
    if gap_runs:
        # A gap: one step a whole multiple of the step beside it. Regimes (4 mm through the skull base, then
        # 7 mm) hold each step over several slices and are resampled below.
        at = sum(c for _, c in runs[: gap_runs[0]])
        big = float(ksteps[at])
        ref = float(np.median([st for i, (st, _) in enumerate(runs) if i not in gap_runs]))
        raise DicomError(
            f"missing slice: position step {big:.3g} mm between {series[keep[at]].path} and "
            f"{series[keep[at + 1]].path} is more than {_GAP_FACTOR}x the step {ref:.3g} mm beside it "
            f"({len(gap_runs) or 1} gap(s) in {len(keep)} slices)"
        )
    kpos = positions[keep]
    resample_z = None
    regimes = ""
    n_out = len(keep)
    if len(runs) > 1:  # regimes: onto a uniform grid at the finest step, linear along the slice axis
        finest = min(st for st, _ in runs)
        n_out = round(float(kd[-1] - kd[0]) / finest) + 1
        targets = kd[0] + np.arange(n_out) * (kd[-1] - kd[0]) / (n_out - 1)
        resample_z = np.interp(targets, kd, np.arange(len(keep), dtype=np.float64))
        regimes = (
            "slice spacing changes within the series ("
            + ", ".join(f"{c} step(s) of {st:.3g} mm" for st, c in runs)
            + f"); resampled to {n_out} slices every {(kd[-1] - kd[0]) / (n_out - 1):.3g} mm"
        )
    step_vec = (kpos[-1] - kpos[0]) / (n_out - 1)
    cosang = abs(float(step_vec @ normal)) / float(np.linalg.norm(step_vec))
    tilt = math.degrees(math.acos(min(1.0, cosang)))
    dy, dx = first.pixel_spacing
    shear = (0.0, 0.0)
    if tilt > _TILT_TOLERANCE_DEG:
        # Slice planes are parallel but their origins drift in-plane (gantry tilt). Each plane is exact, so the
        # correction is an in-plane shift per slice; the slice axis becomes the true normal.
        inplane = step_vec - (step_vec @ normal) * normal
        shear = (float(inplane @ col) / dy, float(inplane @ row) / dx)
        step_vec = (step_vec @ normal) * normal
        mid = (n_out - 1) / 2.0
        origin0 = kpos[0] + mid * inplane  # centre the corrected grid on the middle slice
    else:
        origin0 = kpos[0]
    aff = affine_from_dicom(origin0, row, col, step_vec, first.pixel_spacing)
    dz = float(np.linalg.norm(step_vec))
    return _Geometry(keep, drop, aff, (dz, dy, dx), shear, tilt, resample_z, regimes)


def _correct_tilt(array: np.ndarray, shear_px: tuple[float, float], fill: float) -> np.ndarray:
    """Shift slice k in-plane by (k - mid) * shear so the stack becomes orthogonal (linear interpolation)."""
    from scipy import ndimage

    mid = (array.shape[0] - 1) / 2.0
    out = np.empty_like(array)
    for k in range(array.shape[0]):
        shift = ((k - mid) * shear_px[0], (k - mid) * shear_px[1])
        out[k] = np.rint(ndimage.shift(array[k].astype(np.float32), shift, order=1, mode="constant", cval=fill))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------------


def load_series(
    path: str | os.PathLike[str],
    series_uid: str | None = None,
    workers: int | None = None,
    hu_offset: float | None = None,
) -> Volume:
    """Read a CT series into a :class:`Volume` (int16 HU, (z, y, x), sorted along the slice normal).

    Args:
        path: a folder (searched recursively, any file names), a .zip, or one DICOM file.
        series_uid: pick this SeriesInstanceUID; by default the series with the most slices.
        workers: decoding processes; default one per available core.
        hu_offset: added to every value, for a series whose rescale was lost (air reads 0: ``-1024``). Never
            guessed: only the user can say it.

    Raises:
        DicomError: empty input, corrupt or undecodable slices, missing or duplicate slices, inconsistent or
            impossible geometry, a modality other than CT, unsafe zip members. The message names the file(s)
            and the problem.
        ResourceLimitError: declared sizes beyond :mod:`cspine.io.limits`.

    Example:
        >>> vol = load_series("study_dir")  # doctest: +SKIP
        >>> vol.array.shape, vol.spacing  # doctest: +SKIP
    """
    src = Path(path)
    workers = default_workers() if workers is None else max(1, int(workers))
    with _input_files(src) as files:
        if not files:
            raise DicomError(f"{src}: empty input (no files)")
        size = _probe_size(files)
        shape = (len(files), *size) if size else (0, 0, 0)
        if size:
            declared = f"{src}: {len(files)} files of {size[0]} x {size[1]} pixels"
            limits.check("max_series_voxels", int(np.prod(shape)), declared)
        nbytes = max(1, int(np.prod(shape)) * 2)
        workers = workers if len(files) >= 4 * workers else 1
        with _decode_buffer(nbytes) as buf:
            jobs = [(slot, str(f)) for slot, f in enumerate(files)]
            buf_name = buf.name if size else None
            scanned = _run_scan(buf_name, shape, jobs, workers)
            scanned.sort(key=lambda t: t[0])
            errors = [h for _, (h, _) in scanned if isinstance(h, str)]
            headers = [h for _, (h, _) in scanned if isinstance(h, _Header)]
            if not headers and errors and limits.names_a_limit(errors[0]):
                raise ResourceLimitError(errors[0])
            if not headers:
                detail = f"; {len(errors)} corrupt: {errors[0]}" if errors else ""
                raise DicomError(f"{src}: no DICOM image found among {len(files)} file(s){detail}")
            if errors:
                more = f" (and {len(errors) - 1} more corrupt files)" if len(errors) > 1 else ""
                kind = ResourceLimitError if limits.names_a_limit(errors[0]) else DicomError
                raise kind(errors[0] + more)
            series, skipped = _choose_series(headers, series_uid, src)
            _check_modality(series)
            for h in series:
                if h.transfer_syntax in UNSUPPORTED_SYNTAXES:
                    raise DicomError(
                        f"{h.path}: unsupported transfer syntax {h.transfer_syntax} "
                        f"({UNSUPPORTED_SYNTAXES[h.transfer_syntax]}); not a CT slice encoding"
                    )
            _check_consistent(series)
            geo = _geometry(series)
            decode_error = {h.path: err for _, (h, err) in scanned if isinstance(h, _Header)}
            slot_of = {h.path: slot for slot, (h, _) in scanned if isinstance(h, _Header)}
            array = _assemble(series, geo, buf_name, shape, slot_of, decode_error)
    _check_neighbours(array, [series[i].path for i in geo.order])
    kept = [series[i] for i in geo.order]
    instance_numbers = np.array([h.instance_number for h in kept], dtype=np.int64)
    if geo.resample_z is not None:
        array, nearest = _resample_slices(array, geo.resample_z)
        instance_numbers = instance_numbers[nearest]
        log.warning("%s: %s", src, geo.regimes)
    if geo.tilt_deg > _TILT_TOLERANCE_DEG:
        log.warning("%s: gantry tilt %.1f deg corrected by in-plane shift per slice", src, geo.tilt_deg)
        array = _correct_tilt(array, geo.shear_px, fill=float(array.min()))
    meta = _meta(kept, skipped, geo)
    if hu_offset:
        array = apply_hu_offset(array, hu_offset)
        meta["hu_offset"] = hu_offset
    low = int(array.min()) if array.size else 0
    if low >= 0:
        # Every CT holds air (-1000 HU) or padding below it. Values from 0 up are stored values whose rescale
        # the header lost (the Slicer neck CT: 0..3926 with intercept 0, i.e. HU + 1024): bone thresholds and
        # windows would all read ~1024 HU too high. Said, not guessed at: the intercept is not in the file.
        note = (f"no value below 0 (lowest {low}): air should be -1000 HU, so the series' RescaleIntercept "
                f"({meta['rescale_intercept']}) is probably wrong; every HU threshold is off (stored values "
                "are usually HU + 1024: check the scan, then rerun with --hu-offset -1024)")  # fmt: skip
        log.warning("%s: %s", src, note)
        meta["warnings"] = [*meta.get("warnings", []), note]
    vol = Volume(array=array, spacing=geo.spacing, affine=geo.affine, instance_numbers=instance_numbers, meta=meta)
    check_geometry(vol, str(src))
    return vol


def apply_hu_offset(array: np.ndarray, offset: float) -> np.ndarray:
    """``array + offset`` as int16 (clipped): the user's correction of a lost RescaleIntercept."""
    return np.clip(np.rint(array.astype(np.float32) + float(offset)), -32768, 32767).astype(np.int16)


#: Modalities read as CT: CT itself, and none at all (RSNA's anonymised files carry no Modality).
_CT_MODALITIES = {"CT", ""}


def _check_modality(series: list[_Header]) -> None:
    """MR, PT, US ... pixels are not Hounsfield units: every probability computed on them would be a guess."""
    first = series[0]
    modality = str(first.info.get("Modality") or "").strip().upper()
    if modality not in _CT_MODALITIES:
        raise DicomError(f"{first.path}: Modality {modality}, not CT; cspine reads CT only")


#: A slice whose mean difference to each neighbour exceeds this factor times the neighbours' mutual difference,
#: plus the margin (HU), is garbage (a corrupt codestream decoded without error), not anatomy.
_SLICE_GARBAGE_FACTOR = 2.0
_SLICE_GARBAGE_MARGIN_HU = 20.0


def _check_neighbours(array: np.ndarray, paths: list[str]) -> None:
    """Refuse a slice that is unlike both of its neighbours while they are alike.

    Why: a JPEG 2000 codestream with flipped bytes decodes without any error to pixels that are all wrong (wavelet
    noise over the whole slice), and no codec can tell. Anatomy changes smoothly, so slice z cannot differ from
    z-1 and from z+1 much more than those two differ from each other (they are twice as far apart). A series of
    pure noise passes: every slice differs alike.
    """
    n = array.shape[0]
    if n < 3:
        return
    step = max(1, int(np.ceil(np.sqrt(array[0].size / 65536))))  # a 256 x 256 sample is enough
    a = array[:, ::step, ::step].astype(np.float32)
    adjacent = np.abs(np.diff(a, axis=0)).mean(axis=(1, 2))  # z vs z+1
    skip = np.abs(a[2:] - a[:-2]).mean(axis=(1, 2))  # z-1 vs z+1
    for z in range(1, n - 1):
        closest = min(adjacent[z - 1], adjacent[z])
        if closest > _SLICE_GARBAGE_FACTOR * skip[z - 1] + _SLICE_GARBAGE_MARGIN_HU:
            raise DicomError(
                f"{paths[z]}: decoded pixels differ from both neighbouring slices by {closest:.0f} HU on average "
                f"while those differ from each other by {skip[z - 1]:.0f} HU; corrupt pixel data"
            )


def _resample_slices(array: np.ndarray, z_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation along axis 0 at fractional slice indices; also the nearest source slice of each."""
    lo = np.clip(np.floor(z_index).astype(np.int64), 0, array.shape[0] - 1)
    hi = np.minimum(lo + 1, array.shape[0] - 1)
    w = (z_index - lo).astype(np.float32)
    out = np.empty((len(z_index), *array.shape[1:]), dtype=np.int16)
    for k in range(len(z_index)):
        out[k] = np.rint(array[lo[k]] * (1.0 - w[k]) + array[hi[k]] * w[k])
    return out, np.where(w < 0.5, lo, hi)


def _probe_size(files: Sequence[Path]) -> tuple[int, int] | None:
    """Rows and columns of the first image among the files: the slot size of the one-pass decode."""
    for f in files[:32]:
        h = _read_header(str(f))
        if isinstance(h, _Header):
            return (h.rows, h.columns)
    return None


def _assemble(
    series: list[_Header],
    geo: _Geometry,
    buf_name: str | None,
    shape: tuple[int, int, int],
    slot_of: dict[str, int],
    decode_error: dict[str, str | None],
) -> np.ndarray:
    """Gather the chosen series' decoded slices in sorted order; decode any the scan left out; vet duplicates."""
    paths = [series[i].path for i in geo.order]
    for p in paths:
        err = decode_error[p]
        if err:
            raise DicomError(err)
    done = [decode_error[p] is None for p in paths]
    first = series[0]
    if buf_name and all(done):
        mm = np.memmap(buf_name, dtype=np.int16, mode="r", shape=shape)
        array = np.asarray(mm[[slot_of[p] for p in paths]])
        del mm
    else:  # the series differs in size from the probed file (e.g. a scout came first): decode it now
        array = _decode_in_children(paths, first.rows, first.columns)
    _check_duplicates(series, geo, array)
    return array


def _check_duplicates(series: list[_Header], geo: _Geometry, array: np.ndarray) -> None:
    """A dropped slice shares its position with a kept one: fine if identical, an error if not."""
    if not geo.drop:
        return
    z_of = {i: z for z, i in enumerate(geo.order)}
    first = series[0]
    others = _decode_in_children([series[i].path for i, _ in geo.drop], first.rows, first.columns)
    for (i, k), other in zip(geo.drop, others, strict=True):
        z = z_of[k]
        if other.shape != array[z].shape or not np.array_equal(other, array[z]):
            raise DicomError(
                f"duplicate slice position {series[i].position} with different pixels: "
                f"{series[i].path} and {series[geo.order[z]].path}"
            )
        log.info("dropped duplicate slice %s (identical to %s)", series[i].path, series[geo.order[z]].path)


def _meta(kept: list[_Header], skipped: list[str], geo: _Geometry) -> dict[str, Any]:
    """Non-identifying metadata: UIDs, scanner, encodings. No patient name, ID, birth date or paths."""
    import pydicom.uid

    first = kept[0]
    syntaxes = sorted({h.transfer_syntax for h in kept})
    info = first.info
    meta: dict[str, Any] = {
        "StudyInstanceUID": first.study_uid,
        "SeriesInstanceUID": first.series_uid,
        "modality": info.get("Modality"),
        "manufacturer": info.get("Manufacturer"),
        "manufacturer_model": info.get("ManufacturerModelName"),
        "convolution_kernel": info.get("ConvolutionKernel"),
        "slice_thickness": info.get("SliceThickness"),
        "bits_stored": info.get("BitsStored"),
        "pixel_representation": info.get("PixelRepresentation"),
        "rescale_intercept": info.get("RescaleIntercept"),
        "rescale_slope": info.get("RescaleSlope"),
        "transfer_syntaxes": syntaxes,
        "transfer_syntax_names": [getattr(pydicom.uid.UID(s), "name", s) for s in syntaxes],
        "n_slices": len(kept),
        "dropped_duplicates": len(geo.drop),
        "skipped_series": skipped,
        "gantry_tilt_deg": round(geo.tilt_deg, 3),
    }
    if geo.tilt_deg > _TILT_TOLERANCE_DEG:
        meta["warnings"] = [f"gantry tilt {geo.tilt_deg:.1f} deg corrected by in-plane resampling"]
    if geo.regimes:
        meta["warnings"] = [*meta.get("warnings", []), geo.regimes]
        meta["n_slices_resampled"] = len(geo.resample_z) if geo.resample_z is not None else len(kept)
    return meta
