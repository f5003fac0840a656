"""Segmentation metrics: per-vertebra Dice and identification rate, on generated and on real masks.

Identification rate, as VerSe defines it: a vertebra is identified when the centroid of its predicted mask is
closer to the right reference centroid than to any other reference vertebra's centroid, and within
:data:`ID_RADIUS_MM` of it. The literal test "the predicted centroid lies inside the right reference vertebra"
fails for perfect predictions: a vertebra is a ring around the canal, and C1 is almost only a ring, whose
centroid lies in its hole (in all 45 generated studies checked); filling the hole does not help, because C2's dens
stands there (C1 predictions 1 mm off had their centroid on the dens). What the predicted centroid's voxel holds
is still reported (``centroid_voxel``) beside the centroid distance in mm.

Real masks come in other label conventions; :func:`cspine.labels.to_project_labels` maps them onto the project's values
(1..7 C1..C7, 8..19 T1..T12, 20..25 L1..L6, 26 sacrum, 28 T13) before anything is compared. Masks on different
grids are aligned through their affines (:func:`cspine.io.nifti.resample_labels`), never by array order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from cspine.labels import CERVICAL_VALUES, LABEL_NAMES, label_name, to_project_labels

#: Names of every vertebra value a reference mask may carry (project convention, MANIFEST): labels.py names
#: 1..19; lumbar, sacrum and T13 are added here for real-data checks.
VERTEBRA_NAMES: dict[int, str] = {
    **LABEL_NAMES,
    **{20 + i: f"L{i + 1}" for i in range(6)},
    26: "sacrum",
    28: "T13",
}
#: VerSe's identification radius (mm).
ID_RADIUS_MM = 20.0


def vertebra_name(value: int) -> str:
    """Name of a reference-mask value (C1..T12, L1..L6, sacrum, T13), else ``label<N>``."""
    return VERTEBRA_NAMES.get(int(value), label_name(value))


def _centroids(mask: np.ndarray, values: Sequence[int]) -> dict[int, np.ndarray]:
    """Voxel-index centroid of each value present (computed inside its bounding box)."""
    objects = ndimage.find_objects(mask)
    out = {}
    for v in values:
        sl = objects[v - 1] if 0 < v <= len(objects) else None
        if sl is not None:
            out[v] = np.array(ndimage.center_of_mass(mask[sl] == v)) + [s.start for s in sl]
    return out


def evaluate_masks(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float],
    affine: np.ndarray | None = None,
    labels: Sequence[int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per-vertebra metrics of one prediction against its reference, both on the same grid.

    Args:
        pred, truth: project label values, same shape.
        spacing: voxel size per array axis (mm), for centroid distances (unused when ``affine`` is given).
        affine: index -> LPS (mm); centroid distances are then measured in patient space.
        labels: values to score (default: every named vertebra present in either mask).

    Returns:
        {name: {dice, truth_voxels, pred_voxels, identified, nearest_reference, centroid_distance_mm,
        centroid_voxel}}; dice is None when the vertebra is in neither mask, identified None when it is not in the
        reference.
    """
    from cspine.metrics import dice

    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {truth.shape}")
    if labels is None:
        present = set(np.unique(truth).tolist()) | set(np.unique(pred).tolist())
        labels = sorted(v for v in present if v in VERTEBRA_NAMES)
    if affine is not None:
        lin, off = affine[:3, :3], affine[:3, 3]
    else:
        lin, off = np.diag(np.asarray(spacing, dtype=np.float64)), np.zeros(3)

    def to_mm(c: np.ndarray) -> np.ndarray:
        return lin @ c + off

    truth_c = {v: to_mm(c) for v, c in _centroids(truth, sorted(VERTEBRA_NAMES)).items()}
    pred_c = _centroids(pred, list(labels))
    out: dict[str, dict[str, Any]] = {}
    for v in labels:
        p_n = int(np.count_nonzero(pred == v)) if v in pred_c else 0
        t_n = int(np.count_nonzero(truth == v)) if v in truth_c else 0
        rec: dict[str, Any] = {
            "dice": None if p_n + t_n == 0 else float(dice(pred, truth, v)),
            "truth_voxels": t_n,
            "pred_voxels": p_n,
            "identified": None,
            "nearest_reference": None,
            "centroid_distance_mm": None,
            "centroid_voxel": None,
        }
        if t_n:
            rec["identified"] = False
        if v in pred_c:
            c_mm = to_mm(pred_c[v])
            idx = tuple(int(np.clip(round(float(c)), 0, n - 1)) for c, n in zip(pred_c[v], truth.shape, strict=True))
            hit = int(truth[idx])
            rec["centroid_voxel"] = vertebra_name(hit) if hit else "background"
            if truth_c:
                dist = {u: float(np.linalg.norm(c_mm - c)) for u, c in truth_c.items()}
                nearest = min(dist, key=lambda u: dist[u])
                rec["nearest_reference"] = f"{vertebra_name(nearest)} ({dist[nearest]:.1f} mm)"
                if t_n:
                    rec["centroid_distance_mm"] = round(dist[v], 2)
                    rec["identified"] = nearest == v and dist[v] <= ID_RADIUS_MM
        out[vertebra_name(v)] = rec
    return out


