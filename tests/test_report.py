"""The study report: PNG overview coloured by probability, self-contained HTML that loads in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cspine.report import write_report


@pytest.fixture(scope="module")
def study():
    from cspine.synth import generate_study

    return generate_study(1, "small", 5)


RESULT = {
    "StudyInstanceUID": "1.2.3",
    "patient_overall": 0.8,
    **{f"C{i}": p for i, p in zip(range(1, 8), [0.1, 0.9, 0.2, 0.05, 0.6, 0.3, 0.1], strict=True)},
    "vertebrae": {"C7": {"present": False}},
    "warnings": ["C7 outside the field of view <check>"],
}


def test_report_files_and_content(tmp_path: Path, study) -> None:
    png, html = write_report(tmp_path, study.volume, study.mask, RESULT, slice_scores={"C2": [(40, 0.9), (41, 0.2)]})
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    red = (img[..., 0] > 180) & (img[..., 1] < 90)  # C2 at p = 0.9 is drawn red
    green = (img[..., 1] > 180) & (img[..., 0] < 120)  # C4 at p = 0.05 is drawn green
    assert red.sum() > 50 and green.sum() > 50
    text = html.read_text()
    assert len(re.findall(r"src='data:image/png;base64,|src=\"data:image/png;base64,", text)) == 3  # overview + C2 + C5
    assert not re.search(r"src=['\"](?!data:)", text)  # nothing external
    assert "&lt;check&gt;" in text  # warnings are escaped
    assert "<tr class='hit' data-vertebra='C2'><td>C2</td>" in text
    assert "<tr class='' data-vertebra='C4'><td>C4</td>" in text


def test_report_opens_in_headless_chromium(tmp_path: Path, study) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed (CI installs Debian's chromium package)")
    _, html = write_report(tmp_path, study.volume, study.mask, RESULT)
    out = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            html.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0
    # The page's own script marks that every embedded image decoded.
    assert 'data-images="ok:3"' in out.stdout
