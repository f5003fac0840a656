"""DICOM series -> Volume: codecs, geometry and every validation error, on real and constructed files."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from tests.conftest import write_slice

from cspine.io import DicomError, load_series, read_hu

CODEC = "codec/cornerstone_ctimage"
LOSSLESS = [
    "1.2.840.10008.1.2_LittleEndianImplicit",
    "1.2.840.10008.1.2.1_LittleEndianExplicit",
    "1.2.840.10008.1.2.2_BigEndianExplicit",
    "1.2.840.10008.1.2.1.99_DeflatedExplicitVRLittleEndian",
    "1.2.840.10008.1.2.5_RLELossless",
    "1.2.840.10008.1.2.4.57_JPEGProcess14",
    "1.2.840.10008.1.2.4.70_JPEGProcess14SV1",
    "1.2.840.10008.1.2.4.80_JPEGLSLossless",
    "1.2.840.10008.1.2.4.90_JPEG2000LosslessOnly",
]
# (transfer syntax, max abs error, mean abs error) from the MANIFEST, with a little slack on the means.
LOSSY = [
    ("1.2.840.10008.1.2.4.81_JPEGLSLossy", 1, 1.0),
    ("1.2.840.10008.1.2.4.91_JPEG2000", 5, 0.7),
    ("1.2.840.10008.1.2.4.51_JPEGProcess2_4", 36, 4.0),
    ("1.2.840.10008.1.2.4.50_JPEGProcess1", 65, 21.0),
    # 12-bit extended and progressive JPEG: GDCM refuses them, the libjpeg-turbo fallback decodes them.
    ("1.2.840.10008.1.2.4.53_JPEGProcess6_8", 36, 4.0),
    ("1.2.840.10008.1.2.4.55_JPEGProcess10_12", 36, 4.0),
]


def _codec_file(real: Path, key: str) -> Path:
    uid, name = key.split("_", 1)
    return real / CODEC / f"CTImage.dcm_{name}TransferSyntax_{uid}.dcm"


@pytest.fixture(scope="module")
def reference_hu(real: Path) -> np.ndarray:
    ds = pydicom.dcmread(real / CODEC / "CTImage.dcm")
    return ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)


@pytest.mark.parametrize("key", LOSSLESS)
def test_lossless_codecs_reproduce_reference_hu(real: Path, reference_hu: np.ndarray, key: str) -> None:
    path = _codec_file(real, key)
    vol = load_series(path)
    assert vol.array.dtype == np.int16 and vol.shape == (1, 512, 512)
    np.testing.assert_array_equal(vol.array[0], reference_hu)
    assert vol.meta["transfer_syntaxes"] == [key.split("_")[0]]
    assert reference_hu.min() == -3024 and reference_hu.max() == 1378


@pytest.mark.parametrize(("key", "max_err", "mean_err"), LOSSY)
def test_lossy_codecs_within_manifest_tolerance(
    real: Path, reference_hu: np.ndarray, key: str, max_err: float, mean_err: float
) -> None:
    hu = read_hu(str(_codec_file(real, key))).astype(np.int32)
    err = np.abs(hu - reference_hu)
    assert err.max() <= max_err and err.mean() <= mean_err


def test_unsupported_transfer_syntax_is_a_clean_error(real: Path, tmp_path: Path) -> None:
    """A video encoding no backend decodes: one DicomError naming the file and the syntax."""
    ds = pydicom.dcmread(real / CODEC / "CTImage.dcm_JPEGProcess1TransferSyntax_1.2.840.10008.1.2.4.50.dcm")
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"
    path = tmp_path / "video.dcm"
    ds.save_as(path)
    with pytest.raises(DicomError, match=r"video\.dcm: unsupported transfer syntax 1\.2\.840\.10008\.1\.2\.4\.102"):
        load_series(path)


def test_undecodable_pixels_name_file_and_syntax(real: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(real / CODEC / "CTImage.dcm_JPEG2000LosslessOnlyTransferSyntax_1.2.840.10008.1.2.4.90.dcm")
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])  # a J2K start with garbage after it
    path = tmp_path / "broken.dcm"
    ds.save_as(path)
    with pytest.raises(DicomError, match=r"broken\.dcm: cannot decode pixel data \(JPEG 2000 Image Compression"):
        load_series(path)


def test_j2k_signedness_trap(real: Path) -> None:
    """The same slice declared signed and unsigned must give the same HU, -2048..1717."""
    a = read_hu(str(real / "codec/pylibjpeg_data/TOSHIBA_J2K_SIZ0_PixRep1.dcm"))
    b = read_hu(str(real / "codec/pylibjpeg_data/TOSHIBA_J2K_SIZ1_PixRep0.dcm"))
    np.testing.assert_array_equal(a, b)
    assert (int(a.min()), int(a.max())) == (-2048, 1717)


@pytest.mark.parametrize("name", ["CT1_JLSN.dcm", "ELSCINT1_JP2vsJ2K.dcm", "TOSHIBA_J2K_OpenJPEGv2Regression.dcm"])
def test_other_real_codec_files_decode_to_plausible_hu(real: Path, name: str) -> None:
    hu = read_hu(str(real / "codec/pylibjpeg_data" / name))
    assert -3100 <= hu.min() <= -900  # air or outside-FOV padding
    assert 300 <= hu.max() <= 4000  # bone


@pytest.mark.parametrize("name", ["CT1_J2KR.dcm", "CT2_J2KR.dcm"])
def test_nema_j2k_lossless_equals_pydicom_rescale(real: Path, name: str) -> None:
    path = real / CODEC / name
    ds = pydicom.dcmread(path)
    expect = np.rint(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    np.testing.assert_array_equal(read_hu(str(path)), expect)


def test_rescale_on_unsigned_12bit_data(real: Path) -> None:
    """TotalSegmentator series: 12-bit unsigned stored values, intercept -1024 -> air at -1024 HU."""
    vol = load_series(real / "series/totalseg_example_ct_dicom")
    assert vol.meta["bits_stored"] == 12 and vol.meta["pixel_representation"] == 0
    assert int(vol.array.min()) == -1024 and int(vol.array.max()) == 1839


def test_totalseg_series_geometry(real: Path) -> None:
    vol = load_series(real / "series/totalseg_example_ct_dicom")
    assert vol.shape == (20, 512, 512)
    assert vol.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    # z ascends along the normal (+z LPS = superior); instance numbers run the other way in this series.
    assert vol.affine[2, 0] == pytest.approx(2.0)
    assert list(vol.instance_numbers) == list(range(286, 266, -1))
    assert vol.affine[:3, 3] == pytest.approx([-249.51171875, -437.51171875, -804.5])
    # The MANIFEST's check: LPS->RAS of our affine equals the reference NIfTI's once the row axis is flipped.
    import nibabel as nib

    from cspine.io.nifti import nifti_affine

    ref = nib.load(real / "series/totalseg_example_ct_dicom_reference_seg.nii.gz").affine
    ours = nifti_affine(vol.affine)  # (x, y, z) index -> RAS
    flip_rows = np.diag([1.0, -1.0, 1.0, 1.0])
    flip_rows[1, 3] = 511
    np.testing.assert_allclose(ours @ flip_rows, ref, atol=1e-4)
    assert "PatientName" not in vol.meta and "PatientID" not in vol.meta


def test_slicer_neck_series(real: Path) -> None:
    vol = load_series(real / "series/slicer_ctheadaxial_neck")
    assert vol.shape == (93, 64, 64)
    assert vol.spacing == pytest.approx((1.5, 3.2, 3.2))
    assert vol.array.min() == 0 and vol.array.max() == 3926  # intercept 0: stored values as given
    assert any("RescaleIntercept (0.0) is probably wrong" in w for w in vol.meta["warnings"])  # air reads 0
    # Slices sorted by position: the z coordinate of consecutive slices ascends by the step.
    z = vol.index_to_patient(np.c_[np.arange(93), np.zeros(93), np.zeros(93)])[:, 2]
    assert np.allclose(np.diff(z), 1.5)


def test_gantry_tilt_is_resampled(real: Path) -> None:
    vol = load_series(real / "series/dicom2nifti_edge_cases/gantry_tilt_siemens")
    assert vol.meta["gantry_tilt_deg"] == pytest.approx(14.0, abs=0.1)
    assert vol.meta["warnings"]
    # The corrected grid is orthogonal: its slice axis is the plane normal, spacing = 5 mm * cos(tilt).
    cols = vol.affine[:3, :3] / np.linalg.norm(vol.affine[:3, :3], axis=0)
    np.testing.assert_allclose(cols.T @ cols, np.eye(3), atol=1e-6)
    assert vol.spacing[0] == pytest.approx(5 * np.cos(np.radians(14.0)), abs=0.01)


def test_gantry_tilt_resampling_preserves_patient_positions(tmp_path: Path) -> None:
    """A bright point at a known patient position in an off-centre tilted slice lands at that position."""
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    iop = (1.0, 0.0, 0.0, 0.0, c, -s)
    row_dir, col_dir = np.array(iop[:3]), np.array(iop[3:])
    n, size, dx = 9, 48, 1.0
    ipps = [np.array([-20.0, -20.0, 3.0 * (k - 4)]) for k in range(n)]  # stacked straight along z: sheared
    k_point, r_point, c_point = 7, 20, 30
    point = ipps[k_point] + r_point * dx * col_dir + c_point * dx * row_dir
    for k in range(n):
        hu = np.full((size, size), -1000, dtype=np.int16)
        if k == k_point:
            hu[r_point - 1 : r_point + 2, c_point - 1 : c_point + 2] = 1000
        write_slice(tmp_path / f"{k}.dcm", hu, tuple(ipps[k]), k + 1, orientation=iop, spacing=(dx, dx))
    vol = load_series(tmp_path)
    z, y, x = np.unravel_index(np.argmax(vol.array), vol.shape)
    assert z == k_point
    got = vol.index_to_patient(np.array([z, y, x]))[0]
    np.testing.assert_allclose(got, point, atol=1.0)
    assert vol.meta["gantry_tilt_deg"] == pytest.approx(10.0, abs=0.01)


def test_missing_slice(real: Path) -> None:
    with pytest.raises(DicomError, match=r"missing slice: position step 10 mm between .*IM-0001-0009-0001\.dcm"):
        load_series(real / "series/dicom2nifti_edge_cases/missing_slice_ge")


@pytest.mark.parametrize("top_first", [True, False])
def test_slices_sorted_by_position_not_name(tmp_path: Path, make_series, top_first: bool) -> None:
    folder, vol = make_series(tmp_path / "s", n=7, top_first=top_first)
    got = load_series(folder, workers=1)
    np.testing.assert_array_equal(got.array, vol)
    expect = list(range(7, 0, -1)) if top_first else list(range(1, 8))
    assert list(got.instance_numbers) == expect
    assert got.spacing == pytest.approx((1.0, 0.5, 0.5))
    assert not got.meta.get("warnings")  # air present: no rescale warning


def test_parallel_decode_equals_serial(tmp_path: Path, make_series) -> None:
    folder, vol = make_series(tmp_path / "s", n=24, syntax="1.2.840.10008.1.2.5")
    par = load_series(folder, workers=2)
    ser = load_series(folder, workers=1)
    np.testing.assert_array_equal(par.array, vol)
    np.testing.assert_array_equal(ser.array, vol)


def test_zip_input_and_nested_folders(tmp_path: Path, make_series) -> None:
    _, vol = make_series(tmp_path / "a" / "b", n=5)
    (tmp_path / "a" / "README.txt").write_text("not dicom")
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted((tmp_path / "a").rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(tmp_path).as_posix())
    np.testing.assert_array_equal(load_series(archive).array, vol)
    np.testing.assert_array_equal(load_series(tmp_path / "a").array, vol)


@pytest.mark.parametrize("member", ["../evil.dcm", "/abs/evil.dcm", "a/../../evil.dcm"])
def test_zip_with_unsafe_member_is_refused(tmp_path: Path, make_series, member: str) -> None:
    folder, _ = make_series(tmp_path / "s", n=3)
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(folder / "1.dcm", "1.dcm")
        zf.writestr(member, (folder / "2.dcm").read_bytes())
    with pytest.raises(DicomError, match=r"absolute or '\.\.' path"):
        load_series(archive)
    assert not (tmp_path / "evil.dcm").exists() and not Path("/abs/evil.dcm").exists()


def test_empty_inputs(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomError, match="empty input"):
        load_series(tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("hello")
    with pytest.raises(DicomError, match="no DICOM image found among 1 file"):
        load_series(tmp_path / "text")
    with pytest.raises(DicomError, match="no such file"):
        load_series(tmp_path / "missing")


def test_dicomdir_and_text_files_are_ignored(real: Path, tmp_path: Path, make_series) -> None:
    folder, vol = make_series(tmp_path / "s", n=4)
    (folder / "notes.txt").write_text("x" * 300)
    from pydicom.fileset import FileSet

    fs = FileSet()
    (folder / "dirtest").mkdir()
    fs.write(folder / "dirtest")  # an empty DICOMDIR
    np.testing.assert_array_equal(load_series(folder).array, vol)


def test_truncated_slice(tmp_path: Path, make_series) -> None:
    folder, _ = make_series(tmp_path / "s", n=4)
    data = (folder / "2.dcm").read_bytes()
    (folder / "2.dcm").write_bytes(data[: len(data) - 100])
    with pytest.raises(DicomError, match=r"2\.dcm"):
        load_series(folder)


def test_duplicate_positions(tmp_path: Path, make_series) -> None:
    folder, vol = make_series(tmp_path / "s", n=4)
    shutil.copy(folder / "2.dcm", folder / "2-copy.dcm")  # identical duplicate: dropped
    got = load_series(folder)
    np.testing.assert_array_equal(got.array, vol)
    assert got.meta["dropped_duplicates"] == 1
    write_slice(folder / "dup.dcm", vol[0] + 1, (-10.0, -20.0, 100.0), 99)  # same position as slice z=0
    with pytest.raises(DicomError, match=r"duplicate slice position .* with different pixels"):
        load_series(folder)


def test_inconsistent_rows_and_orientation(tmp_path: Path, make_series) -> None:
    folder, _ = make_series(tmp_path / "s", n=4)
    write_slice(folder / "odd.dcm", np.zeros((8, 8), np.int16), (-10.0, -20.0, 104.0), 5)
    with pytest.raises(DicomError, match="inconsistent rows/columns"):
        load_series(folder)
    folder2, _ = make_series(tmp_path / "t", n=4)
    write_slice(
        folder2 / "odd.dcm", np.zeros((16, 12), np.int16), (-10.0, -20.0, 104.0), 5, orientation=(1, 0, 0, 0, 0.8, -0.6)
    )
    with pytest.raises(DicomError, match="inconsistent ImageOrientationPatient"):
        load_series(folder2)


def test_several_series_take_largest_or_selected(tmp_path: Path, make_series) -> None:
    _, big = make_series(tmp_path / "s", n=6, series_uid="1.2.3.4.1")
    _, small = make_series(tmp_path / "s" / "scout", n=3, series_uid="1.2.3.4.2", seed=5)
    got = load_series(tmp_path / "s")
    np.testing.assert_array_equal(got.array, big)
    assert got.meta["skipped_series"] == ["1.2.3.4.2 (3 files)"]
    np.testing.assert_array_equal(load_series(tmp_path / "s", series_uid="1.2.3.4.2").array, small)
    with pytest.raises(DicomError, match=r"series 9\.9 not found"):
        load_series(tmp_path / "s", series_uid="9.9")


def test_folder_of_several_studies_is_refused(tmp_path: Path, make_series) -> None:
    make_series(tmp_path / "data" / "a", n=4, series_uid="1.2.3.4.1", study_uid="1.2.3.1")
    make_series(tmp_path / "data" / "b", n=5, series_uid="1.2.3.4.2", study_uid="1.2.3.2")
    with pytest.raises(DicomError, match=r"holds 2 studies \(2 series\), not one; point at a single study"):
        load_series(tmp_path / "data")
    assert load_series(tmp_path / "data", series_uid="1.2.3.4.2").array.shape[0] == 5  # an explicit choice stands


def test_scout_of_another_size_first_in_folder(tmp_path: Path, make_series) -> None:
    """The one-pass decode sizes its slots from the first image; a differently sized series must still load."""
    _, vol = make_series(tmp_path / "s", n=10)
    for k in range(2):
        write_slice(
            tmp_path / "s" / f"0scout{k}.dcm",
            np.zeros((8, 8), np.int16),
            (0.0, 0.0, float(k)),
            k + 1,
            series_uid="1.2.3.9",
        )
    got = load_series(tmp_path / "s", workers=2)
    np.testing.assert_array_equal(got.array, vol)
    assert got.meta["skipped_series"] == ["1.2.3.9 (2 files)"]


def test_truncated_compressed_edge_slice_is_not_skipped(tmp_path: Path, make_series) -> None:
    """A compressed slice cut short parses without PixelData (pydicom only warns): it must be an error,
    not a silently dropped edge slice that no gap check would notice."""
    folder, _ = make_series(tmp_path / "s", n=6, syntax="1.2.840.10008.1.2.5")
    data = (folder / "1.dcm").read_bytes()
    (folder / "1.dcm").write_bytes(data[: len(data) // 2])
    with pytest.raises(DicomError, match=r"1\.dcm: (corrupt DICOM file|truncated or corrupt CT image)"):
        load_series(folder)
