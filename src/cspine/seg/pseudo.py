"""Pseudo-labels: vertebra masks for every study that has none, with a quality record per study.

Only 87 of the 2,019 RSNA training studies have masks, but the fracture classifier needs a crop per vertebra in
every study. This runs the segmenter over the rest, resumably (a study is done when its record exists; masks and
records are written atomically, mask first), and judges each result so that bad ones can be excluded.

OUT layout::

    OUT/<uid>.nii.gz        mask on the study's grid (1..7 = C1..C7, 255 = other vertebrae); opens in 3D Slicer
    OUT/<uid>.json          quality record: found, missing, cut off, volumes, warnings, ok + reasons
    OUT/quality.csv         one row per study (ok, reasons, volumes), rewritten at the end of every run
    OUT/failures.json       studies that could not be read or segmented, with the error
    OUT/run.json            run record (versions, config, counts, timings)
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cspine.labels import CERVICAL

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PseudoLabelConfig:
    """What ``cspine pseudo-label`` does.

    Attributes:
        data: prepared cache or RSNA-layout folder.
        model: segmentation model directory (or a bundle with ``seg/``).
        out: output folder (see module docstring).
        all_studies: also label studies that already have a mask (e.g. to measure agreement).
        uids: only these studies (e.g. the fold a segmenter held out); None: every study of the split.
        volume_ml: plausible (min, max) volume of a complete cervical vertebra; outside is flagged.
    """

    data: Path
    model: Path
    out: Path
    split: str = "train"
    all_studies: bool = False
    uids: tuple[str, ...] | None = None
    device: str = "auto"
    volume_ml: tuple[float, float] = (1.0, 40.0)


def judge(report: dict[str, Any], cfg: PseudoLabelConfig) -> dict[str, Any]:
    """Quality verdict of one segmentation report: ok unless a vertebra is missing, implausible, or was reordered."""
    verts = report["vertebrae"]
    reasons = []
    missing = [n for n in CERVICAL if not verts[n]["present"]]
    cut = [n for n in CERVICAL if verts[n].get("cut_off")]
    if missing:
        reasons.append(f"missing {', '.join(missing)}")
    lo, hi = cfg.volume_ml
    for n in CERVICAL:
        v = verts[n]
        if v["present"] and not v["cut_off"] and not lo <= v["volume_ml"] <= hi:
            reasons.append(f"{n} volume {v['volume_ml']:.1f} ml outside {lo:g}-{hi:g} ml")
    if any("out of cranio-caudal order" in w for w in report["warnings"]):
        reasons.append("labels were reordered")
    return {
        "ok": not reasons,
        "reasons": reasons,
        "found": [n for n in CERVICAL if verts[n]["present"]],
        "missing": missing,
        "cut_off": cut,
        "volumes_ml": {n: verts[n]["volume_ml"] for n in CERVICAL},
    }


def pseudo_label(cfg: PseudoLabelConfig, progress: bool = False) -> dict[str, Any]:
    """Segment every study without a mask (all with ``all_studies``); skip those already done. Returns counts."""
    from cspine.data.rsna import write_csv_atomic
    from cspine.engine.config import to_dict
    from cspine.io import save_nifti
    from cspine.runtime import run_record, write_json
    from cspine.seg.data import discover_studies
    from cspine.seg.infer import InferConfig, load_model, segment_volume

    t0 = time.perf_counter()
    refs = [r for r in discover_studies(Path(cfg.data), cfg.split) if cfg.all_studies or not r.has_mask]
    if cfg.uids is not None:
        refs = [r for r in refs if r.uid in set(cfg.uids)]
    model = load_model(cfg.model, cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    failures_path = out / "failures.json"
    failures: dict[str, str] = json.loads(failures_path.read_text()) if failures_path.exists() else {}
    done = skipped = failed = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(refs), desc="pseudo-label", unit="study")
    for ref in refs:
        record_path = out / f"{ref.uid}.json"
        if record_path.exists() and (out / f"{ref.uid}.nii.gz").exists():
            skipped += 1
        else:
            t = time.perf_counter()
            try:
                vol, _ = ref.load(with_mask=False)
                res = segment_volume(vol, model, InferConfig(device=cfg.device, presence=None))
                save_nifti(res.mask, vol, out / f"{ref.uid}.nii.gz")
                report = res.to_json()
                record = {"uid": ref.uid, "source": str(ref.path), "model": str(model.path), **judge(report, cfg)}
                record.update(report)
                record["seconds"] = round(time.perf_counter() - t, 3)
                write_json(record_path, record)
                failures.pop(ref.uid, None)
                done += 1
            except Exception as exc:  # one unreadable study must not stop the batch
                failed += 1
                failures[ref.uid] = f"{type(exc).__name__}: {exc}"
                log.warning("pseudo-label %s failed: %s", ref.uid, failures[ref.uid])
                write_json(failures_path, failures)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    write_json(failures_path, failures)
    rows = []
    n_ok = 0
    for ref in refs:
        path = out / f"{ref.uid}.json"
        if not path.exists():
            continue
        rec = json.loads(path.read_text())
        n_ok += bool(rec["ok"])
        rows.append([ref.uid, int(rec["ok"]), "; ".join(rec["reasons"]), *(rec["volumes_ml"][n] for n in CERVICAL)])
    write_csv_atomic(out / "quality.csv", ["uid", "ok", "reasons", *[f"{n}_ml" for n in CERVICAL]], rows)
    summary = {
        "studies": len(refs),
        "labelled_now": done,
        "skipped_existing": skipped,
        "failed": failed,
        "ok": n_ok,
        "flagged": len(rows) - n_ok,
    }
    cfg_dict = to_dict(cfg)
    write_json(
        out / "run.json",
        run_record(None, cfg_dict, {"total": time.perf_counter() - t0}, model=str(model.path), **summary),
    )
    return summary
