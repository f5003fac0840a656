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
from typing import TYPE_CHECKING, Any

from cspine.labels import CERVICAL

if TYPE_CHECKING:
    from cspine.seg.infer import SegModel
    from cspine.seg.studies import StudyRef

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
        workers: studies segmented at once, each in its own process with its share of the torch threads (the
            segmenter's pre- and post-processing run on one core; two processes keep both busy).
    """

    data: Path
    model: Path
    out: Path
    split: str = "train"
    all_studies: bool = False
    uids: tuple[str, ...] | None = None
    device: str = "auto"
    volume_ml: tuple[float, float] = (1.0, 40.0)
    workers: int = 1


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


def label_study(ref: StudyRef, model: SegModel, cfg: PseudoLabelConfig) -> str | None:
    """Segment one study and write its mask, then its quality record (atomically, mask first); the error message
    instead of raising, so that one unreadable study does not stop the batch."""
    from cspine.io import save_nifti
    from cspine.runtime import write_json
    from cspine.seg.infer import InferConfig, segment_volume

    out = Path(cfg.out)
    t = time.perf_counter()
    try:
        vol, _ = ref.load(with_mask=False)
        res = segment_volume(vol, model, InferConfig(device=cfg.device, presence=None))
        save_nifti(res.mask, vol, out / f"{ref.uid}.nii.gz")
        report = res.to_json()
        record = {"uid": ref.uid, "source": str(ref.path), "model": str(model.path), **judge(report, cfg)}
        record.update(report)
        record["seconds"] = round(time.perf_counter() - t, 3)
        write_json(out / f"{ref.uid}.json", record)
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


_worker_model: SegModel | None = None  # the segmenter of a pseudo-label worker process


def _init_worker(model: Path, device: str, threads: int) -> None:
    import torch

    from cspine.seg.infer import load_model

    global _worker_model
    torch.set_num_threads(threads)
    _worker_model = load_model(model, device)


def _label_in_worker(job: tuple[StudyRef, PseudoLabelConfig]) -> tuple[str, str | None]:
    ref, cfg = job
    assert _worker_model is not None, "_init_worker did not run"
    return ref.uid, label_study(ref, _worker_model, cfg)


def pseudo_label(cfg: PseudoLabelConfig, progress: bool = False) -> dict[str, Any]:
    """Segment every study without a mask (all with ``all_studies``); skip those already done. Returns counts."""
    import torch

    from cspine.data.rsna import write_csv_atomic
    from cspine.engine.config import to_dict
    from cspine.process_pool import run_in_processes
    from cspine.runtime import run_record, write_json
    from cspine.seg.data import discover_studies
    from cspine.seg.infer import load_model, resolve_model_dir

    t0 = time.perf_counter()
    refs = [r for r in discover_studies(Path(cfg.data), cfg.split) if cfg.all_studies or not r.has_mask]
    if cfg.uids is not None:
        refs = [r for r in refs if r.uid in set(cfg.uids)]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    failures_path = out / "failures.json"
    failures: dict[str, str] = json.loads(failures_path.read_text()) if failures_path.exists() else {}
    todo = [r for r in refs if not ((out / f"{r.uid}.json").exists() and (out / f"{r.uid}.nii.gz").exists())]
    skipped = len(refs) - len(todo)
    done = failed = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(refs), initial=skipped, desc="pseudo-label", unit="study")

    def record(result: tuple[str, str | None]) -> None:
        nonlocal done, failed
        uid, err = result
        if err is None:
            failures.pop(uid, None)
            done += 1
        else:  # one unreadable study must not stop the batch
            failed += 1
            failures[uid] = err
            log.warning("pseudo-label %s failed: %s", uid, err)
            write_json(failures_path, failures)
        if bar is not None:
            bar.update(1)

    workers = max(1, min(cfg.workers, len(todo)))
    if workers == 1:
        model = load_model(cfg.model, cfg.device)
        for ref in todo:
            record((ref.uid, label_study(ref, model, cfg)))
    else:
        threads = max(1, torch.get_num_threads() // workers)
        died = "the process segmenting this study died (a crash in a native library, or out of memory)"
        run_in_processes(
            _label_in_worker,
            [(ref, cfg) for ref in todo],
            workers,
            record,
            lambda job: record((job[0].uid, died)),
            initializer=_init_worker,
            initargs=(cfg.model, cfg.device, threads),
            start_method="spawn",  # this process's torch threads make a forked child unsafe
        )
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
    timings = {"total": time.perf_counter() - t0}
    model = str(resolve_model_dir(cfg.model))
    write_json(out / "run.json", run_record(None, to_dict(cfg), timings, model=model, **summary))
    return summary
