"""The segmenter that ships in the package: its record, its quality on fresh generated studies, and real CT.

The real-CT tests are the acceptance of the real-anatomy issue on the CTs in ../shared/data/real: the two real necks
(OpenKBP pt2 with its clinician contours; the Slicer neck against the reading in docs/real_ct.md) and two real CTs
without a cervical spine.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cspine.seg.shipped import SHIPPED_DIR, shipped_model

pytestmark = pytest.mark.skipif(shipped_model() is None, reason=f"no shipped segmenter in {SHIPPED_DIR}")

LEVELS = [f"C{k}" for k in range(1, 8)]
#: The Slicer neck read by eye on its reformats (docs/real_ct.md): centre height (mm above its lowest slice).
SLICER_READING = {"C1": 80.0, "C2": 66.0, "C3": 48.0, "C4": 36.0, "C5": 24.0, "C6": 11.0}
HALF_VERTEBRA_MM = 6.0


@pytest.fixture(scope="module")
def seg_model():
    from cspine.seg.infer import load_model

    return load_model(SHIPPED_DIR)


def test_record_says_how_to_rebuild_it_and_what_it_scored() -> None:
    record = json.loads((SHIPPED_DIR / "recipe.json").read_text())
    assert record["command"].startswith("cspine build-segmenter")
    recipe = record["recipe"]
    assert recipe["coarse"]["randomize"] and recipe["refine"]["randomize"]
    seeds = {s["seed"] for s in recipe["train_sets"]} | {s["seed"] for s in recipe["heldout_sets"]}
    assert 0 not in seeds and len(seeds) == len(recipe["train_sets"]) + len(recipe["heldout_sets"])
    assert set(record["heldout"]) == {s["name"] for s in recipe["heldout_sets"]}
    assert record["stages"]["coarse"]["train_seconds"] > 0 and record["stages"]["refine"]["steps"] > 0
    if recipe.get("keep_refine"):  # a kept refinement stage names the build that trained it
        kept = record["stages"]["refine"]["kept_from"]
        assert kept["command"].startswith("cspine build-segmenter") and kept["stage"]["steps"] > 0
    size = sum(p.stat().st_size for p in SHIPPED_DIR.rglob("*") if p.is_file())
    assert size < 40e6, f"the shipped segmenter is {size / 1e6:.0f} MB"


def test_checkpoints_load_with_weights_only() -> None:
    import torch

    for d in (SHIPPED_DIR, SHIPPED_DIR / "refine"):
        path = d / "model.pt" if (d / "model.pt").exists() else d / "best.pt"
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert state.get("model")


@pytest.fixture(scope="module")
def fresh_dice(seg_model) -> list[dict[str, float]]:
    """Dice per vertebra on two default-profile small studies of a seed the segmenter never trained on."""
    from cspine.seg.evaluate import evaluate_masks
    from cspine.seg.infer import segment_volume
    from cspine.synth import generate_study

    out = []
    for index in range(2):
        st = generate_study(4321, "small", index)
        res = segment_volume(st.volume, seg_model)
        scores = evaluate_masks(res.mask, st.mask, st.volume.spacing, labels=range(1, 8))
        out.append({lv: scores[lv]["dice"] or 0.0 for lv in LEVELS if scores[lv]["truth_voxels"]})
    return out


def test_fresh_generated_studies_meet_the_issue_targets(fresh_dice: list[dict[str, float]]) -> None:
    """Issue 13's generated target, as eval-seg scores a set (each vertebra's Dice averaged over the studies):
    mean >= 0.90 and every vertebra >= 0.85; and no vertebra of any study below 0.80."""
    assert all(len(dice) == 7 for dice in fresh_dice)
    per_vertebra = {lv: float(np.mean([dice[lv] for dice in fresh_dice])) for lv in LEVELS}
    assert np.mean(list(per_vertebra.values())) >= 0.90 and min(per_vertebra.values()) >= 0.85, per_vertebra
    assert min(min(dice.values()) for dice in fresh_dice) >= 0.80, fresh_dice


def test_body_box_is_the_non_air_voxels_plus_the_margin() -> None:
    from cspine.seg.infer import body_box

    image = np.zeros((20, 30, 40), np.float32)
    image[5:8, 10:12, 3:30] = 0.4
    assert body_box(image, 4) == (slice(1, 12), slice(6, 16), slice(0, 34))
    assert body_box(np.zeros((4, 4, 4), np.float32), 4) is None


def test_air_around_the_body_costs_no_network_time_and_changes_no_vertebra(seg_model, monkeypatch) -> None:
    """A wide field of view (a generated study with 100 mm of air added on every in-plane side, as a 500 mm
    head-and-neck field has): the coarse network sees only the body's box, and the Dice to the truth is that of the
    study as it was generated, within 0.01 on average and 0.035 for any vertebra (the network's input box differs,
    so not voxel for voxel). Run on the whole grid, such studies lost C1-C3 (Dice 0.00-0.67; docs/segmentation.md)."""
    import cspine.seg.infer as infer
    from cspine.seg.evaluate import evaluate_masks
    from cspine.synth import generate_study

    st = generate_study(4321, "small", 0)
    vol = st.volume
    pad = [round(100 / s) for s in vol.spacing[1:]]
    wide = np.pad(vol.array, ((0, 0), (pad[0], pad[0]), (pad[1], pad[1])), constant_values=-1024)
    affine = vol.affine.copy()
    affine[:3, 3] -= affine[:3, 1] * pad[0] + affine[:3, 2] * pad[1]
    wide_vol = type(vol)(wide, vol.spacing, affine, vol.instance_numbers)
    seen = []
    real = infer.predict_logits

    def spy(model, image, cfg=None):
        seen.append(image.shape)
        return real(model, image, cfg)

    monkeypatch.setattr(infer, "predict_logits", spy)
    res = infer.segment_volume(wide_vol, seg_model)
    grid = infer.to_model_grid(wide_vol, seg_model.preprocess)[0].shape
    assert np.prod(seen[0]) < 0.5 * np.prod(grid), (seen[0], grid)
    mask = res.mask[:, pad[0] : pad[0] + vol.shape[1], pad[1] : pad[1] + vol.shape[2]]
    assert (res.mask > 0).sum() == (mask > 0).sum()  # nothing labelled in the added air
    wide_dice = evaluate_masks(mask, st.mask, vol.spacing, labels=range(1, 8))
    dice = evaluate_masks(infer.segment_volume(vol, seg_model).mask, st.mask, vol.spacing, labels=range(1, 8))
    change = {lv: wide_dice[lv]["dice"] - dice[lv]["dice"] for lv in LEVELS}
    assert np.mean(list(change.values())) >= -0.01 and min(change.values()) >= -0.035, change


def _segment(study: Path, out: Path, *extra: str) -> dict:
    """``cspine segment`` with no --model (the shipped segmenter) -> per level centroid (RAS mm) and volume."""
    r = subprocess.run([sys.executable, "-m", "cspine.cli", "segment", str(study), "--out", str(out), *extra],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    img = nib.load(str(out))
    m = np.asarray(img.dataobj)
    vox = abs(np.linalg.det(img.affine[:3, :3])) / 1000.0
    found = {}
    for k, name in enumerate(LEVELS, 1):
        idx = np.argwhere(m == k)
        if len(idx) and len(idx) * vox >= 1.0:
            found[name] = img.affine @ np.r_[idx.mean(0), 1.0]
    return found


@pytest.fixture(scope="module")
def openkbp(real: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict[str, np.ndarray]]:
    """The shipped segmenter's levels on OpenKBP pt2, and its Brainstem and SpinalCord contours (RAS mm)."""
    d = real / "nifti" / "openkbp_hn_pt2"
    found = _segment(d / "ct.nii.gz", tmp_path_factory.mktemp("openkbp") / "m.nii.gz")
    img = nib.load(str(d / "structures.nii.gz"))
    names = {v: int(k) for k, v in (line.split() for line in (d / "structures_labels.txt").read_text().splitlines())}
    s = np.asarray(img.dataobj)
    contours = {}
    for label in ("Brainstem", "SpinalCord"):
        idx = np.argwhere(s == names[label])
        contours[label] = (img.affine @ np.c_[idx, np.ones(len(idx))].T)[:3].T
    return found, contours