def summarize(cases: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Aggregate per-case metrics: per vertebra mean/min Dice and identification rate; overall figures.

    ``mean_dice`` averages every (study, vertebra) pair where the vertebra is in the reference or the prediction;
    ``identification_rate`` is identified / present in the reference.
    """
    names: list[str] = []
    for per in cases.values():
        names += [n for n in per if n not in names]
    order = {name: v for v, name in VERTEBRA_NAMES.items()}
    names.sort(key=lambda n: order.get(n, 999))
    per_vertebra: dict[str, dict[str, Any]] = {}
    all_dice: list[float] = []
    hits = total = 0
    for n in names:
        d = [per[n]["dice"] for per in cases.values() if n in per and per[n]["dice"] is not None]
        ids = [per[n]["identified"] for per in cases.values() if n in per and per[n]["identified"] is not None]
        dist = [
            per[n]["centroid_distance_mm"]
            for per in cases.values()
            if per.get(n, {}).get("centroid_distance_mm") is not None
        ]
        per_vertebra[n] = {
            "dice_mean": round(float(np.mean(d)), 4) if d else None,
            "dice_min": round(float(np.min(d)), 4) if d else None,
            "studies": len(d),
            "identified": int(sum(ids)),
            "in_reference": len(ids),
            "identification_rate": round(sum(ids) / len(ids), 4) if ids else None,
            "centroid_distance_mm_mean": round(float(np.mean(dist)), 2) if dist else None,
        }
        all_dice += d
        hits += int(sum(ids))
        total += len(ids)
    return {
        "studies": len(cases),
        "mean_dice": round(float(np.mean(all_dice)), 4) if all_dice else None,
        "identification_rate": round(hits / total, 4) if total else None,
        "identified": hits,
        "in_reference": total,
        "per_vertebra": per_vertebra,
    }


def markdown_table(summary: dict[str, Any]) -> str:
    """The summary as a markdown table (one row per vertebra, then all)."""
    lines = [
        "| vertebra | Dice mean | Dice min | identified | centroid error (mm) |",
        "|---|---|---|---|---|",
    ]

    def f(x: Any, fmt: str = "{:.3f}") -> str:
        return "-" if x is None else fmt.format(x)

    for n, r in summary["per_vertebra"].items():
        lines.append(
            f"| {n} | {f(r['dice_mean'])} | {f(r['dice_min'])} | {r['identified']}/{r['in_reference']} | "
            f"{f(r['centroid_distance_mm_mean'], '{:.1f}')} |"
        )
    rate = summary["identification_rate"]
    pct = f(None if rate is None else 100 * rate, "{:.1f}")
    lines.append(
        f"| **all** ({summary['studies']} studies) | **{f(summary['mean_dice'])}** | | "
        f"**{summary['identified']}/{summary['in_reference']}** ({pct} %) | |"
    )
    return "\n".join(lines) + "\n"


def _write(out: Path | None, summary: dict[str, Any], cases: dict[str, Any], extra: dict[str, Any]) -> None:
    if out is None:
        return
    from cspine.runtime import versions, write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval.json", {"summary": summary, "cases": cases, "versions": versions(), **extra})
    (out / "eval.md").write_text(markdown_table(summary))


def evaluate_model(
    model: str | Path,
    data: Path,
    out: Path | None = None,
    split: str = "train",
    uids: Sequence[str] | None = None,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Segment every study with a mask in ``data`` (or only ``uids``) and score it on the study's own grid.

    Writes OUT/eval.json (summary, per-study metrics, timings) and OUT/eval.md (the table) when ``out`` is given.
    """
    from cspine.seg.data import discover_studies
    from cspine.seg.infer import InferConfig, load_model, segment_volume

    seg_model = load_model(model, device)
    refs = [r for r in discover_studies(Path(data), split) if r.has_mask and (uids is None or r.uid in uids)]
    if not refs:
        raise ValueError(f"{data}: no {split} study with a mask to evaluate")
    cases: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(refs), desc="eval-seg", unit="study")
    for ref in refs:
        vol, truth = ref.load()
        assert truth is not None
        t = time.perf_counter()
        res = segment_volume(vol, seg_model, InferConfig(device=device))
        seconds[ref.uid] = round(time.perf_counter() - t, 3)
        cases[ref.uid] = evaluate_masks(res.mask, truth, vol.spacing, vol.affine, CERVICAL_VALUES)
        logging.getLogger(__name__).debug("%s: %s", ref.uid, cases[ref.uid])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    summary = summarize(cases)
    summary["seconds_per_study_mean"] = round(float(np.mean(list(seconds.values()))), 3)
    _write(out, summary, cases, {"model": str(seg_model.path), "data": str(data), "split": split, "seconds": seconds})
    return summary


