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


def test_totalsegmentator_engine_maps_and_aligns_its_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in for TotalSegmentator's Python API that labels voxels as TotalSegmentator would (50 = C1, 44 = C7,
    43 = T1, 5 = liver), written on the NIfTI grid it was handed: the engine returns C1..C7 on the study's grid."""
    import sys
    import types

    from cspine.io.volume import Volume
    from cspine.seg.totalsegmentator import ROI_SUBSET, segment_with_totalsegmentator

    affine = np.array([[0, 0, -0.8, 40], [0, 0.7, 0, -20], [2.0, 0, 0, -300], [0, 0, 0, 1]], dtype=float)
    vol = Volume(np.zeros((6, 5, 4), dtype=np.int16), (2.0, 0.7, 0.8), affine)
    expected = np.zeros(vol.shape, dtype=np.uint8)
    expected[0, 1, 2], expected[5, 4, 0] = 7, 1
    calls = {}

    def fake(inp: str, out: str, ml: bool, roi_subset: list[str], **kw: object) -> None:
        img = nib.load(inp)
        ct = np.asarray(img.dataobj)  # (x, y, z) RAS: the study's voxels transposed
        ts = np.zeros(ct.shape, dtype=np.uint8)
        ts[2, 1, 0], ts[0, 4, 5], ts[1, 1, 1], ts[3, 3, 3] = 44, 50, 43, 5
        nib.save(nib.Nifti1Image(ts, img.affine), out)
        calls.update(ml=ml, roi=roi_subset)

    api = types.ModuleType("totalsegmentator.python_api")
    api.totalsegmentator = fake  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "totalsegmentator", types.ModuleType("totalsegmentator"))
    monkeypatch.setitem(sys.modules, "totalsegmentator.python_api", api)
    got = segment_with_totalsegmentator(vol)
    assert calls == {"ml": True, "roi": list(ROI_SUBSET)}
    assert np.array_equal(got, expected)


def test_totalsegmentator_engine_missing_is_a_clear_input_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from cspine.errors import UsageError
    from cspine.io.volume import Volume
    from cspine.seg.totalsegmentator import segment_with_totalsegmentator

    monkeypatch.setitem(sys.modules, "totalsegmentator", None)
    monkeypatch.setitem(sys.modules, "totalsegmentator.python_api", None)
    with pytest.raises(UsageError, match="pip install TotalSegmentator"):
        segment_with_totalsegmentator(Volume(np.zeros((2, 2, 2), dtype=np.int16), (1.0, 1.0, 1.0), np.eye(4)))


def test_segment_engine_choices_are_clear_input_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import subprocess
    import sys

    from cspine.cli import main

    study = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), -1000, dtype=np.int16), np.eye(4)), study)
    r = subprocess.run([sys.executable, "-m", "cspine.cli", "segment", str(study), "--out", str(tmp_path / "m.nii.gz"),
                        "--engine", "totalsegmentator"], capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "pip install TotalSegmentator" in lines[0], r.stderr
    # an installation without the shipped segmenter asks for --model
    monkeypatch.setattr("cspine.seg.shipped.shipped_model", lambda: None)
    assert main(["segment", str(study), "--out", str(tmp_path / "m.nii.gz")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "no shipped segmenter: give --model" in lines[0]