def _near_cord(found: dict, cord: np.ndarray) -> list[str]:
    far = []
    for lv, c in found.items():
        near = cord[np.abs(cord[:, 2] - c[2]) <= 3]
        if len(near) and np.linalg.norm(near[:, :2].mean(0) - c[:2]) > 30:
            far.append(lv)
    return far


def test_openkbp_neck_meets_the_issue_targets(openkbp: tuple[dict, dict[str, np.ndarray]]) -> None:
    """The network names the atlas "C2" and puts a "C1" on the skull base; the names hold once they are taken from
    the skull (cspine.seg.naming: the first vertebra under the cranial cavity is C1, the one under C6 is C7)."""
    found, contours = openkbp
    assert list(found) == LEVELS, f"found {list(found)}"
    z = [found[lv][2] for lv in LEVELS]
    assert all(a > b for a, b in itertools.pairwise(z)), z
    assert 0 <= contours["Brainstem"][:, 2].min() - z[0] <= 25
    assert 70 <= z[0] - z[-1] <= 140
    assert not _near_cord(found, contours["SpinalCord"])


def _turned(d: Path, axis: int, degrees: float, out: Path) -> dict[str, np.ndarray]:
    """OpenKBP pt2's CT turned by ``degrees`` about RAS axis ``axis`` (the patient lying so in the scanner; CT
    linear, contours nearest) on the same voxel sizes, written to ``out``; its Brainstem and SpinalCord (RAS mm)."""
    from scipy import ndimage

    ct, st = nib.load(str(d / "ct.nii.gz")), nib.load(str(d / "structures.nii.gz"))
    t = np.deg2rad(degrees)
    i, j = [(1, 2), (0, 2), (0, 1)][axis]
    turn = np.eye(4)
    turn[i, i] = turn[j, j] = np.cos(t)
    turn[i, j], turn[j, i] = -np.sin(t), np.sin(t)
    centre = np.eye(4)
    centre[:3, 3] = ct.affine[:3, :3] @ (np.array(ct.shape) - 1) / 2 + ct.affine[:3, 3]
    to_source = np.linalg.inv(ct.affine) @ centre @ np.linalg.inv(turn) @ np.linalg.inv(centre) @ ct.affine
    hu = ndimage.affine_transform(np.asarray(ct.dataobj, dtype=np.float32), to_source, order=1, cval=-1024)
    labels = ndimage.affine_transform(np.asarray(st.dataobj), to_source, order=0, cval=0)
    nib.save(nib.Nifti1Image(np.rint(hu).astype(np.int16), ct.affine), str(out))
    names = {v: int(k) for k, v in (line.split() for line in (d / "structures_labels.txt").read_text().splitlines())}
    return {
        n: nib.affines.apply_affine(ct.affine, np.argwhere(labels == names[n]))
        for n in ("Brainstem", "SpinalCord")
    }


