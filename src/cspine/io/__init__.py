"""CT input and output: DICOM series and NIfTI volumes and masks, with their geometry."""

from pathlib import Path

from cspine.io.dicom import DicomError, load_series, read_hu
from cspine.io.nifti import load_nifti_volume, load_segmentation, save_nifti
from cspine.io.volume import Volume

__all__ = [
    "DicomError",
    "Volume",
    "load_nifti_volume",
    "load_segmentation",
    "load_series",
    "load_study",
    "read_hu",
    "save_nifti",
]


def load_study(path: str | Path, series_uid: str | None = None) -> Volume:
    """One CT study from a DICOM folder, zip or file, or a NIfTI file (.nii / .nii.gz)."""
    p = Path(path)
    if p.is_file() and p.name.lower().endswith((".nii", ".nii.gz")):
        if series_uid is not None:
            raise DicomError(f"{p}: --series-uid chooses among DICOM series; a NIfTI file holds one volume")
        return load_nifti_volume(p)
    return load_series(p, series_uid=series_uid)
