"""The Volume type: pixels that carry their geometry.

Every reader returns a :class:`Volume`, every writer takes one, so spacing and
orientation are never guessed downstream (style guide: geometry travels with pixels).
Index order is (z, y, x) = (slice, row, column); the affine maps that index to
patient coordinates in DICOM's LPS convention, in millimetres.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np


@dataclass(frozen=True, eq=False)
class Volume:
    """A CT volume in Hounsfield units with its geometry.

    Attributes:
        array: HU values, shape (z, y, x), slices ordered along the slice normal.
        spacing: (dz, dy, dx) in mm; dz is measured from slice positions.
        affine: 4x4, voxel index (z, y, x, 1) -> patient LPS (x, y, z, 1) in mm.
        instance_numbers: per z, the DICOM InstanceNumber of that slice (RSNA slice_number).
        meta: non-identifying metadata (UIDs, modality, manufacturer, transfer syntaxes ...).
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    instance_numbers: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"Volume array must be 3-D (z, y, x), got shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"Volume affine must be 4x4, got {self.affine.shape}")
        if len(self.instance_numbers) not in (0, self.array.shape[0]):
            raise ValueError(f"{len(self.instance_numbers)} instance numbers for {self.array.shape[0]} slices")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    def with_array(self, array: np.ndarray) -> Volume:
        """Same geometry, other pixels (e.g. a mask or a windowed copy)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from volume shape {self.array.shape}")
        return replace(self, array=array)

    def index_to_patient(self, index_zyx: np.ndarray) -> np.ndarray:
        """Map (N, 3) voxel indices (z, y, x) to patient LPS coordinates (N, 3)."""
        idx = np.atleast_2d(np.asarray(index_zyx, dtype=np.float64))
        return idx @ self.affine[:3, :3].T + self.affine[:3, 3]

    def patient_to_index(self, points_lps: np.ndarray) -> np.ndarray:
        """Map (N, 3) patient LPS coordinates to fractional voxel indices (z, y, x)."""
        pts = np.atleast_2d(np.asarray(points_lps, dtype=np.float64))
        inv = np.linalg.inv(self.affine)
        return pts @ inv[:3, :3].T + inv[:3, 3]


def affine_from_dicom(
    origin_lps: np.ndarray,
    row_dir: np.ndarray,
    col_dir: np.ndarray,
    slice_step: np.ndarray,
    pixel_spacing_rc: tuple[float, float],
) -> np.ndarray:
    """Build the (z, y, x) -> LPS affine from DICOM geometry.

    Args:
        origin_lps: ImagePositionPatient of the first slice (index z=0).
        row_dir: first ImageOrientationPatient triplet (direction of increasing column index x).
        col_dir: second triplet (direction of increasing row index y).
        slice_step: vector from slice z to slice z+1 in mm.
        pixel_spacing_rc: PixelSpacing = (row spacing dy, column spacing dx).
    """
    dy, dx = pixel_spacing_rc
    aff = np.eye(4)
    aff[:3, 0] = np.asarray(slice_step, dtype=np.float64)
    aff[:3, 1] = np.asarray(col_dir, dtype=np.float64) * dy
    aff[:3, 2] = np.asarray(row_dir, dtype=np.float64) * dx
    aff[:3, 3] = np.asarray(origin_lps, dtype=np.float64)
    return aff


def check_geometry(vol: Volume, source: str) -> None:
    """Refuse geometry no scanner writes: non-finite or singular affine, zero spacing, an absurd field of view.

    Raises:
        cspine.errors.CspineInputError: naming ``source`` and what is wrong.
        cspine.errors.ResourceLimitError: a field of view beyond the ``max_fov_mm`` limit.
    """
    from cspine.errors import CspineInputError
    from cspine.io import limits

    aff = np.asarray(vol.affine, dtype=np.float64)
    if not np.isfinite(aff).all():
        raise CspineInputError(f"{source}: the image's position or orientation is not finite (NaN or infinity)")
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    if not (spacing > 1e-6).all() or abs(np.linalg.det(aff[:3, :3])) < 1e-9 * float(np.prod(spacing)):
        raise CspineInputError(
            f"{source}: singular geometry (voxel axes {_fmt_axes(aff)}); a zero spacing or parallel axes"
        )
    fov = [float(n * s) for n, s in zip(vol.shape, spacing, strict=True)]
    limits.check("max_fov_mm", max(fov), f"{source}: field of view {' x '.join(f'{v:.0f}' for v in fov)} mm")


def _fmt_axes(aff: np.ndarray) -> str:
    return np.array2string(aff[:3, :3].T, precision=3, suppress_small=True).replace("\n", "")


def check_can_hold_vertebra(vol: Volume, source: str) -> None:
    """Refuse a volume too thin to hold one cervical vertebra (a single slice, a few millimetres of stack).

    Why: C-spine vertebrae are about 15 mm high and 40 mm wide; on less, every per-vertebra number is made up
    (a single CT slice got C3 = 0.00008 and "present" vertebrae).
    """
    from cspine.errors import CspineInputError

    extent = [float(n * s) for n, s in zip(vol.shape, vol.spacing, strict=True)]
    if vol.shape[0] < MIN_SLICES or extent[0] < MIN_EXTENT_MM[0] or min(extent[1:]) < MIN_EXTENT_MM[1]:
        raise CspineInputError(
            f"{source}: {vol.shape[0]} slice(s), {extent[0]:.0f} x {extent[1]:.0f} x {extent[2]:.0f} mm: too "
            f"small to hold a vertebra (needs at least {MIN_SLICES} slices over {MIN_EXTENT_MM[0]:.0f} mm and "
            f"{MIN_EXTENT_MM[1]:.0f} mm in-plane)"
        )


#: Smallest study predict accepts: slices, and extent (along the slices, in-plane) in mm.
MIN_SLICES = 3
MIN_EXTENT_MM = (15.0, 40.0)


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """(dz, dy, dx): the lengths of the affine's columns."""
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    return (float(norms[0]), float(norms[1]), float(norms[2]))


