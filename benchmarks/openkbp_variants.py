"""The segmenter on OpenKBP pt2 turned, scaled, resampled and cut, judged by the issue's real-neck criteria.

Run: ``.venv/bin/python benchmarks/openkbp_variants.py [--model DIR] [--only orig,flex10,...]``.

OpenKBP pt2 (``../shared/data/real/nifti/openkbp_hn_pt2``, never copied here) is one real head-and-neck CT; other
patients lie with the head tilted or turned in the scanner, are larger or smaller, and are scanned at other voxel sizes
and fields of view. Each variant resamples the CT (linear) and its contours (nearest) together: ``flexN`` turns the
whole patient by N degrees about the left-right axis (the head and neck pitched together), ``rollN`` about the
front-back axis, ``yawN`` about the long axis, ``sX`` scales every length by X, ``zN`` / ``xyN`` / ``isoN`` resample to
N mm slices / pixels / voxels, ``top+N`` cuts the field of view N mm above the foramen magnum (``top-100``: a chest CT
starting in C6) and ``bottom`` cuts it under C7. Judged as ``real_ct_check.py`` judges the original: C1-C7 found (>= 1
ml) in cranio-caudal order, C1's centroid 0-25 mm under the Brainstem contour's lower end (the foramen magnum), C1-C7
span 70-140 mm, every level within 30 mm in-plane of the SpinalCord contour and on bone (mean HU >= 100). Printed per
variant: the failed criteria, and each level's height above the foramen magnum (mm) and volume (ml). A variant cut at
the top (``top+40`` ... ``top-100``: a 2 ml piece of the atlas named "C1" passes the criteria above) or ending in the
atlas or the axis (``head-25`` ...) is judged by names instead, against the original's segmentation (``orig``, run
first; its names meet the criteria above) as far as it lies in the variant's view: each level found must be nearest to
the original's level of that name, and each of the original's levels at least half in view must be found.
"""

from __future__ import annotations

import argparse
import tempfile
from itertools import pairwise
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from cspine.io import load_study
from cspine.io.volume import Volume
from cspine.seg.infer import load_model, segment_volume
from cspine.seg.shipped import shipped_model

PT2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "nifti" / "openkbp_hn_pt2"
LEVELS = [f"C{k}" for k in range(1, 8)]
BRAINSTEM, SPINAL_CORD = 1, 9  # structures_labels.txt


def rotation(axis: int, degrees: float) -> np.ndarray:
    """4x4 rotation about RAS axis ``axis`` (0: left-right, 1: front-back, 2: long axis)."""
    t = np.deg2rad(degrees)
    i, j = [(1, 2), (0, 2), (0, 1)][axis]
    r = np.eye(4)
    r[i, i] = r[j, j] = np.cos(t)
    r[i, j], r[j, i] = -np.sin(t), np.sin(t)
    return r


VARIANTS: dict[str, dict] = {
    "orig": {},
    **{f"flex{d:+d}": {"turn": rotation(0, d)} for d in (-20, -15, -10, -5, 5, 10, 15, 20)},
    **{f"roll{d:+d}": {"turn": rotation(1, d)} for d in (-20, -10, 10, 20)},
    **{f"yaw{d:+d}": {"turn": rotation(2, d)} for d in (-20, 20)},
    "flex+10roll+10": {"turn": rotation(0, 10) @ rotation(1, 10)},
    "flex-10roll-10": {"turn": rotation(0, -10) @ rotation(1, -10)},
    **{f"s{s}": {"scale": s} for s in (0.9, 1.1)},
    "z2": {"voxel": (4.625, 4.625, 2.0)},
    "xy3": {"voxel": (3.0, 3.0, 2.0)},
    "iso1.5": {"voxel": (1.5, 1.5, 1.5)},
    **{f"top{d:+d}": {"top_mm": float(d)} for d in (40, 15, 10, 5)},
    "bottom": {"bottom_mm": -138.0},
    # a neck CT that starts at or under the foramen magnum: no skull to count from
    **{f"top{d:+d}": {"top_mm": float(d)} for d in (0, -20, -45, -70)},
    # a chest CT whose first slices hold C6 and C7
    "top-100": {"top_mm": -100.0},
    # a head CT that ends in the atlas or the axis (a routine head CT reaches down to C1-C2)
    **{f"head{d:+d}": {"bottom_mm": float(d)} for d in (-25, -35, -45, -55)},
}


