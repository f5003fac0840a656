"""End to end: the demo pipeline with real (tiny) trained models; predict, submit, bundle checks, CLI errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cspine.labels import PREDICTION_TYPES

# the first test here sets up a whole (small) demo, ~150 s on 2 idle cores; the suite's 300 s failed it on a
# machine busy with other work (session 17)
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """A demo run small enough for CI (the real demo trains longer; see test_demo_beats_prevalence)."""
    from cspine.demo import DemoConfig, run_demo

    out = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(out=out, train_studies=8, test_studies=3, segmented=1.0, cls_epochs=1, cls_folds=2, device="cpu")
    return run_demo(cfg, progress=False)


def test_demo_outputs(demo: dict) -> None:
    out = Path(demo["out"])
    with open(out / "data" / "test.csv", newline="") as f:
        expected = [r["row_id"] for r in csv.DictReader(f)]
    with open(demo["submission"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["row_id"] for r in rows] == expected
    assert all(0.0 <= float(r["fractured"]) <= 1.0 for r in rows)
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert metrics["n_studies"] == 3 and np.isfinite(metrics["competition_loss"])
    record = json.loads((out / "demo.json").read_text())
    assert record["summary"]["test_competition_loss"] == pytest.approx(metrics["competition_loss"])


def test_no_oof_mask_comes_from_a_segmenter_that_trained_on_its_study(demo: dict) -> None:
    """Every training study's mask comes from the shipped segmenter, which trained on none of them (its recipe
    lists the studies it trained on); the classifier's folds are the dataset's one split file, and its network
    starts from the shipped classifier, which trained on none of the demo's studies either."""
    from cspine.cls.shipped import SHIPPED_CLS_DIR
    from cspine.data.cache import prepared_studies
    from cspine.seg.shipped import SHIPPED_DIR

    out = Path(demo["out"])
    cls_folds = json.loads((out / "work" / "cls" / "folds.json").read_text())  # {uid: fold}
    splits = json.loads((out / "cache" / "splits.json").read_text())
    assert cls_folds == splits["train/2-folds/seed-0"]  # one split file, read by both stages
    trained_on = set(json.loads((SHIPPED_DIR / "recipe.json").read_text())["train_uids"])
    assert len(trained_on) >= 64
    for uid in cls_folds:
        record = json.loads((out / "work" / "pseudo" / f"{uid}.json").read_text())
        assert Path(record["model"]).resolve() == SHIPPED_DIR.resolve()
        assert uid not in trained_on, f"{uid}: its mask comes from a segmenter that trained on it"
    # the fracture network the folds start from trained on other studies too: none of the demo's, test included
    config = json.loads((out / "work" / "cls" / "config.json").read_text())["train"]
    assert Path(config["init"]).resolve() == SHIPPED_CLS_DIR.resolve()
    # and every fold keeps the shipped statistics' regression (--init-statistics): only the calibration is fitted
    shipped_stats = json.loads((SHIPPED_CLS_DIR / "fold0.features.json").read_text())
    assert config["init_statistics"]
    for k in range(2):
        assert json.loads((out / "work" / "cls" / f"fold{k}.features.json").read_text()) == shipped_stats
    net_trained_on = set(json.loads((SHIPPED_CLS_DIR / "recipe.json").read_text())["train_uids"])
    assert len(net_trained_on) >= 160
    demo_uids = {d.name for split in ("train", "test") for d in prepared_studies(out / "cache", split)}
    assert len(demo_uids) == 11 and not demo_uids & net_trained_on


def test_predict_outputs_aligned_mask(demo: dict) -> None:
    from cspine.io import load_series
    from cspine.io.nifti import nifti_affine

    out = Path(demo["predict"])
    result = json.loads((out / "result.json").read_text())
    study = next(
        p for p in (Path(demo["out"]) / "data" / "test_images").iterdir() if p.name == result["StudyInstanceUID"]
    )
    vol = load_series(study)
    img = nib.load(out / "mask.nii.gz")
    assert img.shape == vol.shape[::-1]
    np.testing.assert_allclose(img.affine, nifti_affine(vol.affine), atol=1e-4)
    mask = np.asarray(img.dataobj)
    assert mask.max() <= 7
    for k in PREDICTION_TYPES:
        assert 0.0 <= result[k] <= 1.0
    assert set(result["vertebrae"]) == {f"C{i}" for i in range(1, 8)}
    assert {"decode", "segment", "crop", "classify"} <= set(result["timings_s"])
    assert isinstance(result["mask_cleanup"], list)  # stray pieces are listed there, not among the warnings
    assert not any("extra piece" in w for w in result["warnings"])
    assert 'data-images="ok:' not in (out / "report.html").read_text()  # set by the browser, not written
    assert (out / "report.png").stat().st_size > 10_000


