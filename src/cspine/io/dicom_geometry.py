"""Which series of the input, and where its slices lie in space.

Why careful: a slice out of order or a mirrored axis silently spoils every later number. A folder holding several
studies is refused rather than answered for the largest; the slices of one series must agree in size, orientation
and pixel spacing; they are ordered by ImagePositionPatient along the slice normal (never by file name or
InstanceNumber) and the slice step is measured from positions. A missing slice (one step a whole multiple of the
step beside it) is refused, steps that change in regimes are resampled onto the finest, and gantry tilt is
corrected by an in-plane shift per slice.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cspine.io.dicom_error import DicomError
from cspine.io.dicom_header import _Header
from cspine.io.volume import affine_from_dicom

log = logging.getLogger(__name__)

#: Angle (degrees) between the slice normal and the slice-to-slice direction above which a series is tilted.
_TILT_TOLERANCE_DEG = 0.5
#: A single position step that is a whole multiple (at least this factor) of the step beside it: a missing slice.
_GAP_FACTOR = 1.5


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