@pytest.mark.parametrize(("axis", "degrees"), [(1, -10.0), (0, -5.0), (0, -15.0)])
def test_openkbp_turned_in_the_scanner_meets_the_issue_targets(
    real: Path, tmp_path: Path, axis: int, degrees: float
) -> None:
    """OpenKBP pt2 as if the patient lay turned in the scanner (10 degrees about the front-back axis, 5 and 15
    chin-down about the left-right one): the network puts a "C1" on the skull base 14 mm above the foramen magnum
    on the first two, and before session 23 the cavity's floor was found in only one slice (turned 10 degrees) or
    11 mm higher than over the canal (5 degrees), so it stayed. The floor over the canal clears it and the names
    hold. Turned 15 degrees, the network also put "C7" on a shoulder (session 25: removed as lying beside the
    column) and "other" on C6 and C7 (both taken from it under C5)."""
    contours = _turned(real / "nifti" / "openkbp_hn_pt2", axis, degrees, tmp_path / "ct.nii.gz")
    found = _segment(tmp_path / "ct.nii.gz", tmp_path / "m.nii.gz")
    assert list(found) == LEVELS, f"found {list(found)}"
    z = [found[lv][2] for lv in LEVELS]
    assert all(a > b for a, b in itertools.pairwise(z)), z
    assert 0 <= contours["Brainstem"][:, 2].min() - z[0] <= 25, contours["Brainstem"][:, 2].min() - z[0]
    assert not _near_cord(found, contours["SpinalCord"])