def test_predict_on_nifti_in_any_orientation_equals_dicom(demo: dict, tmp_path: Path) -> None:
    """The study as a sagittal (PIR) NIfTI: the same answer as from its DICOM, and a mask that overlays it."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    from cspine.io import load_series, load_study, save_nifti
    from cspine.predict import PredictConfig, predict_study

    result = json.loads((Path(demo["predict"]) / "result.json").read_text())
    vol = load_series(Path(demo["out"]) / "data" / "test_images" / result["StudyInstanceUID"])
    axial = nib.load(save_nifti(vol.array, vol, tmp_path / "axial.nii.gz"))
    pir = axial.as_reoriented(ornt_transform(io_orientation(axial.affine), axcodes2ornt(("P", "I", "R"))))
    nib.save(pir, tmp_path / "pir.nii.gz")
    back = load_study(tmp_path / "pir.nii.gz")
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)
    pir_cfg = PredictConfig(study=tmp_path / "pir.nii.gz", model=Path(demo["model"]), out=tmp_path / "p")
    got = predict_study(replace(pir_cfg, assume_cervical=True))
    for k in PREDICTION_TYPES:
        assert got[k] == pytest.approx(result[k], abs=1e-5)
    dicom_mask = np.asarray(nib.load(Path(demo["predict"]) / "mask.nii.gz").dataobj)
    nifti_mask = np.asarray(nib.load(tmp_path / "p" / "mask.nii.gz").dataobj)
    np.testing.assert_array_equal(nifti_mask, dicom_mask)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cspine.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_predict_and_bad_model_dirs(demo: dict, tmp_path: Path) -> None:
    study = next((Path(demo["out"]) / "data" / "test_images").iterdir())
    ok = _cli("predict", str(study), "--model", demo["model"], "--out", str(tmp_path / "p"), "--no-report",
              "--assume-cervical")
    assert ok.returncode == 0, ok.stderr
    assert "patient_overall" in ok.stdout and (tmp_path / "p" / "result.json").exists()
    # A single-stage directory, a partial copy and a future format: exit 2, one line, no traceback.
    seg_only = Path(demo["model"]) / "seg"
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "bundle.json").write_text((Path(demo["model"]) / "bundle.json").read_text())
    future = tmp_path / "future"
    future.mkdir()
    (future / "bundle.json").write_text(json.dumps({"format": 99, "cspine": "9.0.0"}))
    for model, message in (
        (seg_only, "not a cspine model bundle"),
        (partial, "incomplete bundle, missing seg/"),
        (future, "bundle format 99"),
    ):
        bad = _cli("predict", str(study), "--model", str(model), "--out", str(tmp_path / "x"))
        assert bad.returncode == 2 and "Traceback" not in bad.stderr
        lines = [line for line in bad.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], bad.stderr
    nodicom = _cli("predict", str(tmp_path), "--model", demo["model"], "--out", str(tmp_path / "y"))
    assert nodicom.returncode == 2 and "no DICOM image found" in nodicom.stderr


def test_no_cervical_spine_in_view_gives_nulls_a_line_and_prevalence_rows(
    demo: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the anatomical checks find no cervical spine: predict exits 0 with one line and null probabilities;
    submit still writes every row, with the prevalence, and says how many rows were not in view."""
    import cspine.seg.infer as seg_infer
    from cspine.labels import PREVALENCE, split_row_id
    from cspine.submit import SubmitConfig, submit

    def nothing_here(mask: np.ndarray, vol: object, cfg: object) -> tuple[np.ndarray, dict, list[str]]:
        return np.zeros_like(mask), {"cervical_spine": "absent", "rejected": {"C2": "test"}}, ["no cervical spine"]

    monkeypatch.setattr(seg_infer, "check_presence", nothing_here)
    from cspine.cli import main

    study = next((Path(demo["out"]) / "data" / "test_images").iterdir())
    assert main(["predict", str(study), "--model", demo["model"], "--out", str(tmp_path / "p")]) == 0
    result = json.loads((tmp_path / "p" / "result.json").read_text())
    assert result["cervical_spine"] == "absent"
    assert all(result[k] is None for k in PREDICTION_TYPES)
    assert result["vertebrae"]["C2"]["present"] is False and result["vertebrae"]["C2"]["rejected"] == "test"
    assert "n/a (no cervical spine" in (tmp_path / "p" / "report.html").read_text()
    summary = submit(SubmitConfig(data=Path(demo["out"]) / "data", model=Path(demo["model"]),
                                  out=tmp_path / "submission.csv", device="cpu"))
    assert summary["studies_without_cervical_spine"] == summary["studies"] == 3
    assert summary["rows_not_in_view"] == 3 * len(PREDICTION_TYPES)
    with open(tmp_path / "submission.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * len(PREDICTION_TYPES)
    assert all(float(r["fractured"]) == pytest.approx(PREVALENCE[split_row_id(r["row_id"])[1]]) for r in rows)


def test_a_scan_coarser_than_the_classifier_learned_from_is_not_assessed(demo: dict, tmp_path: Path) -> None:
    """Outside the classifier's domain (cspine.cls.domain; here a bundle whose classifier says it learned from
    0.3 mm studies): predict exits 0 with null probabilities, the masks and a warning that says why; the report
    says "not assessed"; submit writes the prevalence for every row and counts the study as not assessed."""
    import shutil

    from cspine.cli import main
    from cspine.cls.domain import NetworkDomain
    from cspine.labels import PREVALENCE, split_row_id
    from cspine.submit import SubmitConfig, submit

    model = tmp_path / "model"
    shutil.copytree(demo["model"], model)
    NetworkDomain((0.3, 0.3, 0.3), 1).save(model / "cls")
    study = next((Path(demo["out"]) / "data" / "test_images").iterdir())
    assert main(["predict", str(study), "--model", str(model), "--out", str(tmp_path / "p")]) == 0
    result = json.loads((tmp_path / "p" / "result.json").read_text())
    assert result["cervical_spine"] == "present" and result["fractures"] == "not assessed"
    assert all(result[k] is None for k in PREDICTION_TYPES)
    assert any("fractures not assessed (pixel spacing" in w for w in result["warnings"]), result["warnings"]
    assert sum(v["present"] for v in result["vertebrae"].values()) >= 5  # the masks are still there
    assert np.asarray(nib.load(tmp_path / "p" / "mask.nii.gz").dataobj).any()
    assert "n/a (fractures not assessed)" in (tmp_path / "p" / "report.html").read_text()
    summary = submit(SubmitConfig(data=Path(demo["out"]) / "data", model=model, out=tmp_path / "s.csv", device="cpu"))
    assert summary["studies_not_assessed"] == summary["studies"] == 3 and summary["rows_not_in_view"] == 0
    with open(tmp_path / "s.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * len(PREDICTION_TYPES)
    assert all(float(r["fractured"]) == pytest.approx(PREVALENCE[split_row_id(r["row_id"])[1]]) for r in rows)


def test_predict_with_the_users_own_mask_in_any_convention(demo: dict, tmp_path: Path) -> None:
    """--mask replaces the segmenter: the RSNA mask of a training study and the same mask in TotalSegmentator's
    values give the same answer, and the levels reported present are the mask's."""
    from cspine.cli import main
    from cspine.io import load_segmentation, load_series

    data = Path(demo["out"]) / "data"
    seg_file = next((data / "segmentations").iterdir())
    uid = seg_file.name.removesuffix(".nii")
    study = data / "train_images" / uid
    img = nib.load(seg_file)
    rsna = np.asarray(img.dataobj).astype(np.uint8)
    ts = np.where((rsna >= 1) & (rsna <= 19), 51 - rsna, 0).astype(np.uint8)
    nib.save(nib.Nifti1Image(ts, img.affine), tmp_path / "ts.nii.gz")
    results = []
    for mask, labels in ((seg_file, "rsna"), (tmp_path / "ts.nii.gz", "totalsegmentator")):
        out = tmp_path / labels
        assert main(["predict", str(study), "--model", demo["model"], "--out", str(out), "--mask", str(mask),
                     "--labels", labels, "--no-report"]) == 0
        results.append(json.loads((out / "result.json").read_text()))
    expected = load_segmentation(seg_file, load_series(study))
    present = {f"C{v}" for v in range(1, 8) if (expected == v).any()}
    assert {k for k, v in results[0]["vertebrae"].items() if v["present"]} == present
    assert all(results[0][k] == pytest.approx(results[1][k]) for k in PREDICTION_TYPES)
    assert all(results[0][k] is not None for k in ("patient_overall", *sorted(present)))


def test_users_mask_without_cervical_levels_on_a_real_ct(demo: dict, real: Path, tmp_path: Path) -> None:
    """TotalSegmentator's own mask of the real abdomen series (T11..L5 only): no cervical spine, said plainly."""
    from cspine.cli import main

    out = tmp_path / "p"
    series = real / "series" / "totalseg_example_ct_dicom"
    mask = real / "series" / "totalseg_example_ct_dicom_reference_seg.nii.gz"
    assert main(["predict", str(series), "--model", demo["model"], "--out", str(out), "--mask", str(mask),
                 "--labels", "totalsegmentator"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["cervical_spine"] == "absent" and all(result[k] is None for k in PREDICTION_TYPES)
    assert not np.asarray(nib.load(out / "mask.nii.gz").dataobj).any()


def test_heldout_reuses_a_segmentation_only_from_the_same_segmenter(demo: dict, tmp_path: Path) -> None:
    """bench_heldout's --seg-cache: a second run reads the stored segmentations and gives the same figures and
    per-study arrays; a bundle whose segmenter differs by one byte gets a folder of its own."""
    import shutil

    from benchmarks.bench_heldout import heldout, segmenter_digest

    model, cache = Path(demo["model"]), tmp_path / "seg"
    first = heldout(model, studies=3, seed=31, seg_cache=cache, save=tmp_path / "a.npz")
    stored = sorted(cache.rglob("*.npz"))
    assert [p.name for p in stored] == [f"test-31-{i}.npz" for i in range(3)]
    assert stored[0].parent.name == segmenter_digest(model)
    stamps = [p.stat().st_mtime_ns for p in stored]
    again = heldout(model, studies=3, seed=31, seg_cache=cache, save=tmp_path / "b.npz")
    assert [p.stat().st_mtime_ns for p in stored] == stamps  # read, not rewritten
    for k in ("competition_loss", "mean_vertebra_auc_by_path", "rows_not_in_view"):
        assert again[k] == first[k]
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert set(a.files) == {"labels", "probabilities", "network", "statistics"}
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k])
    other = tmp_path / "other"
    shutil.copytree(model, other)
    config = other / "seg" / "config.json"
    config.write_text(config.read_text() + " ")
    assert segmenter_digest(other) != segmenter_digest(model)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the demo (~5 min) and 200 studies segmented and classified (~10 min)
def test_demo_meets_the_issue_targets_on_a_fresh_set(tmp_path: Path) -> None:
    """Issue 14's target for the demo as a user runs it (default sizes): on 200 fresh generated studies of a seed it
    never saw, competition loss <= 0.85 x that set's own per-column prevalence and mean vertebra AUC >= 0.85
    (session 17, 96 training studies: 0.63 x and 0.855 on seed 11; benchmarks/cls_results.md)."""
    from benchmarks.bench_heldout import heldout

    from cspine.demo import DemoConfig, run_demo

    s = run_demo(DemoConfig(out=tmp_path / "demo", device="cpu"), progress=False)
    fresh = heldout(Path(s["model"]), studies=200, seed=11)
    assert fresh["competition_loss"] <= 0.85 * fresh["baselines"]["own_prevalence"], fresh
    assert fresh["mean_vertebra_auc"] >= 0.85, fresh
