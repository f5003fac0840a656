"""Hostile, damaged and unusual inputs: each refused with exit code 2 and one line naming the file, or read right.

A corpus of inputs is generated here (pydicom, nibabel, zipfile; nothing downloaded): native decoder panics, memory
bombs (a 2 MB deflated DICOM declaring 32768 x 32768 pixels, a zip expanding to 6 GiB), impossible geometry, other
modalities, NaN, corrupt codestreams, named pipes. Each case asserts the exit code, a single stderr line that names
the file, no traceback and no partial output; bombs also assert the peak memory of the process that met them.
Then the batch behaviours: a decoder that crashes, submit reruns (model and input identity, failed rows retried),
prepare with workers, predict's output replaced as a whole, stale decode buffers, a non-UTF-8 output path.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import write_slice
from cspine.cli import main
from cspine.errors import CspineInputError, ResourceLimitError

RLE = "1.2.840.10008.1.2.5"
J2K = "1.2.840.10008.1.2.4.90"
DEFLATED = "1.2.840.10008.1.2.1.99"
#: A bomb may not take a process past this (the issue's bar: 1.5 GB).
PEAK_LIMIT_MB = 1500


# ----------------------------------------------------------------------------------------------------------------------
# Building hostile inputs
# ----------------------------------------------------------------------------------------------------------------------


def phantom(n: int = 6, shape: tuple[int, int] = (32, 32)) -> np.ndarray:
    """A smooth neck-like stack: air, a soft-tissue disc, a bone ring that drifts a little from slice to slice."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    r = np.hypot(yy - cy, xx - cx)
    out = np.empty((n, *shape), np.int16)
    for z in range(n):
        sl = np.full(shape, -1000, np.int16)
        sl[r < shape[0] * 0.45] = 40
        ring = np.abs(r - shape[0] * (0.18 + 0.004 * z)) < 1.5
        sl[ring] = 900
        out[z] = sl
    return out


def series(folder: Path, n: int = 6, shape: tuple[int, int] = (32, 32), step: float = 2.0, **kw) -> Path:
    """A small smooth CT series (slices 1.dcm .. n.dcm, position z = 100 + step * (k - 1))."""
    vol = phantom(n, shape)
    for z in range(n):
        write_slice(folder / f"{z + 1}.dcm", vol[z], (-8.0, -8.0, 100.0 + z * step), z + 1, **kw)
    return folder


def edit(path: Path, **fields: object) -> Path:
    """Rewrite some header fields of a DICOM file (values written as given, however absurd)."""
    import pydicom

    ds = pydicom.dcmread(path)
    for key, value in fields.items():
        setattr(ds, key, value)
    ds.save_as(path)
    return path


def panic_rle_frame() -> bytes:
    """An RLE frame for 32 x 32 16-bit pixels whose runs overflow the segment: pylibjpeg-rle (Rust) panics on it
    with pyo3_runtime.PanicException, a BaseException."""
    segment = bytes([0x81, 0]) * 9  # 9 replicate runs of 128 bytes: 1152 > 1024 bytes per segment
    header = struct.pack("<16L", 2, 64, 64 + len(segment), *([0] * 13))
    return header + segment + segment


def with_frame(path: Path, frame: bytes) -> Path:
    import pydicom
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([frame])
    ds.save_as(path)
    return path


def first_frame(path: Path) -> bytes:
    import pydicom
    from pydicom.encaps import generate_frames

    return next(generate_frames(pydicom.dcmread(path).PixelData, number_of_frames=1))