def _cut_fov(
    real: Path, contours: dict[str, np.ndarray], out: Path, top_mm: float = np.inf, bottom_mm: float = -np.inf
) -> Path:
    """OpenKBP pt2 with its field of view cut to the slices from ``bottom_mm`` to ``top_mm`` over the foramen
    magnum (the Brainstem contour's lower end), written to ``out``."""
    img = nib.as_closest_canonical(nib.load(str(real / "nifti" / "openkbp_hn_pt2" / "ct.nii.gz")))
    z = img.affine[2, 2] * np.arange(img.shape[2]) + img.affine[2, 3]
    fm = contours["Brainstem"][:, 2].min()
    first, stop = int(np.argmax(z >= fm + bottom_mm)), int(np.searchsorted(z, fm + top_mm, side="right"))
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ [0, 0, first] + img.affine[:3, 3]
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, first:stop], affine), str(out))
    return out


def test_a_head_ct_that_stops_in_the_neck_keeps_the_level_names(
    real: Path, openkbp: tuple[dict, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    """OpenKBP pt2 cut as a head CT ending 68 mm below the foramen magnum (in its fourth vertebra): the levels still
    in view keep the names and places they have on the whole scan (within half a vertebra). The segmenter shipped
    before session 19, which never saw a head CT stopping in the neck, named them from the lowest slice (C4..C7)."""
    whole, contours = openkbp
    cut = _cut_fov(real, contours, tmp_path / "head_ct.nii.gz", bottom_mm=-68.0)
    found = _segment(cut, tmp_path / "m.nii.gz")
    assert {"C2", "C3"} <= set(found), f"found {list(found)}"
    moved = {lv: round(float(found[lv][2] - whole[lv][2])) for lv in found if lv in whole}
    assert set(moved) == set(found) and all(abs(d) <= HALF_VERTEBRA_MM for d in moved.values()), moved


def test_a_head_ct_that_ends_in_the_axis_finds_the_atlas_and_the_axis(
    real: Path, openkbp: tuple[dict, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    """OpenKBP pt2 cut as a routine head CT, ending 25 mm under the foramen magnum (through the axis): the network
    labels the atlas "C3", a 1 ml piece "C5" and the axis "C6", and two specks of skull "C1" and "C2". Session 23's
    naming looked for the canal by the second-highest label, a speck, found no floor and left "C3" and "C6". Now the
    canal is found by the levels that hold a vertebra's volume, the piece is merged and the levels under the atlas
    are named in order: C1 0-25 mm under the foramen magnum, C2 under it, nothing else."""
    _, contours = openkbp
    fm = contours["Brainstem"][:, 2].min()
    found = _segment(_cut_fov(real, contours, tmp_path / "head_ct.nii.gz", bottom_mm=-25.0), tmp_path / "m.nii.gz")
    assert list(found) == ["C1", "C2"], f"found {list(found)}"
    assert 0 <= fm - found["C1"][2] <= 25 and found["C2"][2] < found["C1"][2] - 10, (fm, found)


def test_a_neck_ct_starting_at_the_skull_base_keeps_the_level_names(
    real: Path, openkbp: tuple[dict, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    """OpenKBP pt2 starting 10 mm over the foramen magnum: the network splits the atlas into a 2 ml "C1" 4 mm over its
    "C2" and names the axis C3 (session 23's code left that); the piece is merged into the atlas and the skull names
    the column, so every level keeps its name and place on the whole scan (within half a vertebra)."""
    whole, contours = openkbp
    found = _segment(_cut_fov(real, contours, tmp_path / "neck.nii.gz", top_mm=10.0), tmp_path / "m.nii.gz")
    assert list(found) == LEVELS, f"found {list(found)}"
    moved = {lv: round(float(found[lv][2] - whole[lv][2])) for lv in LEVELS}
    assert all(abs(d) <= HALF_VERTEBRA_MM for d in moved.values()), moved


def test_names_without_a_skull_in_view_come_with_a_warning(
    real: Path, openkbp: tuple[dict, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    """OpenKBP pt2 starting 20 mm under the foramen magnum: no cranial cavity to count from, and the network names the
    axis C3 (a known limit): the report says the names were not checked against a skull."""
    _, contours = openkbp
    neck = _cut_fov(real, contours, tmp_path / "neck.nii.gz", top_mm=-20.0)
    _segment(neck, tmp_path / "m.nii.gz", "--report", str(tmp_path / "r.json"))
    warnings = json.loads((tmp_path / "r.json").read_text())["warnings"]
    assert any(w.startswith("names not checked against the skull") for w in warnings), warnings


def test_a_chest_ct_starting_in_the_neck_names_no_upper_level(
    real: Path, openkbp: tuple[dict, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    """OpenKBP pt2 starting 100 mm under the foramen magnum (a chest CT whose first slices hold C6 and C7): the network
    labels the column "C7" and pieces of ribs and a scapula 80-210 mm beside it "C1".."C6"; ordered by height with
    those pieces counted, the column became "C1" and a rib "C7" (session 24). No level above C6 lies in view, so none
    may be named."""
    _, contours = openkbp
    found = _segment(_cut_fov(real, contours, tmp_path / "chest.nii.gz", top_mm=-100.0), tmp_path / "m.nii.gz")
    assert set(found) <= {"C6", "C7"}, f"found {list(found)}"


@pytest.fixture(scope="module")
def slicer_heights(real: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    """The shipped segmenter's level centres on the Slicer neck, mm above its lowest slice."""
    import pydicom

    src = real / "series" / "slicer_ctheadaxial_neck"
    found = _segment(src, tmp_path_factory.mktemp("slicer") / "m.nii.gz", "--hu-offset", "-1024")
    z0 = min(float(pydicom.dcmread(str(f), stop_before_pixels=True).ImagePositionPatient[2])
             for f in src.glob("*.dcm"))
    return {lv: float(c[2]) - z0 for lv, c in found.items()}


def test_slicer_neck_levels_are_found_in_order(slicer_heights: dict[str, float]) -> None:
    heights = slicer_heights
    z = [heights[lv] for lv in LEVELS if lv in heights]
    assert len(z) >= 6 and all(a > b for a, b in itertools.pairwise(z)), heights


def test_slicer_neck_levels_match_the_reading(slicer_heights: dict[str, float]) -> None:
    """C1..C6 within half a vertebra of the reading (C7 is not asked for: its body lies below the lowest slice,
    docs/real_ct.md session 22; the segmenter shipped before session 19 put C5 and C6 9 and 6 mm low)."""
    heights = slicer_heights
    assert set(SLICER_READING) <= set(heights), f"found {sorted(heights)}"
    off = {lv: round(heights[lv] - mm) for lv, mm in SLICER_READING.items() if abs(heights[lv] - mm) > HALF_VERTEBRA_MM}
    assert not off, f"levels off the reading by more than half a vertebra (mm): {off}"


@pytest.mark.parametrize("case", ["abdomen", pytest.param("lumbar", marks=pytest.mark.slow)])
def test_real_ct_without_a_cervical_spine_reports_none(real: Path, tmp_path: Path, case: str) -> None:
    """The abdomen's labels are not bone or not stacked; the lumbar cut-out's are pieces of lumbar vertebrae that
    stack like levels but enclose no spinal canal (cspine.seg.presence). Either way: no cervical spine."""
    study = {
        "abdomen": real / "series" / "totalseg_example_ct_dicom",
        "lumbar": real / "nifti" / "tptbox_lumbar_ct" / "sub-ct_label-22_ct.nii.gz",
    }[case]
    if not study.exists():
        pytest.skip(f"{study} not in this copy of the real data")
    r = subprocess.run([sys.executable, "-m", "cspine.cli", "segment", str(study), "--out", str(tmp_path / "m.nii.gz"),
                        "--report", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["found"] == [], report["found"]
    assert report["cervical_spine"] == "absent"