def resample(
    ct: nib.Nifti1Image,
    labels: np.ndarray,
    turn: np.ndarray | None = None,
    scale: float = 1.0,
    voxel: tuple[float, float, float] | None = None,
    top_mm: float | None = None,
    bottom_mm: float | None = None,
    fm_z: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(HU, labels, affine) of the variant on an axis-aligned grid covering the turned and scaled volume; the cuts
    (of a variant not turned or scaled) are heights above the foramen magnum, ``fm_z`` (RAS z)."""
    src = np.diag([scale, scale, scale, 1.0]) @ ct.affine
    shape = np.array(ct.shape)
    corners = np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    world = src @ corners.T
    centre = np.eye(4)
    centre[:3, 3] = world[:3].mean(axis=1)
    move = centre @ (turn if turn is not None else np.eye(4)) @ np.linalg.inv(centre)
    world = move @ world
    lo, hi = world[:3].min(axis=1), world[:3].max(axis=1)
    if top_mm is not None:
        hi[2] = min(hi[2], fm_z + top_mm)
    if bottom_mm is not None:
        lo[2] = max(lo[2], fm_z + bottom_mm)
    size = np.asarray(voxel if voxel is not None else np.abs(np.diag(ct.affine)[:3]), dtype=float)
    sign = np.sign(np.diag(ct.affine)[:3])
    out = np.eye(4)
    out[:3, :3] = np.diag(sign * size)
    out[:3, 3] = np.where(sign > 0, lo, hi)
    out_shape = tuple(np.floor((hi - lo) / size).astype(int) + 1)
    m = np.linalg.inv(src) @ np.linalg.inv(move) @ out
    hu = ndimage.affine_transform(
        np.asarray(ct.dataobj, dtype=np.float32), m[:3, :3], m[:3, 3], out_shape, order=1, cval=-1024
    )
    lab = ndimage.affine_transform(labels, m[:3, :3], m[:3, 3], out_shape, order=0, cval=0)
    return np.rint(hu).astype(np.int16), lab, out


def judge(levels: dict[str, dict], fm: float, cord: np.ndarray) -> list[str]:
    """The failed criteria (``levels``: name -> RAS centroid, ml, mean HU; ``cord``: RAS points of the cord)."""
    present = [n for n in LEVELS if n in levels and levels[n]["ml"] >= 1.0]
    z = [levels[n]["ras"][2] for n in present]
    fails = [] if present == LEVELS else [f"found {','.join(present) or 'none'}"]
    if any(a <= b for a, b in pairwise(z)):
        fails.append("out of order")
    if "C1" in levels and not 0 <= fm - levels["C1"]["ras"][2] <= 25:
        fails.append(f"C1 {fm - levels['C1']['ras'][2]:.0f} mm under the FM")
    if "C1" in levels and "C7" in levels and not 70 <= levels["C1"]["ras"][2] - levels["C7"]["ras"][2] <= 140:
        fails.append(f"span {levels['C1']['ras'][2] - levels['C7']['ras'][2]:.0f} mm")
    for n, lv in levels.items():
        near = cord[np.abs(cord[:, 2] - lv["ras"][2]) <= 3]
        if len(near) and np.linalg.norm(near[:, :2].mean(axis=0) - lv["ras"][:2]) > 30:
            fails.append(f"{n} off the cord")
        if lv["hu"] < 100:
            fails.append(f"{n} {lv['hu']:.0f} HU")
    return fails


def judge_names(mask: np.ndarray, vol: Volume, orig_mask: np.ndarray, orig_vol: Volume) -> list[str]:
    """The failed criteria of a cut variant (``mask`` on ``vol``), by the original's levels (``orig_mask`` on
    ``orig_vol``, named right by :func:`judge`) as far as they lie in the variant's view: each level found is
    nearest (centroid) to the original's level of that name, and each original level at least half in view is
    found (>= 1 ml). A cut level is compared with the original's part in view, whose centroid moves with the cut."""
    idx = np.argwhere((orig_mask >= 1) & (orig_mask <= 7))
    at = nib.affines.apply_affine(np.linalg.inv(vol.affine) @ orig_vol.affine, idx)
    seen = np.all((np.rint(at) >= 0) & (np.rint(at) < mask.shape), axis=1)
    values = orig_mask[tuple(idx.T)]
    ml = np.bincount(mask[(mask >= 1) & (mask <= 7)], minlength=8) * float(np.prod(vol.spacing)) / 1000
    share = np.bincount(values[seen], minlength=8) / np.maximum(np.bincount(values, minlength=8), 1)
    centre = {k: at[seen & (values == k)].mean(axis=0) for k in range(1, 8) if (seen & (values == k)).any()}
    fails = []
    mm = np.asarray(vol.spacing)
    for k, n in enumerate(LEVELS, 1):
        found = np.argwhere(mask == k)
        if len(found) and centre:
            c = found.mean(axis=0) * mm
            near = min(centre, key=lambda j: float(np.linalg.norm(centre[j] * mm - c)))
            if near != k:
                fails.append(f"{n} is {LEVELS[near - 1]}")
    missing = [LEVELS[k - 1] for k in range(1, 8) if share[k] >= 0.5 and ml[k] < 1.0]
    if missing:
        fails.append(f"missing {','.join(missing)}")
    return fails


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="segmenter directory (default: the shipped one)")
    ap.add_argument("--only", default="", help="comma-separated variant names")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model or shipped_model(), "cpu")
    ct = nib.load(PT2 / "ct.nii.gz")
    structures = nib.load(PT2 / "structures.nii.gz")
    labels = np.asarray(structures.dataobj).astype(np.int16)
    fm_z = float(nib.affines.apply_affine(structures.affine, np.argwhere(labels == BRAINSTEM))[:, 2].min())
    names = [n for n in VARIANTS if not args.only or n in args.only.split(",")]
    by_names = {n for n in names if "top_mm" in VARIANTS[n] or n.startswith("head")}
    if by_names and "orig" not in names:
        names.insert(0, "orig")
    orig: tuple[np.ndarray, Volume] | None = None
    right = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            hu, lab, affine = resample(ct, labels, fm_z=fm_z, **VARIANTS[name])
            path = Path(tmp) / f"{name}.nii.gz"
            nib.save(nib.Nifti1Image(hu, affine), path)
            ras = {k: nib.affines.apply_affine(affine, np.argwhere(lab == k)) for k in (BRAINSTEM, SPINAL_CORD)}
            fm = float(ras[BRAINSTEM][:, 2].min()) if len(ras[BRAINSTEM]) else fm_z
            vol = load_study(path)
            res = segment_volume(vol, model)
            to_ras = np.diag([-1.0, -1.0, 1.0])
            levels = {}
            for k, n in enumerate(LEVELS, 1):
                idx = np.argwhere(res.mask == k)
                if len(idx):
                    levels[n] = {
                        "ras": to_ras @ vol.index_to_patient(idx.mean(axis=0))[0],
                        "ml": len(idx) * float(np.prod(vol.spacing)) / 1000,
                        "hu": float(vol.array[res.mask == k].mean()),
                    }
            if name == "orig":
                orig = (res.mask, vol)
            if name in by_names and orig is not None:
                fails = judge_names(res.mask, vol, *orig)
            else:
                fails = judge(levels, fm, ras[SPINAL_CORD])
            right += not fails
            ref = fm_z if name in by_names else fm  # not turned: the original's foramen magnum
            heights = " ".join(f"{n} {lv['ras'][2] - ref:+.0f} ({lv['ml']:.0f})" for n, lv in levels.items())
            print(f"{name:15s} {'right' if not fails else 'WRONG'}  {'; '.join(fails):45s} {heights}", flush=True)
    print(f"{right}/{len(names)} variants meet every criterion")


if __name__ == "__main__":
    main()
