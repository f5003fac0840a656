"""`cspine prepare`: cache every study, record failures and go on, resume after an interrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cspine.data import cache
from cspine.data.cache import PrepareConfig, load_prepared, prepare_dataset, prepared_studies
from cspine.io import load_series, save_nifti

UIDS = ["1.2.3.100", "1.2.3.101", "1.2.3.102"]


@pytest.fixture
def dataset(tmp_path: Path, make_series) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "rsna"
    vols = {}
    for k, uid in enumerate(UIDS):
        _, vols[uid] = make_series(
            root / "train_images" / uid, n=5 + k, top_first=k % 2 == 0, seed=k, study_uid=uid, series_uid=uid + ".1"
        )
    _, vols["1.2.3.200"] = make_series(root / "test_images" / "1.2.3.200", n=4, seed=9, study_uid="1.2.3.200")
    (root / "train_images" / "1.2.3.999").mkdir()
    (root / "train_images" / "1.2.3.999" / "1.dcm").write_bytes(b"DICM" * 10)  # broken study
    (root / "train.csv").write_text(
        "StudyInstanceUID,patient_overall,C1,C2,C3,C4,C5,C6,C7\n"
        + "".join(f"{u},1,0,1,0,0,0,0,0\n" for u in [*UIDS, "1.2.3.999"])
    )
    (root / "train_bounding_boxes.csv").write_text(
        "StudyInstanceUID,x,y,width,height,slice_number\n1.2.3.100,2.5,3.0,4.0,5.0,2\n"
    )
    mask = np.zeros(vols[UIDS[0]].shape, np.uint8)
    mask[1:3, 2:6, 3:7] = 2
    vol0 = load_series(root / "train_images" / UIDS[0])
    save_nifti(mask, vol0, root / "segmentations" / f"{UIDS[0]}.nii")
    return root, {"mask": mask, **vols}


def test_prepare_caches_studies_and_records_failures(tmp_path: Path, dataset) -> None:
    root, arrays = dataset
    out = tmp_path / "cache"
    report = prepare_dataset(PrepareConfig(data=root, out=out))
    assert report["prepared"] == 4 and report["failed"] == 1
    failures = json.loads((out / "failures.json").read_text())
    assert [f["uid"] for f in failures] == ["1.2.3.999"]
    assert "1.2.3.999" in failures[0]["error"] and "DicomError" in failures[0]["error"]
    assert [p.name for p in prepared_studies(out, "train")] == UIDS
    s0 = load_prepared(out / "train" / UIDS[0])
    np.testing.assert_array_equal(s0.volume.array, arrays[UIDS[0]])
    np.testing.assert_array_equal(s0.mask, arrays["mask"])
    assert s0.labels == {"patient_overall": 1, "C1": 0, "C2": 1, "C3": 0, "C4": 0, "C5": 0, "C6": 0, "C7": 0}
    assert s0.boxes == [{"x": 2.5, "y": 3.0, "width": 4.0, "height": 5.0, "slice_number": 2}]
    np.testing.assert_allclose(s0.volume.affine, load_series(root / "train_images" / UIDS[0]).affine)
    assert list(s0.volume.instance_numbers) == [5, 4, 3, 2, 1]
    assert load_prepared(out / "train" / UIDS[1]).mask is None
    test = load_prepared(out / "test" / "1.2.3.200")
    np.testing.assert_array_equal(test.volume.array, arrays["1.2.3.200"])
    record = json.loads((out / "prepare.json").read_text())
    assert record["versions"]["cspine"] and record["prepared"] == 4


def test_prepare_resumes_after_interruption(tmp_path: Path, dataset, monkeypatch) -> None:
    root, _ = dataset
    out = tmp_path / "cache"
    real_save = cache.save_prepared
    calls = {"n": 0}

    def killed_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the run is killed while writing the second study
        return real_save(*args, **kwargs)

    monkeypatch.setattr(cache, "save_prepared", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(PrepareConfig(data=root, out=out))
    done = prepared_studies(out, "train")
    assert [p.name for p in done] == [UIDS[0]]
    first_mtime = (done[0] / "meta.json").stat().st_mtime_ns
    (out / "train" / f".{UIDS[1]}.tmp4242").mkdir()  # what a kill in the middle of a write leaves behind
    monkeypatch.setattr(cache, "save_prepared", real_save)
    report = prepare_dataset(PrepareConfig(data=root, out=out))
    assert report["skipped_existing"] == 1 and report["prepared"] == 3 and report["failed"] == 1
    assert (done[0] / "meta.json").stat().st_mtime_ns == first_mtime  # not redone
    assert [p.name for p in prepared_studies(out, "train")] == UIDS
    assert not [p for p in (out / "train").iterdir() if p.name.startswith(".")]  # no stray temporary folders


def test_prepare_shards_partition_the_studies(tmp_path: Path, dataset) -> None:
    root, _ = dataset
    out = tmp_path / "cache"
    a = prepare_dataset(PrepareConfig(data=root, out=out, shard=(0, 2)))
    b = prepare_dataset(PrepareConfig(data=root, out=out, shard=(1, 2)))
    assert a["prepared"] + a["failed"] + b["prepared"] + b["failed"] == 5
    assert len(prepared_studies(out, "train")) + len(prepared_studies(out, "test")) == 4


def test_prepare_cli_exit_code_says_whether_any_failed(tmp_path: Path, dataset) -> None:
    from cspine.cli import main

    root, _ = dataset
    assert main(["prepare", "--data", str(root), "--out", str(tmp_path / "c"), "--no-progress"]) == 1
    import shutil

    shutil.rmtree(root / "train_images" / "1.2.3.999")
    assert main(["prepare", "--data", str(root), "--out", str(tmp_path / "c2"), "--no-progress", "--workers", "2"]) == 0
