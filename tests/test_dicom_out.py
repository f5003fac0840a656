"""DICOM outputs: SEG frames equal mask.nii.gz on the source slices, SR/KO content, dciodvfy-clean, PHI kept out.

The model is the conftest stand-in (a bone mask cut into seven bands, fixed probabilities): these tests check what is
made of a prediction. A real series (TotalSegmentator's example CT with its own vertebra mask) checks the geometry
and validity on a scanner's headers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cspine.labels import CERVICAL, LABEL_VALUES

STOW = ("seg.dcm", "sr.dcm", "ko.dcm")
#: Identifying attributes of the source that are not part of the patient/study modules: never copied.
FOREIGN_PHI = {"InstitutionName": "ST ELSEWHERE", "OperatorsName": "OPERATOR^ONE", "DeviceSerialNumber": "SN-12345",
               "StationName": "CT-ROOM-7"}  # fmt: skip


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """A small generated study written as DICOM, with some identifying fields outside the patient/study modules."""
    from cspine.synth import generate_study
    from cspine.synth.writer import write_series

    folder = tmp_path_factory.mktemp("gen") / "study"
    write_series(generate_study(3, "small", 1), folder, patient_number=7)
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        for key, value in FOREIGN_PHI.items():
            setattr(ds, key, value)
        ds.save_as(f)
    return folder


@pytest.fixture(scope="module")
def predicted(generated: Path, tmp_path_factory) -> Path:
    """predict_study with --dicom on the generated study (stand-in model)."""
    from conftest import StubBundle
    from cspine.predict import PredictConfig, predict_study

    out = tmp_path_factory.mktemp("pred") / "out"
    predict_study(PredictConfig(study=generated, model=Path("stub"), out=out, report=False, dicom=True), StubBundle())
    return out


def _seg_labels(seg_path: Path, vol, study: Path) -> np.ndarray:
    """The SEG read back with highdicom as a C1..C7 label map on the source slices (z order of ``vol``)."""
    import highdicom as hd

    from cspine.dicom_out import read_source_series

    seg = hd.seg.segread(seg_path)
    sops = [str(ds.SOPInstanceUID) for ds in read_source_series(study, vol).headers]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=sops, combine_segments=False,
                                               skip_overlap_checks=True)  # fmt: skip
    out = np.zeros(pixels.shape[:3], dtype=np.uint8)
    for i, number in enumerate(seg.segment_numbers):
        label = str(seg.get_segment_description(number).segment_label)
        out[pixels[..., i] > 0] = LABEL_VALUES.get(label, 0) or i + 1
    return out


def test_seg_equals_mask_nifti_voxel_for_voxel(predicted: Path, generated: Path) -> None:
    from cspine.io import load_segmentation, load_series

    vol = load_series(generated)
    mask = load_segmentation(predicted / "mask.nii.gz", vol)
    assert set(np.unique(mask)) == {0, *range(1, 8)}
    back = _seg_labels(predicted / "dicom" / "seg.dcm", vol, generated)
    np.testing.assert_array_equal(back, mask)


def test_seg_codes_references_and_uids(predicted: Path, generated: Path) -> None:
    seg = pydicom.dcmread(predicted / "dicom" / "seg.dcm")
    src = pydicom.dcmread(next(generated.iterdir()), stop_before_pixels=True)
    labels = [str(s.SegmentLabel) for s in seg.SegmentSequence]
    assert labels == list(CERVICAL)
    codes = {str(s.SegmentLabel): s.SegmentedPropertyTypeCodeSequence[0] for s in seg.SegmentSequence}
    assert codes["C1"].CodeValue == "14806007" and codes["C7"].CodeValue == "87391001"
    assert all(c.CodingSchemeDesignator == "SCT" for c in codes.values())
    referenced = {str(i.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence
                  for i in s.ReferencedInstanceSequence}  # fmt: skip
    source_sops = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in generated.iterdir()}
    assert referenced == source_sops
    assert seg.StudyInstanceUID == src.StudyInstanceUID and seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID and seg.SOPInstanceUID not in source_sops


def test_patient_study_copied_other_phi_not(predicted: Path, generated: Path) -> None:
    src = pydicom.dcmread(next(generated.iterdir()), stop_before_pixels=True)
    for name in STOW:
        ds = pydicom.dcmread(predicted / "dicom" / name)
        assert ds.PatientName == src.PatientName and ds.PatientID == src.PatientID  # the documented exception
        assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.StudyDate == src.StudyDate
        text = str(ds)
        for key, value in FOREIGN_PHI.items():
            assert value not in text, (name, key)  # (a SEG has a DeviceSerialNumber of its own: cspine's)
    result = (predicted / "result.json").read_text()
    assert str(src.PatientName) not in result and str(src.PatientID) not in result


def _content_items(ds) -> list:
    items, stack = [], list(ds.ContentSequence)
    while stack:
        item = stack.pop()
        items.append(item)
        stack.extend(getattr(item, "ContentSequence", []))
    return items


def test_sr_holds_probabilities_fov_model_and_links(predicted: Path) -> None:
    from conftest import StubBundle

    sr = pydicom.dcmread(predicted / "dicom" / "sr.dcm")
    seg = pydicom.dcmread(predicted / "dicom" / "seg.dcm")
    ko = pydicom.dcmread(predicted / "dicom" / "ko.dcm")
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    groups = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    per_group = {}
    for group in groups[0].ContentSequence:
        items = _content_items(group)
        site = next(i.ConceptCodeSequence[0].CodeMeaning for i in items
                    if i.ConceptNameCodeSequence[0].CodeValue == "363698007")  # finding site  # fmt: skip
        prob = next(float(i.MeasuredValueSequence[0].NumericValue) for i in items if i.ValueType == "NUM")
        per_group[site] = (prob, items)
    expected = {**{f"{n} vertebra": StubBundle.PROBS[n] for n in CERVICAL}, "Cervical spine": 0.8}
    assert {k: round(v[0], 6) for k, v in per_group.items()} == expected
    c2_items = per_group["C2 vertebra"][1]
    seg_refs = [i for i in c2_items if getattr(i, "ValueType", "") == "IMAGE" and "ReferencedSOPSequence" in i
                and i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID]  # fmt: skip
    assert seg_refs and seg_refs[0].ReferencedSOPSequence[0].ReferencedSegmentNumber == 2
    key_refs = {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in c2_items
                if getattr(i, "ValueType", "") == "IMAGE" and i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                != seg.SOPInstanceUID}  # fmt: skip
    ko_refs = {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in ko.ContentSequence
               if i.ValueType == "IMAGE"}  # fmt: skip
    assert len(key_refs) == 1 and key_refs <= ko_refs and len(ko_refs) == 2  # C2 and C5 are flagged
    texts = {str(i.TextValue) for i in _content_items(sr) if i.ValueType == "TEXT"}
    assert "cspine stub-model" in texts  # the model's name and version
    assert "cspine 0.1.0, bundle 2026-01-01T00:00:00" in texts
    c7_cut = [i for i in per_group["C7 vertebra"][1] if i.ValueType == "CODE"
              and i.ConceptNameCodeSequence[0].CodeValue == "CUTOFF"]  # fmt: skip
    assert c7_cut[0].ConceptCodeSequence[0].CodeMeaning == "Yes"


def _dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None,
                                    reason="dciodvfy not installed (Debian package dicom3tools; CI installs it)")


@needs_dciodvfy
def test_dciodvfy_no_errors_generated(predicted: Path) -> None:
    for name in STOW:
        assert _dciodvfy_errors(predicted / "dicom" / name) == [], name


@needs_dciodvfy
def test_real_ct_seg_sr_valid_and_exact(real: Path, tmp_path: Path) -> None:
    """TotalSegmentator's example CT (Siemens, J2K) with its own mask; its vertebrae (T11, T12) stand in as C1, C2:
    no real file has cervical labels, and what is checked here is geometry and validity, not anatomy."""
    from cspine.dicom_out import write_dicom_outputs
    from cspine.io import load_segmentation, load_series

    study = real / "series" / "totalseg_example_ct_dicom"
    vol = load_series(study)
    ts = load_segmentation(real / "series" / "totalseg_example_ct_dicom_reference_seg.nii.gz", vol)
    mask = np.select([ts == 33, ts == 32], [1, 2], 0).astype(np.uint8)
    assert (mask == 1).sum() > 1000 and (mask == 2).sum() > 1000
    result = {"patient_overall": 0.7, "C1": 0.9, "C2": 0.2, "threshold": 0.5, "vertebrae": {},
              "model": {"path": "m", "cspine": "0.1.0"}}  # fmt: skip
    written = write_dicom_outputs(tmp_path / "dicom", study, vol, mask, result)
    assert sorted(written) == ["ko", "seg", "sr"]
    for path in written.values():
        assert _dciodvfy_errors(Path(path)) == [], path
    np.testing.assert_array_equal(_seg_labels(Path(written["seg"]), vol, study), mask)


def test_bad_inputs_one_line_exit_2(predicted: Path, generated: Path, tmp_path: Path) -> None:
    from cspine.io import save_nifti

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cspine.cli", "dicom-out", *args], capture_output=True,
                              text=True, timeout=120)  # fmt: skip

    out = run(str(tmp_path), "--study", str(generated))
    assert out.returncode == 2 and "not a cspine result folder" in out.stderr and "Traceback" not in out.stderr
    from cspine.io import load_series

    nii = save_nifti(load_series(generated).array, load_series(generated), tmp_path / "ct.nii.gz")
    out = run(str(predicted), "--study", str(nii), "--out", str(tmp_path / "d"))
    assert out.returncode == 2 and "need a DICOM study" in out.stderr
    assert len([x for x in out.stderr.splitlines() if x.strip()]) == 1


def test_dicom_out_cli_on_a_result_folder(predicted: Path, generated: Path, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "cspine.cli", "dicom-out", str(predicted), "--study", str(generated),
                          "--out", str(tmp_path / "again")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    written = json.loads(out.stdout)
    assert sorted(Path(p).name for p in written.values()) == sorted(STOW)
    a = pydicom.dcmread(tmp_path / "again" / "seg.dcm")
    b = pydicom.dcmread(predicted / "dicom" / "seg.dcm")
    assert a.SOPInstanceUID != b.SOPInstanceUID  # new UIDs every time
    np.testing.assert_array_equal(a.pixel_array, b.pixel_array)
    assert json.loads((predicted / "result.json").read_text())["dicom"]["seg"].endswith("seg.dcm")
