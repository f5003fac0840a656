"""Mask label conventions, checked on real label maps (TotalSegmentator, VerSe / TPTBox) in shared."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cspine.errors import ConfigError
from cspine.labels import CERVICAL_VALUES, LABEL_VALUES, to_project_labels

L1, L2, L3, L4, L5 = 20, 21, 22, 23, 24  # project / VerSe values (MANIFEST.md)


def test_totalsegmentator_values_map_onto_project_values() -> None:
    ts = np.array([50, 44, 43, 32, 31, 27, 26, 25, 5, 0], dtype=np.uint8)  # C1 C7 T1 T12 L1 L5 S1 sacrum liver bg
    assert to_project_labels(ts, "totalsegmentator").tolist() == [1, 7, 8, 19, 20, 24, 26, 26, 0, 0]
    assert np.array_equal(to_project_labels(ts, "totalseg"), to_project_labels(ts, "totalsegmentator"))
    assert to_project_labels(np.array([1, 7, 22]), "verse").tolist() == [1, 7, 22]
    with pytest.raises(ConfigError, match="valid: rsna, verse, totalsegmentator"):
        to_project_labels(ts, "nnunet")


def test_real_totalsegmentator_output_names_its_vertebrae_on_bone(real: Path) -> None:
    """TotalSegmentator's own output on its example CT: T11..L5 (no cervical level), each on bone."""
    d = real / "nifti" / "totalsegmentator"
    seg = to_project_labels(np.asarray(nib.load(d / "example_seg_fast_force_split.nii.gz").dataobj), "totalsegmentator")
    ct = np.asarray(nib.load(d / "example_ct.nii.gz").dataobj)
    present = set(np.unique(seg).tolist()) - {0}
    assert not present & set(CERVICAL_VALUES)
    assert {LABEL_VALUES["T12"], L1, L5} <= present
    for v in (LABEL_VALUES["T12"], L1, L3):
        assert ct[seg == v].mean() > 150, v


def test_real_verse_mask_keeps_its_lumbar_values(real: Path) -> None:
    img = nib.load(real / "nifti" / "tptbox_lumbar_ct" / "sub-ct_seg-vert_label-22_msk.nii.gz")
    seg = to_project_labels(np.asarray(img.dataobj), "verse")
    assert set(np.unique(seg).tolist()) - {0} == {L2, L3, L4}