def deflate_bomb(path: Path, side: int = 32768) -> Path:
    """A Deflated Explicit VR LE file of about 2 MB whose data set declares ``side`` x ``side`` 16-bit pixels.

    Built without compressing gigabytes: a deflate stream of 64 MiB of zeros ending in a full flush is repeated
    (each copy stands alone), after the compressed header, and closed with a final empty block.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.77"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.78", "1.2.826.0.1.3680043.8.498.79"
    ds.Modality, ds.InstanceNumber = "CT", 1
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    nbytes = side * side * 2
    head = body.getvalue() + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", nbytes)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    chunk = 64 << 20
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = z.compress(bytes(chunk)) + z.flush(zlib.Z_FULL_FLUSH)
    stream += block * (nbytes // chunk) + zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = DEFLATED
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    path.write_bytes(out.getvalue() + stream)
    return path


def zip_bomb(path: Path, members: int = 3, member_bytes: int = 2_000_000_000) -> Path:
    """A zip of a few MB whose members declare (and would inflate to) ``members`` x ``member_bytes`` bytes.

    Written by hand from one deflate stream of zeros repeated (as in :func:`deflate_bomb`); the CRCs are not those
    of the data (computing them means reading gigabytes), which only an extraction would ever notice.
    """
    chunk = 64 << 20
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = z.compress(bytes(chunk)) + z.flush(zlib.Z_FULL_FLUSH)
    tail_len = member_bytes % chunk
    t = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = block * (member_bytes // chunk) + t.compress(bytes(tail_len)) + t.flush()
    local, central = b"", b""
    for i in range(members):
        name = f"slice{i}.dcm".encode()
        fields = (20, 0, 8, 0, 0, 0, len(data), member_bytes, len(name), 0)
        offset = len(local)
        local += struct.pack("<IHHHHHIIIHH", 0x04034B50, *fields) + name + data
        central += (
            struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, *fields, 0, 0, 0, 0, offset) + name
        )
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, members, members, len(central), len(local), 0)
    path.write_bytes(local + central + end)
    return path


def nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """A NIfTI file; ``affine`` is written into the header as given (nibabel itself refuses to make a zero one)."""
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))
    if affine is not None:
        assert path.suffix == ".nii"
        raw = bytearray(path.read_bytes())
        hdr = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(bytes(raw[:348])))
        hdr["qform_code"], hdr["sform_code"] = 0, 1
        hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = affine[0], affine[1], affine[2]
        raw[:348] = hdr.binaryblock
        path.write_bytes(bytes(raw))
    return path


def nifti_header_bomb(path: Path, side: int = 4096) -> Path:
    """A .nii whose header declares side^3 int16 voxels but whose file holds almost none."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape((side, side, side))
    hdr.set_data_dtype(np.int16)
    hdr.set_qform(np.eye(4), code=1)
    hdr.set_sform(np.eye(4), code=1)
    path.write_bytes(hdr.binaryblock + b"\0" * 4 + b"\0" * 1024)
    return path


def fake_bundle(folder: Path) -> Path:
    """A bundle folder that passes the cheap check (predict refuses the study before loading any weights)."""
    from cspine import __version__
    from cspine.bundle import BUNDLE_FILE, BUNDLE_FORMAT, component_formats

    for stage in ("seg", "cls"):
        (folder / stage).mkdir(parents=True)
        (folder / stage / "config.json").write_text("{}")
    info = {"format": BUNDLE_FORMAT, "cspine": __version__, "formats": component_formats()}
    (folder / BUNDLE_FILE).write_text(json.dumps(info))
    return folder


