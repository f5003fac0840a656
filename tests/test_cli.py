"""The command line: fast help, one clear line and exit code 2 for bad input, real outputs for good input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cspine.cli import main


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cspine.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_is_fast_and_lists_subcommands() -> None:
    out = _run("--help")
    assert out.returncode == 0
    for cmd in ("info", "show", "synth", "prepare"):
        assert cmd in out.stdout
    # fast because building the parser imports neither torch nor monai nor pydicom (no timing asserted)
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, cspine.cli; cspine.cli.build_parser(); "
            "print(any(m in sys.modules for m in ('torch', 'monai', 'pydicom')))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["info", "/nonexistent/study"], "no such file or folder"),
        (["show", "/nonexistent/study"], "no such file or folder"),
        (["prepare", "--data", "/nonexistent", "--out", "x"], "no such file or folder"),
        (["prepare", "--data", ".", "--out", "x", "--shard", "3/2"], "--shard"),
    ],
)
def test_bad_input_exits_2_with_one_line(args: list[str], message: str) -> None:
    out = _run(*args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    err_lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(err_lines) == 1 and message in err_lines[0]


def test_demo_uses_the_shipped_network_unless_told_not_to() -> None:
    from cspine.cli.parser import build_parser

    parser = build_parser()
    assert parser.parse_args(["demo"]).shipped_network is True
    assert parser.parse_args(["demo", "--no-shipped-network"]).shipped_network is False


def test_no_dicom_folder_exits_2(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    out = _run("info", str(tmp_path))
    assert out.returncode == 2 and "no DICOM image found" in out.stderr and "Traceback" not in out.stderr


def test_info_and_show_on_a_series(tmp_path: Path, make_series, capsys) -> None:
    folder, vol = make_series(tmp_path / "s", n=6, shape=(20, 24))
    assert main(["info", str(folder)]) == 0
    text = capsys.readouterr().out
    assert '"shape_zyx": [\n    6,\n    20,\n    24\n  ]' in text and '"modality": "CT"' in text
    assert "TEST^SYNTHETIC" not in text  # no patient identity in outputs
    mask = np.zeros(vol.shape, np.uint8)
    mask[1:4, 5:10, 5:12] = 2
    from cspine.io import load_series, save_nifti

    seg = save_nifti(mask, load_series(folder), tmp_path / "seg.nii.gz")
    png = tmp_path / "view.png"
    assert main(["show", str(folder), "--seg", str(seg), "--out", str(png)]) == 0
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert img.shape[0] > 100 and img.shape[1] > 300
    # The C2 colour (orange, #f58231) is blended into the picture where the mask is drawn.
    orange = (img[..., 0] > 150) & (img[..., 1] > 60) & (img[..., 1] < 160) & (img[..., 2] < 110)
    assert orange.sum() > 20
