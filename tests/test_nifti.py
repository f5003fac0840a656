"""NIfTI masks aligned to DICOM volumes through both affines, on real data and in the RSNA axis order."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cspine.io import DicomError, Volume, load_segmentation, load_series, load_study, save_nifti
from cspine.io.nifti import LPS_TO_RAS, nifti_affine, read_nifti
from cspine.io.volume import crop, resample, window
from cspine.labels import LABEL_NAMES, LABEL_VALUES


def _volume(shape: tuple[int, int, int] = (10, 12, 14), step_sign: float = 1.0) -> Volume:
    rng = np.random.default_rng(0)
    aff = np.eye(4)
    aff[:3, :3] = 0
    aff[2, 0], aff[1, 1], aff[0, 2] = 2.0 * step_sign, 0.5, 0.6
    aff[:3, 3] = [-30.0, -40.0, 100.0]
    return Volume(rng.integers(-1000, 1000, shape).astype(np.int16), (2.0, 0.5, 0.6), aff, np.arange(1, shape[0] + 1))


def test_real_totalsegmentator_mask_alignment(real: Path) -> None:
    """Liver (5) about 89 HU and T12 (32) about 267 HU; mirrored rows would read the liver at about -75 HU."""
    vol = load_series(real / "series/totalseg_example_ct_dicom")
    seg = load_segmentation(real / "series/totalseg_example_ct_dicom_reference_seg.nii.gz", vol)
    assert seg.shape == vol.shape and seg.dtype == np.uint8
    assert vol.array[seg == 5].mean() == pytest.approx(89, abs=3)
    assert vol.array[seg == 32].mean() == pytest.approx(267, abs=5)
    assert vol.array[seg == 33].mean() == pytest.approx(292, abs=5)
    assert vol.array[seg[:, ::-1, :] == 5].mean() < 0  # the mirrored-rows mistake is detectable


def test_rsna_axis_order_mask_round_trips_exactly(tmp_path: Path) -> None:
    """A mask stored like RSNA's ((x, y, z), y mirrored, z reversed vs file order) with a correct affine."""
    vol = _volume()
    rng = np.random.default_rng(1)
    mask = rng.integers(0, 8, vol.shape).astype(np.uint8)
    # File order = instance 1 at the top: our z ascends upwards, so file order is z reversed.
    mask_file_order = mask[::-1]
    data = mask_file_order.transpose(2, 1, 0)[:, ::-1, ::-1]  # inverse of seg[:, ::-1, ::-1].transpose(2, 1, 0)
    # Data index (i, j, k) -> volume index (z, y, x) = (k, ny - 1 - j, i): the two z reversals cancel.
    ny = vol.shape[1]
    to_vol = np.zeros((4, 4))
    to_vol[0, 2] = 1.0
    to_vol[1, 1], to_vol[1, 3] = -1.0, ny - 1
    to_vol[2, 0] = 1.0
    to_vol[3, 3] = 1.0
    ras = LPS_TO_RAS @ vol.affine @ to_vol
    path = tmp_path / "rsna_like.nii"
    nib.save(nib.Nifti1Image(data, ras), path)
    np.testing.assert_array_equal(load_segmentation(path, vol), mask)
    # The community flip gives the same mask in file order, for this (instance 1 on top) study.
    np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj)[:, ::-1, ::-1].transpose(2, 1, 0), mask_file_order)


def test_save_nifti_round_trip_and_orientation(tmp_path: Path) -> None:
    vol = _volume()
    mask = (vol.array > 500).astype(np.uint8) * 3
    p = save_nifti(mask, vol, tmp_path / "m.nii.gz")
    np.testing.assert_array_equal(load_segmentation(p, vol), mask)
    img = nib.load(p)
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")  # x -> LPS +x = patient left, y -> posterior, z -> superior
    np.testing.assert_allclose(img.affine, nifti_affine(vol.affine), atol=1e-5)
    _, aff = read_nifti(p)
    np.testing.assert_allclose(
        aff, vol.affine @ np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]]), atol=1e-5
    )


def test_mask_on_cropped_and_coarser_grid(tmp_path: Path) -> None:
    vol = _volume((10, 12, 14))
    mask = np.zeros(vol.shape, np.uint8)
    mask[2:8, 3:9, 4:12] = 4
    # A mask stored on a cropped sub-grid: exact re-placement, zeros outside.
    sub = crop(vol.with_array(mask), (1, 2, 3), (9, 10, 13))
    p = save_nifti(sub.array, sub, tmp_path / "crop.nii.gz")
    np.testing.assert_array_equal(load_segmentation(p, vol), mask)
    # A mask on a grid with twice the in-plane spacing: nearest neighbour, same label, close extent.
    coarse = resample(vol.with_array(mask), (2.0, 1.0, 1.2), order=0)
    p2 = save_nifti(coarse.array, coarse, tmp_path / "coarse.nii.gz")
    back = load_segmentation(p2, vol)
    assert set(np.unique(back)) == {0, 4}
    assert abs(int((back == 4).sum()) - int((mask == 4).sum())) <= 0.25 * (mask == 4).sum()


