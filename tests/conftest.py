"""Shared test fixtures: the real third-party files and a tiny DICOM series writer."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

REAL = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real").resolve()


@pytest.fixture(scope="session")
def real() -> Path:
    """The folder of real third-party CT files; tests using it skip when it is absent."""
    if not (REAL / "MANIFEST.md").exists():
        pytest.skip(f"real CT files not found at {REAL} (../shared/data/real beside the repository)")
    return REAL


def write_slice(
    path: Path,
    hu: np.ndarray,
    position: tuple[float, float, float],
    instance: int,
    *,
    series_uid: str = "1.2.826.0.1.3680043.8.498.1",
    study_uid: str = "1.2.826.0.1.3680043.8.498.2",
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    spacing: tuple[float, float] = (0.5, 0.5),
    intercept: int = -1024,
    syntax: str = "1.2.840.10008.1.2.1",
) -> Path:
    """Write one CT slice (HU array) as a minimal valid DICOM file, optionally compressed."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    sop = generate_uid(entropy_srcs=[series_uid, str(instance), str(position)])
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.PatientName = "TEST^SYNTHETIC"
    ds.PatientID = "TEST"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in spacing]
    ds.SliceThickness = 1.0
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = 1
    ds.PixelData = np.clip(hu.astype(np.int32) - intercept, 0, 65535).astype(np.uint16).tobytes()
    if syntax != ExplicitVRLittleEndian:
        ds.compress(syntax)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def make_series() -> Callable[..., tuple[Path, np.ndarray]]:
    """Write a small axial series; returns (folder, HU array in ascending-z order)."""

    def make(
        folder: Path,
        n: int = 6,
        shape: tuple[int, int] = (16, 12),
        step: float = 1.0,
        top_first: bool = True,
        seed: int = 0,
        **kw: object,
    ) -> tuple[Path, np.ndarray]:
        rng = np.random.default_rng(seed)
        vol = rng.integers(-1024, 2000, size=(n, *shape)).astype(np.int16)
        for z in range(n):
            instance = n - z if top_first else z + 1
            write_slice(folder / f"{instance}.dcm", vol[z], (-10.0, -20.0, 100.0 + z * step), instance, **kw)
        return folder, vol

    return make


@pytest.fixture
def torchrun() -> Callable[[list[str]], subprocess.CompletedProcess[str]]:
    """Runs ``torchrun --nproc_per_node 2 -m cspine.cli ARGS`` on a free port, one thread per process."""
    exe = Path(sys.executable).with_name("torchrun")
    if not exe.exists():
        pytest.skip("torchrun not installed beside the interpreter")

    def run(args: list[str]) -> subprocess.CompletedProcess[str]:
        with socket.socket() as sock:  # a free port: a fixed one can collide with another run's (a flaky failure)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [str(exe), "--nproc_per_node", "2", "--master_port", str(port), "-m", "cspine.cli", *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)

    return run


class StubBundle:
    """Stands in for a trained model bundle where a test checks what is done with a prediction, not the model.

    The mask is the study's bone (> 300 HU) cut into seven equal bands along the slice axis, labelled C1 (top) to
    C7; C2 and C5 are flagged (p 0.9, 0.6), C2's slice score peaks in the middle of its band.
    """

    PROBS: ClassVar[dict[str, float]] = {
        "patient_overall": 0.8, "C1": 0.1, "C2": 0.9, "C3": 0.2, "C4": 0.05, "C5": 0.6, "C6": 0.3, "C7": 0.1
    }  # fmt: skip

    def summary(self) -> dict[str, str]:
        return {"path": "stub-model", "cspine": "0.1.0", "created": "2026-01-01T00:00:00"}

    def predict(self, vol, timings=None, **kwargs):
        from cspine.bundle import Prediction

        nz = vol.shape[0]
        band = np.minimum(np.arange(nz) * 7 // nz, 6)
        if vol.affine[2, 0] > 0:  # z runs to the head: C1 is the last band
            band = 6 - band
        mask = np.where(vol.array > 300, (band + 1)[:, None, None], 0).astype(np.uint8)
        c2 = np.flatnonzero(band == 1)
        return Prediction(
            probabilities=dict(self.PROBS),
            mask=mask,
            vertebrae={f"C{i}": {"present": True, "cut_off": i == 7} for i in range(1, 8)},
            slice_scores={"C2": [(int(c2[0]), 0.2), (int(c2[len(c2) // 2]), 0.95)]},
        )


@pytest.fixture
def stub_bundle() -> StubBundle:
    """A model bundle stand-in (see :class:`StubBundle`)."""
    return StubBundle()


def stop_process(proc: subprocess.Popen) -> None:
    """Stop a server a test started (Orthanc, Chromium): terminate, then kill if it lingers."""
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)
