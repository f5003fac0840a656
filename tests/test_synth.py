"""The synthetic RSNA generator: layout, file fidelity, geometry, labels, boxes, masks, realism, determinism.

Everything runs on the small size (128 x 128, ~100 slices); one dataset of 8 + 2 studies is written once per module.
Generated files are read back through the project's own readers (cspine.io), imported inside the tests.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
from pathlib import Path

import numpy as np
import pytest

from cspine.labels import CERVICAL, LABEL_VALUES, PATIENT, PREDICTION_TYPES, PREVALENCE, row_id
from cspine.synth import (
    SynthConfig,
    generate_dataset,
    generate_study,
    label_distribution,
    sample_labels,
)
from cspine.synth.parts import TISSUES
from cspine.synth.writer import TRANSFER_SYNTAXES

SEED = 0
N_TRAIN, N_TEST = 8, 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate_dataset(
        SynthConfig(out=out, studies=N_TRAIN, seed=SEED, segmented=0.75, test_studies=N_TEST), progress=False
    )
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _first_positive(kind: str | None = None, start: int = 0) -> int:
    """Index of the first training study (seed 0) with a fracture (of ``kind`` if given)."""
    from cspine.synth import fracture_plan

    for i in range(start, start + 500):
        plan = fracture_plan(SEED, i)
        if plan and (kind is None or any(k == kind for _, k, _ in plan)):
            return i
    raise AssertionError(f"no study with a {kind} fracture")


# ----------------------------------------------------------------------------------------------------------------
# Layout and CSVs
# ----------------------------------------------------------------------------------------------------------------


def test_layout_and_csv_columns(dataset: Path) -> None:
    train = _rows(dataset / "train.csv")
    assert list(train[0]) == ["StudyInstanceUID", *PREDICTION_TYPES]
    assert len(train) == N_TRAIN
    for r in train:
        assert r[PATIENT] == str(int(any(r[c] == "1" for c in CERVICAL)))
        assert (dataset / "train_images" / r["StudyInstanceUID"]).is_dir()
    with open(dataset / "train_bounding_boxes.csv") as f:
        assert f.readline().strip() == "StudyInstanceUID,x,y,width,height,slice_number"
    test = _rows(dataset / "test.csv")
    assert list(test[0]) == ["row_id", "StudyInstanceUID", "prediction_type"]
    assert len(test) == N_TEST * len(PREDICTION_TYPES)
    for r in test:
        assert r["row_id"] == row_id(r["StudyInstanceUID"], r["prediction_type"])
        assert (dataset / "test_images" / r["StudyInstanceUID"]).is_dir()
    sub = _rows(dataset / "sample_submission.csv")
    assert list(sub[0]) == ["row_id", "fractured"]
    assert [r["row_id"] for r in sub] == [r["row_id"] for r in test]
    segs = sorted((dataset / "segmentations").glob("*.nii"))
    assert len(segs) == round(0.75 * N_TRAIN)
    assert {p.stem for p in segs} <= {r["StudyInstanceUID"] for r in train}
    assert not list(dataset.rglob(".*tmp*")), "temporary files left behind"
    # file name == InstanceNumber, numbered 1..n
    import pydicom

    folder = dataset / "train_images" / train[0]["StudyInstanceUID"]
    names = sorted(int(p.stem) for p in folder.glob("*.dcm"))
    assert names == list(range(1, len(names) + 1))
    for n in (1, len(names)):
        assert int(pydicom.dcmread(folder / f"{n}.dcm", stop_before_pixels=True).InstanceNumber) == n


def test_dicom_tags_and_syntaxes(dataset: Path) -> None:
    import pydicom

    seen_syntax, seen_repr, seen_bits, seen_intercept = set(), set(), set(), set()
    for folder in sorted((dataset / "train_images").iterdir()) + sorted((dataset / "test_images").iterdir()):
        ds = pydicom.dcmread(folder / "1.dcm")
        assert ds.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.StudyInstanceUID == folder.name and ds.SeriesInstanceUID and ds.FrameOfReferenceUID
        assert ds.Modality == "CT" and str(ds.PatientName).startswith("SYNTH^")
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert len(ds.ImagePositionPatient) == 3 and len(ds.PixelSpacing) == 2 and float(ds.SliceThickness) > 0
        assert float(ds.RescaleSlope) == 1.0
        seen_syntax.add(str(ds.file_meta.TransferSyntaxUID))
        seen_repr.add(int(ds.PixelRepresentation))
        seen_bits.add(int(ds.BitsStored))
        seen_intercept.add(float(ds.RescaleIntercept))
    assert seen_syntax == set(TRANSFER_SYNTAXES)
    assert seen_repr == {0, 1}
    assert 12 in seen_bits and 16 in seen_bits
    assert -1024.0 in seen_intercept


@pytest.mark.parametrize("syntax", TRANSFER_SYNTAXES)
@pytest.mark.parametrize(("bits", "signed"), [(12, False), (16, False), (16, True)])
def test_codecs_round_trip_exactly(syntax: str, bits: int, signed: bool) -> None:
    import pydicom

    from cspine.synth.writer import encode_frame

    rng = np.random.default_rng(1)
    lo, hi = (-2048, 3071) if signed else (0, (1 << bits) - 1)
    arr = rng.integers(lo, hi + 1, size=(64, 80)).astype(np.int16 if signed else np.uint16)
    arr[:8] = lo  # flat runs and extremes as in air / padding
    arr[8:16] = hi
    ds = pydicom.dcmread(io.BytesIO(encode_frame(arr, syntax, bits, signed)))
    assert str(ds.file_meta.TransferSyntaxUID) == syntax
    np.testing.assert_array_equal(ds.pixel_array.astype(np.int32), arr.astype(np.int32))


# ----------------------------------------------------------------------------------------------------------------
# Read back through cspine.io: geometry, pixels, masks
# ----------------------------------------------------------------------------------------------------------------


def test_read_back_geometry_and_pixels(dataset: Path) -> None:
    from cspine.io import load_series

    orders = set()
    for i in range(N_TRAIN):
        study = generate_study(SEED, "small", i)
        vol = load_series(dataset / "train_images" / study.uid)
        np.testing.assert_array_equal(vol.array, study.volume.array)
        np.testing.assert_allclose(vol.affine, study.volume.affine, atol=1e-3)
        np.testing.assert_allclose(vol.spacing, study.volume.spacing, rtol=1e-4)
        np.testing.assert_array_equal(vol.instance_numbers, study.volume.instance_numbers)
        assert vol.shape[1:] == (128, 128) and 85 <= vol.shape[0] <= 115
        z = vol.index_to_patient(np.array([[0, 0, 0], [vol.shape[0] - 1, 0, 0]]))[:, 2]
        assert z[0] < z[1], "volume slices ascend in z"
        top_instance = int(vol.instance_numbers[-1])
        assert top_instance == (1 if study.top_first else vol.shape[0])
        orders.add(study.top_first)
        dz, dy, dx = vol.spacing
        assert 1.0 <= dx <= 1.8 and dx == dy and 1.0 <= dz <= 3.0
    assert orders == {True, False}, "both slice orders must occur"


def test_masks_align_by_geometry_and_community_flip(dataset: Path) -> None:
    import nibabel as nib

    from cspine.io import load_segmentation, load_series

    checked_flip = False
    for i in range(N_TRAIN):
        study = generate_study(SEED, "small", i)
        nii = dataset / "segmentations" / f"{study.uid}.nii"
        if not nii.exists():
            continue
        vol = load_series(dataset / "train_images" / study.uid)
        np.testing.assert_array_equal(load_segmentation(nii, vol), study.mask)
        if study.top_first:  # the public solutions' hard-coded flip, in file (InstanceNumber) order
            data = np.asanyarray(nib.load(str(nii)).dataobj)
            flipped = data[:, ::-1, ::-1].transpose(2, 1, 0)
            file_order = study.mask[np.argsort(study.volume.instance_numbers)]
            np.testing.assert_array_equal(flipped, file_order)
            checked_flip = True
    assert checked_flip


def test_mask_labels_and_hu_inside_vertebrae() -> None:
    study = generate_study(SEED, "small", 1)
    a, m = study.volume.array, study.mask
    present = set(np.unique(m).tolist()) - {0}
    assert {LABEL_VALUES[c] for c in CERVICAL} <= present <= set(range(1, 10))
    soft = float(a[study.tissue == TISSUES["soft"]].mean())
    for c in CERVICAL:
        inside = float(a[m == LABEL_VALUES[c]].mean())
        assert inside > soft + 200, f"{c}: mean HU {inside:.0f} vs soft tissue {soft:.0f}"
    # cranio-caudal order of the labels
    zc = [np.nonzero(m == LABEL_VALUES[c])[0].mean() for c in CERVICAL]
    assert all(a_ > b_ for a_, b_ in itertools.pairwise(zc)), zc


def test_hu_per_tissue() -> None:
    """Median HU per phantom tissue class sits in the clinical range (small size, partial volume included)."""
    expected = {
        "fat": (-130, -65),
        "soft": (25, 70),
        "airway": (-1024, -900),
        "canal": (0, 50),
        "disc": (55, 120),
        "cortical": (450, 1600),  # partial volume at 1.5 mm; full size: 1000-1500
        "cancellous": (120, 600),
    }
    for i in range(3):
        study = generate_study(SEED, "small", i)
        a, t = study.volume.array, study.tissue
        for name, (lo, hi) in expected.items():
            vals = a[t == TISSUES[name]]
            assert vals.size > 20, name
            med = float(np.median(vals))
            assert lo <= med <= hi, f"study {i} {name}: median {med:.0f} HU outside [{lo}, {hi}]"
        # 0.5-0.9 mm cortex in 1.5 mm voxels: partial volume caps it near 600-900 HU; full size reaches 1000-1500
        assert np.percentile(a[study.mask > 0], 99) > 500


# ----------------------------------------------------------------------------------------------------------------
# Labels, fractures, boxes
# ----------------------------------------------------------------------------------------------------------------


def test_label_distribution_matches_rsna_exactly() -> None:
    sets, probs = label_distribution()
    assert abs(probs.sum() - 1) < 1e-9
    marg = np.zeros(7)
    for s, p in zip(sets, probs, strict=True):
        for v in s:
            marg[v] += p
    target = np.array([PREVALENCE[c] for c in CERVICAL]) / PREVALENCE[PATIENT]
    np.testing.assert_allclose(marg, target, rtol=1e-4)


def test_label_prevalence_over_many_seeds() -> None:
    n = 12000
    rows = [sample_labels(seed, i) for seed in range(3) for i in range(n // 3)]
    for p in PREDICTION_TYPES:
        rate = sum(r[p] for r in rows) / n
        se = np.sqrt(PREVALENCE[p] * (1 - PREVALENCE[p]) / n)
        assert abs(rate - PREVALENCE[p]) < 4 * se, f"{p}: {rate:.4f} vs {PREVALENCE[p]}"
    multi = [r for r in rows if sum(r[c] for c in CERVICAL) >= 2]
    assert 0.25 < len(multi) / sum(r[PATIENT] for r in rows) < 0.5
    adjacent = sum(any(r[a] and r[b] for a, b in itertools.pairwise(CERVICAL)) for r in multi)
    assert adjacent / len(multi) > 0.6, "multiple fractures are mostly at adjacent levels"


def test_labels_match_fractures_and_boxes() -> None:
    for kind in ("body_line", "wedge", "posterior", "dens", "ring"):
        i = _first_positive(kind)
        study = generate_study(SEED, "small", i)
        fx_levels = {f["vertebra"] for f in study.fractures}
        assert fx_levels == {c for c in CERVICAL if study.labels[c]}
        assert study.labels[PATIENT] == 1
        assert study.boxes, f"{kind}: a fracture must cross at least one slice"
        inst = study.volume.instance_numbers
        for b in study.boxes:
            k = int(np.nonzero(inst == b["slice_number"])[0][0])
            vmask = study.mask[k] == LABEL_VALUES[b["vertebra"]]
            assert vmask.any(), f"box on slice {b['slice_number']} without its vertebra {b['vertebra']}"
            rows, cols = np.nonzero(vmask)
            assert b["x"] >= cols.min() - 1e-6 and b["x"] + b["width"] <= cols.max() + 1 + 1e-6
            assert b["y"] >= rows.min() - 1e-6 and b["y"] + b["height"] <= rows.max() + 1 + 1e-6
            assert b["width"] > 0 and b["height"] > 0
        # the fracture voxels are inside the vertebra's label
        frac = study.tissue == TISSUES["fracture"]
        assert frac.any()
        assert np.isin(study.mask[frac], [LABEL_VALUES[v] for v in fx_levels]).all()


def test_negative_study_has_no_fracture() -> None:
    i = next(i for i in range(50) if not sample_labels(SEED, i)[PATIENT])
    study = generate_study(SEED, "small", i)
    assert not study.fractures and not study.boxes and not (study.tissue == TISSUES["fracture"]).any()


def test_boxes_csv_matches_studies(dataset: Path) -> None:
    rows = _rows(dataset / "train_bounding_boxes.csv")
    by_uid: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_uid.setdefault(r["StudyInstanceUID"], []).append(r)
    for i in range(N_TRAIN):
        study = generate_study(SEED, "small", i)
        got = by_uid.get(study.uid, [])
        if study.has_boxes:
            assert len(got) == len(study.boxes)
            assert [int(r["slice_number"]) for r in got] == [b["slice_number"] for b in study.boxes]
        else:
            assert not got


# ----------------------------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------------------------


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "synth.json"
    }


def test_same_seed_same_bytes(tmp_path: Path, dataset: Path) -> None:
    cfg = SynthConfig(out=tmp_path / "a", studies=4, seed=SEED, segmented=0.5, test_studies=1)
    generate_dataset(cfg, progress=False)
    first = _digest(tmp_path / "a")
    generate_dataset(cfg, progress=False)  # rewrite in place: identical
    assert _digest(tmp_path / "a") == first
    # a study is the same whatever the dataset size: compare with the module dataset (8 studies)
    big = _digest(dataset)
    shared = [k for k in first if k.startswith("train_images")]
    assert shared and all(big[k] == first[k] for k in shared)
    a, b = generate_study(SEED, "small", 2), generate_study(SEED, "small", 2)
    np.testing.assert_array_equal(a.volume.array, b.volume.array)
    np.testing.assert_array_equal(a.mask, b.mask)
    c = generate_study(SEED + 1, "small", 2)
    assert c.uid != a.uid and not np.array_equal(c.volume.array[:10], a.volume.array[:10])


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size"):
        SynthConfig(out=tmp_path, size="medium")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="segmented"):
        SynthConfig(out=tmp_path, segmented=1.5)
    with pytest.raises(ValueError, match="size"):
        generate_study(0, "huge")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------
# Realism, measured
# ----------------------------------------------------------------------------------------------------------------

BANDS = {"fat": (-200, -30), "soft": (-30, 120), "bone": (250, 3100)}


def _band_stats(hu: np.ndarray) -> dict[str, tuple[float, float]]:
    """Median HU and fraction of body pixels (HU > -500) per fixed HU band."""
    body = hu[hu > -500]
    return {
        k: (float(np.median(body[(body >= lo) & (body < hi)])), float(((body >= lo) & (body < hi)).mean()))
        for k, (lo, hi) in BANDS.items()
    }


def test_hu_distribution_close_to_real_ct(real: Path) -> None:
    import pydicom

    ds = pydicom.dcmread(real / "codec" / "cornerstone_ctimage" / "CTImage.dcm")
    real_hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    ref = _band_stats(real_hu)
    stats = [_band_stats(generate_study(SEED, "small", i).volume.array.astype(np.float64)) for i in range(4)]
    syn = {k: (float(np.mean([s[k][0] for s in stats])), float(np.mean([s[k][1] for s in stats]))) for k in BANDS}
    print("\nHU band   real median / body fraction   synthetic median / body fraction")
    for k in BANDS:
        print(f"{k:5s} {ref[k][0]:8.0f} / {ref[k][1]:.3f}          {syn[k][0]:8.0f} / {syn[k][1]:.3f}")
    assert abs(syn["soft"][0] - ref["soft"][0]) < 35
    assert abs(syn["fat"][0] - ref["fat"][0]) < 30
    assert 0.6 < syn["bone"][0] / ref["bone"][0] < 2.0
    for k in BANDS:  # every class present in a similar proportion (neck vs chest: within a factor of 4)
        assert 0.25 < syn[k][1] / ref[k][1] < 4.0, k


def _global_auc(n: int) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    y, feats = [], {"mean HU": [], "bone volume": [], "mean bone HU": []}
    for i in range(n):
        s = generate_study(SEED, "small", i)
        a = s.volume.array
        bone = a > 250
        voxel = float(np.prod(s.volume.spacing))
        y.append(s.labels[PATIENT])
        feats["mean HU"].append(float(a[a > -500].mean()))
        feats["bone volume"].append(float(bone.sum()) * voxel)
        feats["mean bone HU"].append(float(a[bone].mean()))
    return {k: float(roc_auc_score(y, v)) for k, v in feats.items()}


def test_no_global_statistic_separates_fractures() -> None:
    aucs = _global_auc(80)
    print("\nAUC of global statistics for patient_overall (80 studies):", {k: round(v, 3) for k, v in aucs.items()})
    for k, v in aucs.items():
        assert 0.3 <= v <= 0.7, f"{k} separates fractured studies (AUC {v:.2f})"


@pytest.mark.slow
def test_no_global_statistic_separates_fractures_large() -> None:
    aucs = _global_auc(300)
    print("\nAUC of global statistics for patient_overall (300 studies):", {k: round(v, 3) for k, v in aucs.items()})
    for k, v in aucs.items():
        assert 0.4 <= v <= 0.6, f"{k} separates fractured studies (AUC {v:.2f})"


@pytest.mark.slow
def test_full_size_study() -> None:
    import time

    t = time.perf_counter()
    study = generate_study(SEED, "full", _first_positive())
    dt = time.perf_counter() - t
    dz, _dy, dx = study.volume.spacing
    assert study.volume.shape[1:] == (512, 512) and 200 <= study.volume.shape[0] <= 600
    assert 0.25 <= dx <= 0.45 and 0.5 <= dz <= 1.0
    assert study.boxes and dt < 60
    assert np.percentile(study.volume.array[study.mask > 0], 99.5) > 1000, "dense cortex ~1000-1500 HU"
    small = generate_study(SEED, "small", _first_positive())
    assert small.labels == study.labels and small.uid == study.uid
    # same anatomy, different sampling: same field of view and z extent
    fov = lambda s: np.array(s.volume.shape) * np.array(s.volume.spacing)  # noqa: E731
    np.testing.assert_allclose(fov(small)[1:], fov(study)[1:], rtol=1e-3)
    np.testing.assert_allclose(fov(small)[0], fov(study)[0], rtol=0.03)
