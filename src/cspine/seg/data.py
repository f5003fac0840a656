"""Segmentation data, one import path for the three modules that hold it.

:mod:`cspine.seg.grid` (how a CT becomes network input on the canonical model grid and how output maps back),
:mod:`cspine.seg.studies` (where studies come from) and :mod:`cspine.seg.patches` (training cases, augmented
patches, folds) were one module; their names stay importable from here so callers need not know the split.
"""

from __future__ import annotations

from cspine.seg.grid import (
    Foreground,
    GridMap,
    argmax0,
    axis_taps,
    canonical_crop,
    canonical_orientation,
    class_shares,
    class_to_value_lut,
    foreground_shares,
    labels_in_box,
    labels_to_model_grid,
    logits_to_labels,
    make_gridmap,
    nonzero_box,
    resample_axis,
    study_box,
    to_model_grid,
    value_to_class_lut,
)
from cspine.seg.patches import Case, PatchSampler, describe_cases, fold_of, gaussian_blur, warp_patch
from cspine.seg.studies import StudyRef, discover_studies, load_study_volume

__all__ = [
    "Case",
    "Foreground",
    "GridMap",
    "PatchSampler",
    "StudyRef",
    "argmax0",
    "axis_taps",
    "canonical_crop",
    "canonical_orientation",
    "class_shares",
    "class_to_value_lut",
    "describe_cases",
    "discover_studies",
    "fold_of",
    "foreground_shares",
    "gaussian_blur",
    "labels_in_box",
    "labels_to_model_grid",
    "load_study_volume",
    "logits_to_labels",
    "make_gridmap",
    "nonzero_box",
    "resample_axis",
    "study_box",
    "to_model_grid",
    "value_to_class_lut",
    "warp_patch",
]
