"""`cspine pacs` against a real Orthanc with its DICOMweb plugin: query, retrieve, predict, STOW SEG + SR back.

Orthanc (Debian packages ``orthanc`` and ``orthanc-dicomweb``) is started on a free 127.0.0.1 port with a temporary
storage folder, remote access off and the DICOM port closed, and stopped at teardown. The model is the conftest
stand-in: what is tested is the PACS traffic and the batch logic.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest

from conftest import stop_process
from cspine import bundle as bundle_mod
from cspine.cli import main
from cspine.pacs import JOURNAL, Pacs, PacsConfig, PacsError, run_pacs

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory) -> str:
    """A running Orthanc; yields its DICOMweb root URL."""
    exe = shutil.which("Orthanc")
    if exe is None or not PLUGIN.exists():
        pytest.skip("Orthanc + DICOMweb plugin not installed (Debian orthanc, orthanc-dicomweb; CI installs them)")
    root = tmp_path_factory.mktemp("orthanc")
    port = _free_port()
    config = {
        "Name": "cspine-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
        "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "StableAge": 1,
    }  # fmt: skip
    (root / "orthanc.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "w")  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen([exe, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                with urllib.request.urlopen(f"{base}/dicom-web/studies", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"Orthanc exited: {(root / 'orthanc.log').read_text()[-2000:]}")
                time.sleep(0.1)
        else:
            pytest.fail("Orthanc did not answer within 20 s")
        yield f"{base}/dicom-web"
    finally:
        stop_process(proc)
        log.close()


def _upload(url: str, folder: Path) -> None:
    Pacs(url).store(sorted(folder.iterdir()))


@pytest.fixture(scope="module")
def studies(orthanc: str, tmp_path_factory) -> dict[str, str]:
    """In Orthanc: a generated CT study, a CT study with a missing slice, an MR-only study. Returns name -> UID."""
    import numpy as np

    from conftest import write_slice
    from cspine.synth import generate_study
    from cspine.synth.writer import write_series

    root = tmp_path_factory.mktemp("upload")
    study = generate_study(5, "small", 2)
    write_series(study, root / "ct", patient_number=3)
    rng = np.random.default_rng(0)
    for z in (0, 1, 2, 5):  # slices 3 and 4 missing
        write_slice(root / "gap" / f"{z}.dcm", rng.integers(-1000, 1000, (16, 12)).astype(np.int16),
                    (0.0, 0.0, float(z)), z + 1, study_uid="1.2.826.0.1.3680043.8.498.71",
                    series_uid="1.2.826.0.1.3680043.8.498.72")  # fmt: skip
    for z in range(3):
        f = write_slice(root / "mr" / f"{z}.dcm", np.zeros((8, 8), np.int16), (0.0, 0.0, float(z)), z + 1,
                        study_uid="1.2.826.0.1.3680043.8.498.81", series_uid="1.2.826.0.1.3680043.8.498.82")
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(f)
    for name in ("ct", "gap", "mr"):
        _upload(orthanc, root / name)
    return {"ct": study.uid, "gap": "1.2.826.0.1.3680043.8.498.71", "mr": "1.2.826.0.1.3680043.8.498.81"}


@pytest.fixture
def stub(monkeypatch, stub_bundle):
    monkeypatch.setattr(bundle_mod, "load_bundle", lambda *a, **k: stub_bundle)
    return stub_bundle


def _modalities(url: str, uid: str) -> list[str]:
    series = Pacs(url).client.search_for_series(study_instance_uid=uid)
    return sorted(s["00080060"]["Value"][0] for s in series)


def test_round_trip_stores_seg_sr_ko(orthanc: str, studies: dict[str, str], tmp_path: Path, stub, capsys) -> None:
    assert _modalities(orthanc, studies["ct"]) == ["CT"]
    code = main(["pacs", "--url", orthanc, "--model", str(tmp_path), "--study", studies["ct"],
                 "--out", str(tmp_path / "out"), "--no-progress"])  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["processed"] == 1 and summary["failed"] == []
    assert _modalities(orthanc, studies["ct"]) == ["CT", "KO", "SEG", "SR"]
    result = json.loads((tmp_path / "out" / studies["ct"] / "result.json").read_text())
    assert result["StudyInstanceUID"] == studies["ct"] and result["C2"] == pytest.approx(0.9)
    # What Orthanc holds is what was written: the SEG retrieved back is byte-equal in its pixels.
    client = Pacs(orthanc).client
    seg_series = [s["0020000E"]["Value"][0] for s in client.search_for_series(study_instance_uid=studies["ct"])
                  if s["00080060"]["Value"][0] == "SEG"]  # fmt: skip
    (stored,) = client.retrieve_series(studies["ct"], seg_series[0])
    local = pydicom.dcmread(tmp_path / "out" / studies["ct"] / "dicom" / "seg.dcm")
    assert stored.SOPInstanceUID == local.SOPInstanceUID and stored.PixelData == local.PixelData


def test_batch_goes_on_past_a_bad_study_and_resumes(orthanc: str, studies: dict[str, str], tmp_path: Path,
                                                     stub) -> None:  # fmt: skip
    cfg = PacsConfig(url=orthanc, model=tmp_path, out=tmp_path / "out", query={"ModalitiesInStudy": "CT"},
                     store=False)  # fmt: skip
    summary = run_pacs(cfg)
    assert summary["studies"] == 2  # the MR study does not match the query
    assert [f["uid"] for f in summary["failed"]] == [studies["gap"]]
    assert "missing slice" in summary["failed"][0]["error"]
    assert summary["processed"] == 1
    again = run_pacs(cfg)  # resumable: the done study is skipped, the failed one retried
    assert again["done_before"] == 1 and again["processed"] == 0 and len(again["failed"]) == 1
    lines = (tmp_path / "out" / JOURNAL).read_text().splitlines()
    assert len(lines) == 3


@pytest.mark.parametrize(("which", "message"), [("mr", "has no CT series (modalities: MR)"),
                                                 ("missing", "not found")])  # fmt: skip
def test_bad_study_one_clear_line(orthanc: str, studies: dict[str, str], tmp_path: Path, stub, which, message) -> None:
    uid = studies.get(which, "1.2.3.4.5.6.7")
    with pytest.raises(PacsError, match=re.escape(message)):
        run_pacs(PacsConfig(url=orthanc, model=tmp_path, out=tmp_path / "out", studies=(uid,)))


def test_server_down_exits_2_with_one_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}/dicom-web"
    out = subprocess.run([sys.executable, "-m", "cspine.cli", "pacs", "--url", url, "--model", str(tmp_path),
                          "--study", "1.2.3", "--out", str(tmp_path / "o")], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "PACS not reachable" in lines[0] and url in lines[0]


@pytest.mark.parametrize(("extra", "message"), [(["--url", "ftp://x"], "--url must be"),
                                                (["--query", "nonsense"], "KEY=VALUE"),
                                                (["--limit", "0"], "--limit")])  # fmt: skip
def test_bad_options_exit_2(tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    args = ["pacs", "--url", "http://127.0.0.1:1/dicom-web", "--model", str(tmp_path), "--out", str(tmp_path / "o"),
            "--study", "1.2.3"]  # fmt: skip
    for i in range(0, len(extra), 2):  # later options override the defaults above
        args += extra[i : i + 2]
    assert main(args) == 2
    assert message in capsys.readouterr().err