#: (level, width) HU windows. Bone is the default: fractures are read in a bone window.
WINDOWS: dict[str, tuple[float, float]] = {
    "bone": (400.0, 1800.0),
    "soft": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
}


def window(hu: np.ndarray, name: str = "bone", level: float | None = None, width: float | None = None) -> np.ndarray:
    """Map HU to float32 in [0, 1] through a window (named, or explicit level/width)."""
    if name not in WINDOWS and (level is None or width is None):
        raise ValueError(f"unknown window {name!r}; expected one of {', '.join(WINDOWS)} or level and width")
    lv, wd = WINDOWS.get(name, (0.0, 1.0))
    lv = lv if level is None else level
    wd = wd if width is None else width
    lo = lv - wd / 2.0
    return np.clip((np.asarray(hu, dtype=np.float32) - lo) / wd, 0.0, 1.0)


def crop(vol: Volume, start: tuple[int, int, int], stop: tuple[int, int, int]) -> Volume:
    """Crop to index box [start, stop) (clipped to the volume); the affine origin moves with it."""
    lo = [max(0, int(s)) for s in start]
    hi = [min(n, int(e)) for n, e in zip(vol.shape, stop, strict=True)]
    if any(h <= lo_ for lo_, h in zip(lo, hi, strict=True)):
        raise ValueError(f"empty crop {start}..{stop} of volume shape {vol.shape}")
    aff = vol.affine.copy()
    aff[:3, 3] = vol.index_to_patient(np.array(lo))[0]
    inst = vol.instance_numbers[lo[0] : hi[0]] if len(vol.instance_numbers) else vol.instance_numbers
    return Volume(
        array=vol.array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].copy(),
        spacing=vol.spacing,
        affine=aff,
        instance_numbers=inst,
        meta=dict(vol.meta),
    )


def check_grid(shape: tuple[int, ...], what: str) -> None:
    """Refuse to allocate a resampled grid beyond the ``max_grid_voxels`` limit (checked before allocating)."""
    from cspine.io import limits

    limits.check("max_grid_voxels", int(np.prod(np.asarray(shape, dtype=np.float64))),
                 f"{what} {' x '.join(str(v) for v in shape)} voxels")  # fmt: skip


def resample(vol: Volume, spacing: tuple[float, float, float], order: int = 1) -> Volume:
    """Resample to a new (dz, dy, dx) spacing over the same extent (order 0 for label maps, 1 for images).

    Voxel centres of the first voxel stay in place; the grid covers the original extent.
    Instance numbers are dropped because resampled slices are no longer DICOM slices.
    """
    from scipy import ndimage

    old = np.asarray(vol.spacing, dtype=np.float64)
    new = np.asarray(spacing, dtype=np.float64)
    shape = np.maximum(1, np.round((np.array(vol.shape) - 1) * old / new).astype(int) + 1)
    check_grid(tuple(int(v) for v in shape), "resampled grid")
    coords_scale = new / old
    dtype = vol.array.dtype
    src = vol.array if order == 0 else vol.array.astype(np.float32)
    out = ndimage.affine_transform(
        src, coords_scale, output_shape=tuple(shape), order=order, mode="nearest", prefilter=False
    )
    if np.issubdtype(dtype, np.integer) and order > 0:
        out = np.rint(out)
    aff = vol.affine.copy()
    aff[:3, :3] = vol.affine[:3, :3] * coords_scale[None, :]
    return Volume(array=out.astype(dtype), spacing=tuple(float(s) for s in new), affine=aff, meta=dict(vol.meta))