def test_irreconcilable_geometry_is_refused(tmp_path: Path) -> None:
    vol = _volume()
    rot = np.eye(4)
    a = np.radians(30)
    rot[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    p = tmp_path / "rot.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((14, 12, 10), np.uint8), LPS_TO_RAS @ rot @ vol.affine), p)
    with pytest.raises(DicomError, match=r"rot\.nii\.gz: orientation cannot be reconciled.*mask affine.*volume affine"):
        load_segmentation(p, vol)
    far = vol.affine.copy()
    far[:3, 3] += 5000
    p2 = tmp_path / "far.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((14, 12, 10), np.uint8), nifti_affine(far)), p2)
    with pytest.raises(DicomError, match="does not overlap the volume"):
        load_segmentation(p2, vol)
    p3 = tmp_path / "float.nii.gz"
    nib.save(nib.Nifti1Image(np.full((14, 12, 10), 0.5, np.float32), nifti_affine(vol.affine)), p3)
    with pytest.raises(DicomError, match="non-integer values"):
        load_segmentation(p3, vol)
    with pytest.raises(DicomError, match="no such file"):
        load_segmentation(tmp_path / "missing.nii", vol)


def test_real_vertebra_masks_read_with_project_labels(real: Path) -> None:
    """TPTBox (VerSe convention) L2..L4 mask on its CT: bone-like HU in each vertebra, labels named."""
    ct, ct_aff = read_nifti(real / "nifti/tptbox_lumbar_ct/sub-ct_label-22_ct.nii.gz")
    # Build a Volume in (z, y, x) from the NIfTI's (i, j, k) by reversing the axes.
    perm = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    vol = Volume(np.ascontiguousarray(ct.transpose(2, 1, 0)).astype(np.int16), (1.5, 1.5, 1.5), ct_aff @ perm)
    seg = load_segmentation(real / "nifti/tptbox_lumbar_ct/sub-ct_seg-vert_label-22_msk.nii.gz", vol)
    present = sorted(int(v) for v in np.unique(seg) if v)
    assert 22 in present  # L3
    assert vol.array[seg == 22].mean() > 150
    assert LABEL_NAMES[7] == "C7" and LABEL_VALUES["T1"] == 8 and LABEL_VALUES["T12"] == 19


def _world_values(vol: Volume, path: Path, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """HU at random voxels of ``vol`` and, at the same patient positions, in the file as nibabel reads it."""
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    rng = np.random.default_rng(0)
    zyx = np.stack([rng.integers(0, s, n) for s in vol.shape], axis=1)
    lps = (vol.affine @ np.c_[zyx, np.ones(n)].T)[:3]
    ijk = np.rint(np.linalg.inv(img.affine) @ np.r_[LPS_TO_RAS[:3, :3] @ lps, np.ones((1, n))])[:3].astype(int)
    return vol.array[tuple(zyx.T)], np.rint(data[tuple(ijk)]).astype(np.int16)


def test_real_pir_ct_reads_as_axial_with_positions_kept(real: Path) -> None:
    """TPTBox's CT is stored PIR (sagittal): it must reach the pipeline as the DICOM reader lays out an axial series
    (axis 0 superior, 1 posterior, 2 left), every voxel at its patient position, and its VerSe mask must line up."""
    path = real / "nifti/tptbox_lumbar_ct/sub-ct_label-22_ct.nii.gz"
    vol = load_study(path)
    assert vol.shape == (47, 73, 73) and vol.spacing == pytest.approx((1.5, 1.5, 1.5))
    directions = vol.affine[:3, :3] / 1.5
    np.testing.assert_allclose(directions, [[0, 0, 1], [0, 1, 0], [1, 0, 0]], atol=1e-6)  # columns: S, P, L in LPS
    ours, theirs = _world_values(vol, path)
    np.testing.assert_array_equal(ours, theirs)
    assert (int(vol.array.min()), int(vol.array.max())) == (-1030, 1961)
    seg = load_segmentation(real / "nifti/tptbox_lumbar_ct/sub-ct_seg-vert_label-22_msk.nii.gz", vol)
    assert vol.array[seg == 22].mean() > 150 and vol.array[seg == 0].mean() < vol.array[seg == 22].mean() - 100


def test_real_ras_ct_reads_as_axial_and_its_totalsegmentator_mask_lines_up(real: Path) -> None:
    ts = real / "nifti/totalsegmentator"
    vol = load_study(ts / "example_ct.nii.gz")
    assert vol.affine[2, 0] > 0 and vol.affine[1, 1] > 0 and vol.affine[0, 2] > 0  # S, P, L ascending
    ours, theirs = _world_values(vol, ts / "example_ct.nii.gz")
    np.testing.assert_array_equal(ours, theirs)
    seg = load_segmentation(ts / "example_seg_fast_force_split.nii.gz", vol)
    vertebrae = (seg >= 27) & (seg <= 33)  # TotalSegmentator v2: L5 .. T11
    assert vertebrae.sum() > 1000 and vol.array[vertebrae].mean() > 150


def test_mri_and_stored_values_are_refused(real: Path, tmp_path: Path) -> None:
    with pytest.raises(DicomError, match="not CT Hounsfield units"):
        load_study(real / "nifti/sct_cervical_mri/t2.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), tmp_path / "flat.nii.gz")
    with pytest.raises(DicomError, match="nothing below 0"):
        load_study(tmp_path / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), -1, np.int16), np.eye(4)), tmp_path / "x.nii")
    with pytest.raises(DicomError, match="NIfTI file holds one volume"):
        load_study(tmp_path / "x.nii", series_uid="1.2.3")


def test_window_and_resample_geometry() -> None:
    vol = _volume((10, 12, 14))
    w = window(np.array([-500, 400, 1300]), "bone")
    np.testing.assert_allclose(w, [0.0, 0.5, 1.0])
    r = resample(vol, (1.0, 1.0, 1.2))
    assert r.shape == (19, 7, 7)
    # The first voxel centre stays in place and the far corner keeps its patient position.
    np.testing.assert_allclose(r.index_to_patient(np.zeros(3)), vol.index_to_patient(np.zeros(3)))
    np.testing.assert_allclose(
        r.index_to_patient(np.array([18, 5.5, 6.5])), vol.index_to_patient(np.array([9, 11, 13]))
    )
