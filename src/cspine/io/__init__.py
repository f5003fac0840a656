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


#: Process-wide reading defaults set by the CLI (``--hu-offset``), for readers called deep inside a command.
_defaults: dict[str, float | None] = {"hu_offset": None}


def set_default_hu_offset(offset: float | None) -> None:
    """The HU offset :func:`load_study` applies when its caller gives none (the CLI's ``--hu-offset``)."""
    _defaults["hu_offset"] = offset


def load_study(path: str | Path, series_uid: str | None = None, hu_offset: float | None = None) -> Volume:
    """One CT study from a DICOM folder, zip or file, or a NIfTI file (.nii / .nii.gz).

    ``hu_offset`` is added to every value (a series whose rescale was lost: air reads 0, so -1024); by default the
    one set with :func:`set_default_hu_offset`, else none.
    """
    p = Path(path)
    offset = _defaults["hu_offset"] if hu_offset is None else hu_offset
    if p.name.lower().endswith((".nii", ".nii.gz")) and not p.is_dir():
        if series_uid is not None:
            raise DicomError(f"{p}: --series-uid chooses among DICOM series; a NIfTI file holds one volume")
        return load_nifti_volume(p, hu_offset=offset)
    return load_series(p, series_uid=series_uid, hu_offset=offset)