def _mask_files(path: Path) -> dict[str, Path]:
    """Masks under ``path``: one file, a folder of NIfTI files (key: name), or a prepared cache (key: UID)."""
    if path.is_file():
        return {path.name.removesuffix(".gz").removesuffix(".nii"): path}
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    found = {p.name.removesuffix(".gz").removesuffix(".nii"): p for p in sorted(path.glob("*.nii*"))}
    for split_dir in (path / "train", path / "test", path):
        for p in sorted(split_dir.glob("*/mask.nii.gz")):
            found.setdefault(p.parent.name, p)
    if not found:
        raise FileNotFoundError(f"{path}: no NIfTI masks (*.nii, *.nii.gz or <uid>/mask.nii.gz)")
    return found


def evaluate_files(
    pred: Path,
    truth: Path,
    out: Path | None = None,
    pred_labels: str = "rsna",
    truth_labels: str = "rsna",
    labels: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Score existing masks against references (files or folders matched by name), e.g. real third-party masks.

    The prediction is placed on the reference's grid through both affines (exact for permutations, flips and
    crops), then both are mapped onto project values.
    """
    from cspine.io.nifti import read_nifti, resample_labels
    from cspine.io.volume import Volume, spacing_from_affine

    preds, truths = _mask_files(Path(pred)), _mask_files(Path(truth))
    if Path(pred).is_file() and Path(truth).is_file():
        pairs = [(next(iter(preds.values())), next(iter(truths.values())), next(iter(truths)))]
    else:
        common = sorted(set(preds) & set(truths))
        if not common:
            raise ValueError(f"no mask names in common between {pred} and {truth}")
        pairs = [(preds[k], truths[k], k) for k in common]
    cases: dict[str, dict[str, Any]] = {}
    for p_path, t_path, key in pairs:
        t_data, t_aff = read_nifti(t_path)
        p_data, p_aff = read_nifti(p_path)
        t_lab = to_project_labels(np.rint(np.asarray(t_data)).astype(np.int64), truth_labels)
        p_lab = to_project_labels(np.rint(np.asarray(p_data)).astype(np.int64), pred_labels)
        grid = Volume(np.zeros(t_lab.shape, dtype=np.int16), spacing_from_affine(t_aff), t_aff)
        p_on_t = resample_labels(p_lab, p_aff, grid, name=str(p_path))
        cases[key] = evaluate_masks(p_on_t, t_lab, spacing_from_affine(t_aff), t_aff, labels)
    summary = summarize(cases)
    _write(
        out,
        summary,
        cases,
        {"pred": str(pred), "truth": str(truth), "pred_labels": pred_labels, "truth_labels": truth_labels},
    )
    return summary
