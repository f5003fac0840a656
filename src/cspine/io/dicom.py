"""DICOM series -> :class:`~cspine.io.volume.Volume`, exact and fast: :func:`load_series`.

Why the reader is careful: a slice out of order, a mirrored axis or a misread JPEG silently spoils every later
number, so each problem is reported as one :class:`DicomError` naming the file and what is wrong with it. A study
passes through the reader's modules in this order: :mod:`~cspine.io.dicom_files` (folder, zip or file),
:mod:`~cspine.io.dicom_header` (the header pass; declared sizes checked against :mod:`cspine.io.limits` before
anything is allocated), :mod:`~cspine.io.decode_pool` with :mod:`~cspine.io.dicom_decode` (one parallel decode to
HU, always in child processes), :mod:`~cspine.io.dicom_geometry` (series choice, slice order, spacing, gaps, tilt).
This module puts the volume together and checks what only the whole stack shows: the modality, a slice unlike both
neighbours, duplicate positions with different pixels, a lost rescale. It also re-exports the reader's names that
other modules import from here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cspine.errors import ResourceLimitError
from cspine.io import limits
from cspine.io.decode_pool import DECODE_BUFFER_PREFIX, _decode_buffer, _decode_in_children, _run_scan, default_workers
from cspine.io.dicom_decode import UNSUPPORTED_SYNTAXES, read_hu
from cspine.io.dicom_error import DicomError
from cspine.io.dicom_files import _input_files
from cspine.io.dicom_geometry import (
    _TILT_TOLERANCE_DEG,
    _check_consistent,
    _choose_series,
    _correct_tilt,
    _Geometry,
    _geometry,
)
from cspine.io.dicom_header import _Header, _read_header
from cspine.io.volume import Volume, check_geometry

__all__ = [
    "DECODE_BUFFER_PREFIX",
    "UNSUPPORTED_SYNTAXES",
    "DicomError",
    "apply_hu_offset",
    "default_workers",
    "load_series",
    "read_hu",
]

log = logging.getLogger(__name__)


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
