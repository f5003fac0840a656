"""`cspine submit`: every row of test.csv in order, failures recorded with a fallback, resumable without duplicates.

The model is replaced by a deterministic stand-in here so that these tests check the batch logic itself;
the end-to-end test with real trained models is in test_demo.py.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cspine import bundle as bundle_mod
from cspine.labels import PREDICTION_TYPES, PREVALENCE
from cspine.submit import SubmitConfig, submit


class StubBundle:
    """Predicts from the study's mean HU, so a wrong study/row pairing would show."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.calls = 0
        self.fail_on_call = fail_on_call

    def predict(self, vol) -> SimpleNamespace:
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise KeyboardInterrupt  # the run is killed here
        base = float(np.clip((vol.array.mean() + 1000) / 3000, 0.01, 0.99))
        probs = {k: round(base / (i + 1), 6) for i, k in enumerate(PREDICTION_TYPES)}
        return SimpleNamespace(probabilities=probs, not_assessed=None)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A model folder of its own (its files are hashed into the journal; outputs must not live in it)."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "bundle.json").write_text("{}")
    return d


@pytest.fixture(scope="module")
def test_set(tmp_path_factory) -> Path:
    from cspine.synth import SynthConfig, generate_dataset

    root = tmp_path_factory.mktemp("rsna")
    generate_dataset(SynthConfig(out=root, studies=1, test_studies=4, seed=11, segmented=0.0), progress=False)
    uids = sorted(p.name for p in (root / "test_images").iterdir())
    broken = root / "test_images" / uids[1]
    for f in list(broken.iterdir())[::3]:
        f.write_bytes(f.read_bytes()[:300])  # truncated slices
    return root


def _read(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _expected_rows(root: Path) -> list[str]:
    return [r[0] for r in _read(root / "test.csv")[1:]]


def test_submit_writes_every_row_and_records_failure(tmp_path: Path, test_set: Path, model: Path, monkeypatch) -> None:
    stub = StubBundle()
    monkeypatch.setattr(bundle_mod, "load_bundle", lambda *a, **k: stub)
    out = tmp_path / "submission.csv"
    summary = submit(SubmitConfig(data=test_set, model=model, out=out))
    rows = _read(out)
    assert rows[0] == ["row_id", "fractured"]
    assert [r[0] for r in rows[1:]] == _expected_rows(test_set)  # exactly test.csv's rows, in its order
    assert all(0.0 <= float(r[1]) <= 1.0 for r in rows[1:])
    failures = json.loads((tmp_path / "submission.failures.json").read_text())
    broken_uid = sorted(p.name for p in (test_set / "test_images").iterdir())[1]
    assert [f["StudyInstanceUID"] for f in failures] == [broken_uid]
    assert "DicomError" in failures[0]["error"]
    fallback = {r[0]: float(r[1]) for r in rows[1:] if r[0].startswith(broken_uid + "_")}
    assert fallback == {f"{broken_uid}_{k}": pytest.approx(PREVALENCE[k]) for k in PREDICTION_TYPES}
    assert summary["failed"] == 1 and summary["rows"] == len(rows) - 1


def test_submit_resumes_after_kill_without_duplicates(tmp_path: Path, test_set: Path, model: Path, monkeypatch) -> None:
    out = tmp_path / "submission.csv"
    killer = StubBundle(fail_on_call=3)
    monkeypatch.setattr(bundle_mod, "load_bundle", lambda *a, **k: killer)
    with pytest.raises(KeyboardInterrupt):
        submit(SubmitConfig(data=test_set, model=model, out=out))
    assert not out.exists()  # no half submission
    journal = [json.loads(line) for line in (tmp_path / "submission.csv.journal.jsonl").read_text().splitlines()]
    predicted_before = sum("pred" in r for r in journal)
    assert predicted_before == 2  # the third model call was killed and left nothing behind
    fresh = StubBundle()
    monkeypatch.setattr(bundle_mod, "load_bundle", lambda *a, **k: fresh)
    summary = submit(SubmitConfig(data=test_set, model=model, out=out))
    # The predicted rows are reused; the failed one (the truncated study) is tried again, as every rerun does.
    assert summary["reused_from_journal"] == predicted_before and summary["recomputed"]["retry_failed"] == 1
    assert predicted_before + fresh.calls == 3  # each of the 3 readable studies predicted exactly once
    rows = _read(out)
    assert [r[0] for r in rows[1:]] == _expected_rows(test_set)
    # Same numbers as an uninterrupted run.
    monkeypatch.setattr(bundle_mod, "load_bundle", lambda *a, **k: StubBundle())
    ref = tmp_path / "ref.csv"
    submit(SubmitConfig(data=test_set, model=model, out=ref))
    assert _read(ref) == rows
