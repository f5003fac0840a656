"""CT input and output: DICOM series and NIfTI masks, with their geometry."""

from cspine.io.dicom import DicomError, load_series, read_hu
from cspine.io.nifti import load_segmentation, save_nifti
from cspine.io.volume import Volume

__all__ = ["DicomError", "Volume", "load_segmentation", "load_series", "read_hu", "save_nifti"]