# ----------------------------------------------------------------------------------------------------------------------
# The corpus: name -> (command line, text the one error line must hold, file the line must name)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, tuple[list[str], str, Path]]:
    d = tmp_path_factory.mktemp("corpus")
    cases: dict[str, tuple[list[str], str, Path]] = {}

    def info(name: str, target: Path, expect: str, names: Path | None = None, *extra: str) -> None:
        cases[name] = (["info", str(target), *extra], expect, names or target)

    s = series(d / "panic_rle", syntax=RLE)
    info("panic_rle", s, "pixel decoder failed", with_frame(s / "3.dcm", panic_rle_frame()))
    huge = write_slice(d / "rle_huge_header.dcm", phantom(1)[0], (0, 0, 0), 1, syntax=RLE)
    info("rle_declares_32768_squared", edit(huge, Rows=32768, Columns=32768), "--max-slice-pixels")
    j = write_slice(d / "j2k_huge_header.dcm", phantom(1)[0], (0, 0, 0), 1, syntax=J2K)
    info("j2k_declares_32768_squared", edit(j, Rows=32768, Columns=32768), "--max-slice-pixels")
    info("deflate_bomb", deflate_bomb(d / "deflate_bomb.dcm"), "--max-slice-pixels")
    frames = write_slice(d / "frames.dcm", phantom(1)[0], (0, 0, 0), 1)
    info("frames_bomb", edit(frames, NumberOfFrames=100000), "--max-slice-pixels")
    info("zip_bomb", zip_bomb(d / "bomb.zip"), "--max-zip-bytes")
    s = series(d / "zipped")
    small_zip = d / "study.zip"
    with zipfile.ZipFile(small_zip, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(s.iterdir()):
            zf.write(f, f.name)
    info("zip_over_lowered_limit", small_zip, "--max-zip-bytes", None, "--max-zip-bytes", "1k")
    raw = bytearray(small_zip.read_bytes())
    with zipfile.ZipFile(small_zip) as zf:
        m = zf.infolist()[2]
    start = m.header_offset + 30 + len(m.filename) + 40
    raw[start : start + 64] = bytes(b ^ 0x5A for b in raw[start : start + 64])
    (d / "corrupt_deflate.zip").write_bytes(bytes(raw))
    info("zip_corrupt_deflate_stream", d / "corrupt_deflate.zip", "corrupt zip")
    (d / "truncated.zip").write_bytes(small_zip.read_bytes()[: len(raw) // 2])
    info("zip_truncated", d / "truncated.zip", "no DICOM image found")
    with zipfile.ZipFile(d / "escape.zip", "w") as zf:
        zf.writestr("../../escape.dcm", b"x")
    info("zip_member_escapes", d / "escape.zip", "'..' path")

    for name, fields, expect in (
        ("pixel_spacing_zero", {"PixelSpacing": [0, 0]}, "PixelSpacing"),
        ("pixel_spacing_negative", {"PixelSpacing": [-0.5, 0.5]}, "PixelSpacing"),
        ("pixel_spacing_100", {"PixelSpacing": [100, 100]}, "--max-fov-mm"),
        ("orientation_zero", {"ImageOrientationPatient": [0, 0, 0, 0, 0, 0]}, "ImageOrientationPatient"),
        ("orientation_parallel", {"ImageOrientationPatient": [1, 0, 0, 1, 0, 0]}, "ImageOrientationPatient"),
        ("modality_mr", {"Modality": "MR"}, "Modality MR"),
        ("modality_pt", {"Modality": "PT"}, "Modality PT"),
        ("modality_us", {"Modality": "US"}, "Modality US"),
        ("modality_nm", {"Modality": "NM"}, "Modality NM"),
    ):
        s = series(d / name)
        for f in s.iterdir():
            edit(f, **fields)
        info(name, s, expect, s / "1.dcm" if "modality" in name or "orientation" in name or "100" not in name else s)
    for name, value in (("nan_position", "nan"), ("inf_position", "inf")):
        s = series(d / name)
        info(name, s, "ImagePositionPatient", edit(s / "4.dcm", ImagePositionPatient=[value, "0", "104"]))
    s = series(d / "bit_depth", syntax=J2K)  # the J2K decoder returns what the codestream holds, unmasked
    info("values_beyond_bits_stored", s, "10-bit range", edit(s / "2.dcm", BitsStored=10, HighBit=9))
    s = series(d / "rows_zero")
    info("rows_zero", s, "rows_zero", edit(s / "5.dcm", Rows=0))
    s = series(d / "gap", n=8)
    (s / "5.dcm").unlink()
    info("missing_slice", s, "missing slice", s / "4.dcm")
    s = series(d / "same_position", n=4)
    for f in s.iterdir():
        edit(f, ImagePositionPatient=[0, 0, 0], SOPInstanceUID=f"1.2.3.{f.stem}")
    info("all_slices_one_position", s, "share one position", s)
    s = series(d / "corrupt_j2k", n=7, shape=(64, 64), syntax=J2K)
    frame = bytearray(first_frame(s / "4.dcm"))
    frame[frame.find(b"\xff\x93") + 11] ^= 0xFF  # one byte of the first tile's data: decodes, to garbage
    info("corrupt_j2k_slice", s, "corrupt pixel data", with_frame(s / "4.dcm", bytes(frame)))

    vol = phantom(8, (24, 24)).transpose(2, 1, 0).astype(np.float32)
    some_nan = vol.copy()
    some_nan[3, 3, 3] = np.nan
    info("nifti_some_nan", nifti(d / "some_nan.nii.gz", some_nan), "NaN or infinite")
    info("nifti_all_nan", nifti(d / "all_nan.nii.gz", np.full_like(vol, np.nan)), "NaN or infinite")
    inf = vol.copy()
    inf[0, 0, 0] = np.inf
    info("nifti_inf", nifti(d / "inf.nii.gz", inf), "NaN or infinite")
    info("nifti_zero_affine", nifti(d / "zero_affine.nii", vol, np.zeros((4, 4))), "singular")
    singular = np.eye(4)
    singular[:3, 1] = singular[:3, 0]
    info("nifti_singular_affine", nifti(d / "singular.nii", vol, singular), "singular")
    nan_aff = np.eye(4)
    nan_aff[0, 3] = np.nan
    info("nifti_nan_affine", nifti(d / "nan_affine.nii", vol, nan_aff), "not finite")
    info("nifti_header_bomb", nifti_header_bomb(d / "bomb.nii"), "--max-series-voxels")
    info("nifti_mri_like", nifti(d / "mri.nii.gz", vol + 1000), "--hu-offset")

    (d / "empty.dcm").write_bytes(b"")
    info("empty_file", d / "empty.dcm", "no DICOM image found")
    (d / "noise.dcm").write_bytes(np.random.default_rng(0).bytes(4096))
    info("random_bytes", d / "noise.dcm", "no DICOM image found")
    (d / "empty_dir").mkdir()
    info("empty_folder", d / "empty_dir", "empty input")
    long_path = d / ("x" * 250) / ("y" * 250)
    info("path_longer_than_path_max", Path(str(long_path) * 10), "too long")

    model = fake_bundle(d / "bundle")
    thin = series(d / "one_slice", n=1)
    cases["predict_single_slice"] = (
        ["predict", str(thin), "--model", str(model), "--out", str(d / "out_single")], "too small", thin
    )
    thin3 = series(d / "thin", n=3, step=1.0)
    cases["predict_thin_stack"] = (
        ["predict", str(thin3), "--model", str(model), "--out", str(d / "out_thin")], "too small", thin3
    )
    good = series(d / "good")
    (d / "a_file").write_text("x")
    cases["predict_out_is_a_file"] = (
        ["predict", str(good), "--model", str(model), "--out", str(d / "a_file")], "not a folder", d / "a_file"
    )
    foreign = d / "someones_folder"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("precious")
    cases["predict_out_foreign_folder"] = (
        ["predict", str(good), "--model", str(model), "--out", str(foreign)], "other files", foreign
    )
    cases["segment_out_without_nifti_extension"] = (
        ["segment", str(good), "--model", str(model), "--out", str(d / "mask.png")], ".nii.gz", d / "mask.png"
    )
    cases["segment_out_is_a_folder"] = (
        ["segment", str(good), "--model", str(model), "--out", str(foreign)], "is a folder", foreign
    )
    cases["submit_out_is_a_folder"] = (
        ["submit", "--data", str(d), "--model", str(model), "--out", str(foreign)], "is a folder", foreign
    )
    cases["predict_mr_series"] = (
        ["predict", str(d / "modality_mr"), "--model", str(model), "--out", str(d / "out_mr")],
        "Modality MR",
        d / "modality_mr",
    )
    return cases


CASES = [
    "panic_rle", "rle_declares_32768_squared", "j2k_declares_32768_squared", "deflate_bomb", "frames_bomb",
    "zip_bomb", "zip_over_lowered_limit", "zip_corrupt_deflate_stream", "zip_truncated", "zip_member_escapes",
    "pixel_spacing_zero", "pixel_spacing_negative", "pixel_spacing_100", "orientation_zero", "orientation_parallel",
    "modality_mr", "modality_pt", "modality_us", "modality_nm", "nan_position", "inf_position",
    "values_beyond_bits_stored", "rows_zero", "missing_slice", "all_slices_one_position", "corrupt_j2k_slice",
    "nifti_some_nan", "nifti_all_nan", "nifti_inf", "nifti_zero_affine", "nifti_singular_affine", "nifti_nan_affine",
    "nifti_header_bomb", "nifti_mri_like", "empty_file", "random_bytes", "empty_folder", "path_longer_than_path_max",
    "predict_single_slice", "predict_thin_stack", "predict_out_is_a_file", "predict_out_foreign_folder",
    "segment_out_without_nifti_extension", "segment_out_is_a_folder", "submit_out_is_a_folder", "predict_mr_series",
]  # fmt: skip


def refused(code: int, err: str, expect: str, names: Path) -> str:
    """Exit 2, one stderr line holding ``expect`` and naming ``names``, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert expect in lines[0], lines[0]
    assert str(names) in lines[0] or names.name in lines[0], lines[0]
    return lines[0]


def test_corpus_is_large_enough(corpus) -> None:
    assert len(corpus) >= 40 and sorted(corpus) == sorted(CASES)


@pytest.mark.parametrize("name", CASES)
def test_hostile_input_is_refused_in_one_line(name: str, corpus, capsys, tmp_path: Path) -> None:
    args, expect, names = corpus[name]
    listed = name != "path_longer_than_path_max"
    before = sorted(p.name for p in Path(args[1]).parent.iterdir()) if listed else []
    code = main(args)
    captured = capsys.readouterr()
    refused(code, captured.err, expect, names)
    assert captured.out == ""  # no partial output
    if listed:  # nothing written beside the input (no half output folder, no temporary file)
        assert sorted(p.name for p in Path(args[1]).parent.iterdir()) == before
    if "--out" in args:
        out = Path(args[args.index("--out") + 1])
        assert not out.exists() or out.is_file() or any(out.iterdir())  # untouched: absent, or as it was
        if name == "predict_out_foreign_folder":
            assert [p.name for p in out.iterdir()] == ["thesis.txt"]


# ----------------------------------------------------------------------------------------------------------------------
# Bombs: peak memory of the process that meets them
# ----------------------------------------------------------------------------------------------------------------------

_PEAK = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=120); "
    "sys.stdout.write(r.stderr); print('rc', r.returncode); "
    "print('peak_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


@pytest.mark.parametrize("name", ["deflate_bomb", "zip_bomb", "frames_bomb", "nifti_header_bomb", "pixel_spacing_100"])
def test_bombs_are_refused_before_allocating(name: str, corpus) -> None:
    args, expect, names = corpus[name]
    run = subprocess.run(
        [sys.executable, "-c", _PEAK, sys.executable, "-m", "cspine.cli", *args],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    *err, rc, peak = run.stdout.strip().splitlines()
    refused(int(rc.split()[1]), "\n".join(err), expect, names)
    assert int(peak.split()[1]) / 1024 < PEAK_LIMIT_MB


@pytest.mark.parametrize("name", ["deflate_bomb", "zip_bomb", "frames_bomb", "nifti_header_bomb", "pixel_spacing_100"])
def test_bombs_raise_the_limit_error_type(name: str, corpus) -> None:
    from cspine.io import load_study

    with pytest.raises(ResourceLimitError, match="raises it"):
        load_study(corpus[name][0][1])


# ----------------------------------------------------------------------------------------------------------------------
# Defects one by one
# ----------------------------------------------------------------------------------------------------------------------


def test_panic_in_a_native_decoder_is_one_line_from_the_real_cli(corpus) -> None:
    """The Rust panic prints a backtrace on its process's stderr; the user sees only cspine's line."""
    args, expect, names = corpus["panic_rle"]
    run = subprocess.run([sys.executable, "-m", "cspine.cli", *args], capture_output=True, text=True, timeout=120)
    refused(run.returncode, run.stderr, expect, names)
    assert "panicked" not in run.stderr and "PanicException" in run.stderr


def test_a_decoder_that_crashes_is_replaced_and_the_file_named(tmp_path: Path, monkeypatch) -> None:
    """A worker killed mid-decode (a segfault in a codec) fails its file, not the caller; the others are read."""
    from cspine.io import decode_pool, dicom, load_series

    s = series(tmp_path / "s", n=8)
    real = decode_pool._decode_ds

    def crash_on_5(ds, path):
        if path.endswith("5.dcm"):
            os.kill(os.getpid(), signal.SIGSEGV)
        return real(ds, path)

    monkeypatch.setattr(decode_pool, "_decode_ds", crash_on_5)  # forked workers inherit it
    with pytest.raises(dicom.DicomError, match=r"5\.dcm: the pixel decoder crashed on this file \(killed by SIGSEGV"):
        load_series(s, workers=2)
    monkeypatch.setattr(decode_pool, "_decode_ds", real)
    assert load_series(s, workers=2).shape == (8, 32, 32)


def test_rejected_checkpoint_is_one_line_without_unsafe_advice(tmp_path: Path) -> None:
    import pickle

    from cspine.runtime import load_checkpoint

    path = tmp_path / "best.pt"
    path.write_bytes(pickle.dumps({"weights": Path("/etc/passwd")}))  # an object torch's safe loader refuses
    with warnings.catch_warnings(record=True) as caught, pytest.raises(CspineInputError) as info:
        warnings.simplefilter("always")
        load_checkpoint(path)
    assert not caught  # torch's own notes about the file would be more lines on the terminal
    text = str(info.value)
    assert str(path) in text and "\n" not in text and "weights_only" not in text and "refused" in text


def test_calibration_with_null_temperatures_is_bad_input(tmp_path: Path) -> None:
    from cspine.cls.calibrate import CALIBRATION_JSON, Calibration

    (tmp_path / CALIBRATION_JSON).write_text(json.dumps({"temperatures": {"C1": None, "patient_overall": 1.0}}))
    with pytest.raises(CspineInputError, match="broken calibration file"):
        Calibration.load(tmp_path)
    (tmp_path / CALIBRATION_JSON).write_text(json.dumps({"temperatures": {"C1": 0.0}}))
    with pytest.raises(CspineInputError, match="finite and > 0"):
        Calibration.load(tmp_path)


@pytest.mark.parametrize("suffix", ["", ".nii.gz"])
def test_named_pipe_input_does_not_hang(tmp_path: Path, suffix: str) -> None:
    fifo = tmp_path / f"pipe{suffix}"
    os.mkfifo(fifo)
    run = subprocess.run([sys.executable, "-m", "cspine.cli", "info", str(fifo)], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    refused(run.returncode, run.stderr, "named pipe", fifo)


def test_stale_decode_buffers_of_dead_processes_are_removed(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = shm / f"cspine-decode-{dead.pid}-testleak.i16"
    live = shm / f"cspine-decode-{os.getpid()}-testlive.i16"
    stale.write_bytes(b"\0" * 4096)
    live.write_bytes(b"\0" * 4096)
    try:
        run = subprocess.run([sys.executable, "-m", "cspine.cli", "info", str(series(tmp_path / "s"))],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert not stale.exists() and live.exists()  # the killed run's buffer is gone; a live run's is kept
    finally:
        stale.unlink(missing_ok=True)
        live.unlink(missing_ok=True)


def test_non_utf8_out_path_with_strict_stdout_exits_0(tmp_path: Path) -> None:
    s = series(tmp_path / "s")
    out = os.fsencode(tmp_path) + b"/view\xff.png"
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    run = subprocess.run([sys.executable, "-m", "cspine.cli", "show", str(s), "--out", out], capture_output=True,
                         env=env, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert os.path.exists(out) and b"view" in run.stdout


def test_info_json_stays_valid_with_nan_header_fields(tmp_path: Path, capsys) -> None:
    s = series(tmp_path / "s")
    for f in s.iterdir():
        edit(f, SliceThickness="nan", KVP="inf")
    assert main(["info", str(s)]) == 0
    info = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"{c} in info's JSON"))
    assert info["slice_thickness"] is None


def test_missing_modality_is_read_as_ct(tmp_path: Path) -> None:
    from cspine.io import load_series

    s = series(tmp_path / "s")
    import pydicom

    for f in s.iterdir():
        ds = pydicom.dcmread(f)
        del ds.Modality
        ds.save_as(f)
    vol = load_series(s)
    np.testing.assert_array_equal(vol.array, phantom())


def test_grid_limits_are_checked_before_allocating() -> None:
    from cspine.io.limits import Limits, active, configure
    from cspine.io.volume import Volume, resample
    from cspine.seg.data import make_gridmap

    aff = np.diag([2, 100, 100, 1.0])
    vol = Volume(array=np.zeros((4, 512, 512), np.int16), spacing=(2.0, 100.0, 100.0), affine=aff)
    with pytest.raises(ResourceLimitError, match="--max-grid-voxels"):
        make_gridmap(vol.shape, vol.affine, (1.0, 1.0, 1.0))  # 7 x 51101 x 51101 voxels
    with pytest.raises(ResourceLimitError, match="resampled grid"):
        resample(vol, (0.5, 0.5, 0.5))
    before = active()
    try:
        configure(Limits(max_grid_voxels=10))
        with pytest.raises(ResourceLimitError, match="limit of 10 "):
            make_gridmap((4, 4, 4), np.eye(4), (1.0, 1.0, 1.0))
    finally:
        configure(before)


# ----------------------------------------------------------------------------------------------------------------------
# Series that are real but not uniform (issue 13, point 6)
# ----------------------------------------------------------------------------------------------------------------------


def test_slice_spacing_in_regimes_is_resampled_with_a_warning(tmp_path: Path) -> None:
    """4 mm through the skull base, then 7 mm: one uniform grid at 4 mm over the same extent, positions kept."""
    from cspine.io import load_series

    z = [0, 4, 8, 12, 16, 23, 30, 37, 44]
    vol = phantom(len(z))
    for k, zz in enumerate(z):
        vol[k, 16:, :] = -1000 + 50 * zz  # a value that is linear in z, to check the interpolation
        write_slice(tmp_path / "s" / f"{k + 1}.dcm", vol[k], (-8.0, -8.0, 100.0 + zz), k + 1)
    got = load_series(tmp_path / "s")
    assert got.shape[0] == 12 and got.spacing[0] == pytest.approx(44 / 11)
    assert any("slice spacing changes" in w and "4 mm" in w and "7 mm" in w for w in got.meta["warnings"])
    top = got.index_to_patient(np.array([got.shape[0] - 1, 0, 0]))[0]
    assert top[2] == pytest.approx(144.0)  # the last slice stays where it was
    for k in range(got.shape[0]):
        expect = -1000 + 50 * (k * 44 / 11)
        assert abs(float(got.array[k, 20, 5]) - expect) <= 1.0  # linear along z, exact at the ends
    assert len(got.instance_numbers) == got.shape[0]


def test_one_missing_slice_is_still_refused(tmp_path: Path) -> None:
    from cspine.io import DicomError, load_series

    s = series(tmp_path / "s", n=10, step=3.0)
    (s / "6.dcm").unlink()
    with pytest.raises(DicomError, match=r"missing slice: position step 6 mm .*5\.dcm"):
        load_series(s)


def test_lost_rescale_is_corrected_by_hu_offset_on_the_real_slicer_neck(real: Path, capsys) -> None:
    neck = real / "series" / "slicer_ctheadaxial_neck"
    assert main(["info", str(neck)]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["hu_min_max"][0] == 0 and any("--hu-offset -1024" in w for w in plain["warnings"])
    assert main(["info", str(neck), "--hu-offset", "-1024"]) == 0
    fixed = json.loads(capsys.readouterr().out)
    assert fixed["hu_min_max"] == [plain["hu_min_max"][0] - 1024, plain["hu_min_max"][1] - 1024]
    assert fixed["hu_offset"] == -1024 and not fixed.get("warnings")


# ----------------------------------------------------------------------------------------------------------------------
# Batches: submit reruns, prepare with workers, predict's output folder
# ----------------------------------------------------------------------------------------------------------------------


class StubBundle:
    """Predicts from the study's mean HU plus an offset (two 'models' give different answers)."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset
        self.seen: list[int] = []

    def predict(self, vol) -> SimpleNamespace:
        from cspine.labels import PREDICTION_TYPES

        self.seen.append(vol.shape[0])
        base = float(np.clip((vol.array.mean() + 1000) / 3000 + self.offset, 0.01, 0.99))
        return SimpleNamespace(probabilities=dict.fromkeys(PREDICTION_TYPES, base), not_assessed=None)


def test_submit_survives_a_panic_a_bomb_and_reruns_honestly(tmp_path: Path, monkeypatch) -> None:
    from cspine import bundle as bundle_mod
    from cspine.labels import PREDICTION_TYPES, PREVALENCE
    from cspine.submit import SubmitConfig, submit

    root = tmp_path / "rsna"
    uids = ["1.2.3.1", "1.2.3.2", "1.2.3.3", "1.2.3.4"]  # good, panic, bomb, broken-then-fixed
    for uid in uids:
        series(root / "test_images" / uid, study_uid=uid, series_uid=uid + ".1", syntax=RLE)
    with_frame(root / "test_images" / uids[1] / "2.dcm", panic_rle_frame())
    deflate_bomb(root / "test_images" / uids[2] / "7.dcm")
    broken = root / "test_images" / uids[3] / "3.dcm"
    good_bytes = broken.read_bytes()
    broken.write_bytes(good_bytes[:400])
    (root / "test.csv").write_text(
        "row_id,StudyInstanceUID,prediction_type\n"
        + "".join(f"{u}_{p},{u},{p}\n" for u in uids for p in PREDICTION_TYPES)
    )
    model_a, model_b = tmp_path / "model_a", tmp_path / "model_b"
    for m, text in ((model_a, "a"), (model_b, "b")):
        m.mkdir()
        (m / "weights.bin").write_text(text)
    stubs = {model_a: StubBundle(0.0), model_b: StubBundle(0.2)}
    monkeypatch.setattr(bundle_mod, "load_bundle", lambda path, **k: stubs[Path(path)])
    out = tmp_path / "sub" / "submission.csv"

    def rows() -> dict[str, float]:
        lines = out.read_text().splitlines()[1:]
        return {r.split(",")[0]: float(r.split(",")[1]) for r in lines}

    first = submit(SubmitConfig(data=root, model=model_a, out=out))
    assert first["predicted_now"] == 1 and first["failed"] == 3 and first["rows"] == 32
    records = json.loads(out.with_name("submission.failures.json").read_text())
    failures = {f["StudyInstanceUID"]: f["error"] for f in records}
    assert "2.dcm" in failures[uids[1]] and "PanicException" in failures[uids[1]]
    assert "7.dcm" in failures[uids[2]] and "--max-slice-pixels" in failures[uids[2]]
    assert "3.dcm" in failures[uids[3]]
    assert rows()[f"{uids[3]}_C1"] == pytest.approx(PREVALENCE["C1"])

    broken.write_bytes(good_bytes)  # the study is fixed
    again = submit(SubmitConfig(data=root, model=model_a, out=out))
    assert again["reused_from_journal"] == 1 and again["recomputed"]["retry_failed"] == 2
    assert again["recomputed"]["input_changed"] == 1 and again["failed"] == 2 and again["predicted_now"] == 1
    assert rows()[f"{uids[3]}_C1"] != pytest.approx(PREVALENCE["C1"])

    quiet = submit(SubmitConfig(data=root, model=model_a, out=out, retry_failed=False))
    assert quiet["reused_from_journal"] == 4 and quiet["predicted_now"] == quiet["failed_now"] == 0
    before = rows()
    other = submit(SubmitConfig(data=root, model=model_b, out=out))
    assert other["recomputed"]["model_changed"] == 4 and other["reused_from_journal"] == 0
    after = rows()
    assert after[f"{uids[0]}_C1"] == pytest.approx(min(0.99, before[f"{uids[0]}_C1"] + 0.2), abs=1e-5)


def test_prepare_with_workers_records_a_panic_and_goes_on(tmp_path: Path) -> None:
    root = tmp_path / "rsna"
    for uid in ("1.2.3.1", "1.2.3.2", "1.2.3.3"):
        series(root / "train_images" / uid, study_uid=uid, series_uid=uid + ".1", syntax=RLE)
    with_frame(root / "train_images" / "1.2.3.2" / "4.dcm", panic_rle_frame())
    code = main(["prepare", "--data", str(root), "--out", str(tmp_path / "cache"), "--workers", "2", "--no-progress"])
    assert code == 1  # some failed
    failures = json.loads((tmp_path / "cache" / "failures.json").read_text())
    assert [f["uid"] for f in failures] == ["1.2.3.2"] and "4.dcm" in failures[0]["error"]
    assert sorted(p.name for p in (tmp_path / "cache" / "train").iterdir()) == ["1.2.3.1", "1.2.3.3"]


def test_predict_output_folder_is_replaced_as_a_whole(tmp_path: Path, monkeypatch) -> None:
    """A failure while writing study B's report leaves study A's outputs as they were, and no stray files."""
    from cspine import report as report_mod
    from cspine.predict import PredictConfig, predict_study

    class Out:
        def __init__(self, vol, p: float) -> None:
            self.probabilities = {k: p for k in ("patient_overall", "C1", "C2", "C3", "C4", "C5", "C6", "C7")}
            self.mask = np.zeros(vol.shape, np.uint8)
            self.vertebrae, self.slice_scores, self.warnings, self.cleanup = {}, {}, [], []
            self.cervical_spine, self.not_assessed = "present", None

    class Bundle:
        def __init__(self, p: float) -> None:
            self.p = p

        def predict(self, vol, timings=None, **kwargs):
            return Out(vol, self.p)

        def summary(self):
            return {"path": "stub"}

    a, b = series(tmp_path / "a", n=10, spacing=(2.0, 2.0)), series(tmp_path / "b", n=12, spacing=(2.0, 2.0))
    out = tmp_path / "out"
    predict_study(PredictConfig(study=a, model=tmp_path, out=out, report=False), bundle=Bundle(0.1))
    first = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_report(*args, **kwargs):
        (args[0] / "report.png").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_mod, "write_report", broken_report)
    with pytest.raises(OSError):
        predict_study(PredictConfig(study=b, model=tmp_path, out=out), bundle=Bundle(0.9))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # study A's folder, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]  # no temporary folder left
