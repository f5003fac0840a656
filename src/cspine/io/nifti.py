"""NIfTI masks aligned to a DICOM volume through geometry, NIfTI CT volumes, and NIfTI writing.

RSNA's masks come out mirrored and reversed when read naively, and public solutions
fixed that with hard-coded flips that break on studies scanned the other way. Here
the NIfTI affine (RAS) and the Volume affine (LPS) are composed: the result says,
for every volume axis, which mask axis it reads, in which direction and from which
offset. Permutations, flips and crops are exact; differing spacing falls back to
nearest-neighbour sampling. Anything else is refused with both geometries shown.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np

from cspine.io import limits
from cspine.io.dicom_error import DicomError
from cspine.io.volume import Volume, check_geometry, spacing_from_affine

#: LPS <-> RAS: negate the first two world axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Index (z, y, x) <-> (x, y, z): NIfTI data are written with the column axis first.
_ZYX_TO_XYZ = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


def _fmt(aff: np.ndarray) -> str:
    return np.array2string(np.asarray(aff)[:3], precision=3, suppress_small=True).replace("\n", "")


def read_nifti(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file: (data with 3 dims, affine index (i, j, k) -> LPS). Raises DicomError when unreadable."""
    import nibabel as nib

    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise DicomError(f"{p}: no such file") from None
    except OSError as exc:
        raise DicomError(f"{p}: cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise DicomError(f"{p}: not a regular file (a folder, named pipe, socket or device)")
    try:
        img = nib.load(str(p))
        shape = tuple(int(v) for v in img.shape)
    except Exception as exc:
        raise DicomError(f"{p}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    limits.check("max_series_voxels", int(np.prod(np.asarray(shape, dtype=np.float64))),
                 f"{p}: {' x '.join(map(str, shape))} voxels")  # fmt: skip
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DicomError(f"{p}: the NIfTI affine {_fmt(affine)} is not finite or is singular; no geometry to place "
                         "the voxels in space")  # fmt: skip
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise DicomError(f"{p}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DicomError(f"{p}: expected a 3-D image, got shape {data.shape}")
    return data, LPS_TO_RAS @ affine


def load_nifti_volume(path: str | os.PathLike[str], hu_offset: float | None = None) -> Volume:
    """A NIfTI CT (dcm2niix, TotalSegmentator, VerSe ...) as a :class:`Volume` laid out as the DICOM reader lays out
    an axial series: axis 0 towards the head, 1 towards the back, 2 towards the patient's left.

    Why the reorientation: the classifier cuts its crops across axis 0 and counts its statistics on a grid
    anisotropic along it, so a sagittal (PIR) or a RAS-stored volume must reach it as axial slices seen the way
    the training series were. Voxels are only permuted and flipped, never interpolated; the affine follows, so a
    mask written with :func:`save_nifti` overlays the input in any viewer. Values are taken as Hounsfield units
    (the file's scaling applied); a volume with nothing below 0 (MRI, or stored values without the rescale) is
    refused, since every prediction on it would be wrong; ``hu_offset`` (the user's word, e.g. -1024 for stored
    values) is added first. NaN or infinite voxels are refused rather than turned into numbers.
    """
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    data, affine_lps = read_nifti(path)
    if data.size == 0 or min(data.shape) < 2:
        raise DicomError(f"{path}: a 3-D volume needs at least 2 voxels along each axis, got shape {data.shape}")
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise DicomError(f"{path}: {bad} of {data.size} voxels are NaN or infinite; not a CT volume")
    if hu_offset:
        data = np.asarray(data, dtype=np.float32) + float(hu_offset)
    lo, hi = float(np.min(data)), float(np.max(data))
    if lo >= 0:
        raise DicomError(
            f"{path}: values {lo:g}..{hi:g} have nothing below 0, so they are not CT Hounsfield units (air is -1000); "
            "an MRI, or stored values without their rescale (usually HU + 1024: if so, --hu-offset -1024 corrects "
            "it)"
        )
    # z, y, x run along LPS world axes 2, 1, 0 (superior, posterior, left), each ascending
    transform = ornt_transform(io_orientation(affine_lps), np.array([[2, 1], [1, 1], [0, 1]]))
    array = apply_orientation(data, transform)
    hu = np.clip(np.rint(np.asarray(array, dtype=np.float32)), -32768, 32767).astype(np.int16)
    affine = affine_lps @ inv_ornt_aff(transform, data.shape)
    vol = Volume(
        array=np.ascontiguousarray(hu),
        spacing=spacing_from_affine(affine),
        affine=affine,
        instance_numbers=np.arange(1, hu.shape[0] + 1, dtype=np.int64),
        meta={"format": "nifti", **({"hu_offset": hu_offset} if hu_offset else {})},
    )
    check_geometry(vol, str(path))
    return vol


def load_segmentation(path: str | os.PathLike[str], vol: Volume) -> np.ndarray:
    """Read a label mask and return it as uint8 (z, y, x) on ``vol``'s grid.

    Args:
        path: NIfTI label map (any axis order / orientation that is a permutation and flip of the volume's).
        vol: the volume the mask belongs to.

    Raises:
        DicomError: unreadable file, non-integer labels, orientation not a permutation/flip of the volume's,
            or no overlap between the two grids. The message shows both geometries.
    """
    data, mask_affine = read_nifti(path)
    if np.issubdtype(data.dtype, np.floating):
        rounded = np.rint(data)
        if not np.allclose(rounded, data, atol=1e-3):
            raise DicomError(f"{path}: mask has non-integer values; expected a label map")
        data = rounded
    if data.size and (data.min() < 0 or data.max() > 255):
        raise DicomError(f"{path}: label values {data.min()}..{data.max()} do not fit uint8")
    return resample_labels(data.astype(np.uint8), mask_affine, vol, name=str(path))


def resample_labels(labels: np.ndarray, labels_affine: np.ndarray, vol: Volume, name: str = "mask") -> np.ndarray:
    """Map a label array (its own affine, index -> LPS) onto ``vol``'s grid by nearest neighbour along each axis."""
    m = np.linalg.inv(labels_affine) @ vol.affine  # volume index (z, y, x) -> label index (i, j, k)
    lin = m[:3, :3]
    axes = np.argmax(np.abs(lin), axis=0)  # label axis read by each volume axis
    scale = np.abs(lin).max(axis=0)
    off_axis = np.abs(lin) > 1e-3 * scale[None, :]
    if sorted(axes.tolist()) != [0, 1, 2] or off_axis.sum() != 3:
        raise DicomError(
            f"{name}: orientation cannot be reconciled with the volume (not a permutation/flip of its axes); "
            f"mask affine (LPS) {_fmt(labels_affine)} vs volume affine {_fmt(vol.affine)}"
        )
    index_arrays = []
    valid = []
    for a in range(3):
        n = vol.array.shape[a]
        coords = lin[axes[a], a] * np.arange(n) + m[axes[a], 3]
        idx = np.floor(coords + 0.5 + 1e-4).astype(np.int64)
        ok = (idx >= 0) & (idx < labels.shape[axes[a]])
        index_arrays.append(np.clip(idx, 0, labels.shape[axes[a]] - 1))
        valid.append(ok)
    if not all(v.any() for v in valid):
        raise DicomError(
            f"{name}: mask does not overlap the volume; mask shape {labels.shape}, affine (LPS) {_fmt(labels_affine)}; "
            f"volume shape {vol.array.shape}, affine {_fmt(vol.affine)}"
        )
    reordered = np.transpose(labels, axes)  # now axis a of this array is the label axis read by volume axis a
    out = reordered[np.ix_(*index_arrays)]
    outside = ~(valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :])
    if outside.any():
        out = out.copy()
        out[outside] = 0
    return np.ascontiguousarray(out, dtype=np.uint8)


def nifti_affine(vol_affine: np.ndarray) -> np.ndarray:
    """The RAS affine of a NIfTI whose data are ``array.transpose(2, 1, 0)`` (x, y, z)."""
    return LPS_TO_RAS @ vol_affine @ _ZYX_TO_XYZ


def save_nifti(array: np.ndarray, vol: Volume, path: str | os.PathLike[str]) -> Path:
    """Write an array on ``vol``'s grid (e.g. the HU volume or a mask) as NIfTI that opens aligned in 3D Slicer.

    Data are stored (x, y, z) with a RAS affine (LPS -> RAS handled); the write is atomic.
    """
    import nibabel as nib

    if array.shape != vol.array.shape:
        raise ValueError(f"array shape {array.shape} differs from volume shape {vol.array.shape}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # (z, y, x) in C order is (x, y, z) in Fortran order, NIfTI's own layout: written without reordering
    img = nib.Nifti1Image(array.transpose(2, 1, 0), nifti_affine(vol.affine))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    if array.dtype == np.uint8:
        img.header.set_intent("label")
    suffix = ".nii.gz" if out.name.endswith(".nii.gz") else out.suffix
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}{suffix}")
    nib.save(img, str(tmp))
    os.replace(tmp, out)
    return out
