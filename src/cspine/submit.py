"""`cspine submit`: test_images/ -> submission.csv, never dying for one study, resumable.

Why it is built this way: a Kaggle test set has ~1,500 studies and takes hours; a run that
dies on one corrupt study, or loses hours of work to a kill, is worse than useless. So each
finished study is appended to a journal (one JSON line, flushed) beside the output; a rerun
reads the journal and skips what is done. A study that fails gets the training prevalence as
its prediction, a warning and a line in the failures file. DICOM decoding of the next study
runs in a background thread while the model works on the current one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cspine.data.rsna import RsnaDataset, write_csv_atomic
from cspine.labels import PREDICTION_TYPES, PREVALENCE
from cspine.runtime import write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubmitConfig:
    """Where the test set and the model are, where the submission goes."""

    data: Path
    model: Path
    out: Path
    device: str = "auto"
    split: str = "test"


def _journal_path(out: Path) -> Path:
    return out.with_name(out.name + ".journal.jsonl")


def _failures_path(out: Path) -> Path:
    return out.with_name(out.stem + ".failures.json")


def _read_journal(path: Path) -> dict[str, dict[str, Any]]:
    """Finished studies of an earlier run; a torn last line (killed mid-write) is ignored."""
    done: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        done[rec["uid"]] = rec
    return done


def _append(path: Path, rec: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def submit(cfg: SubmitConfig, progress: bool = False) -> dict[str, Any]:
    """Predict every study of test.csv and write the submission in test.csv's row order.

    Returns a summary: studies predicted, reused from the journal, failed; seconds; output paths.
    """
    from tqdm import tqdm

    from cspine.bundle import load_bundle
    from cspine.io import load_series

    ds = RsnaDataset(cfg.data)
    rows = ds.test_rows()
    uids = list(dict.fromkeys(r["StudyInstanceUID"] for r in rows))
    bundle = load_bundle(cfg.model, device=cfg.device)  # a broken bundle fails here, before any work
    journal = _journal_path(cfg.out)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    done = _read_journal(journal)
    todo = [u for u in uids if u not in done]
    t0 = time.perf_counter()
    n_new = n_failed = 0

    def load(uid: str) -> Any:
        return load_series(ds.study_dir(cfg.split, uid))

    bar = tqdm(total=len(uids), initial=len(uids) - len(todo), desc="submit", unit="study", disable=not progress)
    with ThreadPoolExecutor(max_workers=1) as prefetch:
        nxt: Future[Any] | None = prefetch.submit(load, todo[0]) if todo else None
        for i, uid in enumerate(todo):
            assert nxt is not None
            fut = nxt
            nxt = prefetch.submit(load, todo[i + 1]) if i + 1 < len(todo) else None
            rec: dict[str, Any] = {"uid": uid}
            try:
                vol = fut.result()
                probs = bundle.predict_probabilities(vol)
                rec["pred"] = {k: float(probs[k]) for k in PREDICTION_TYPES}
            except Exception as exc:  # one bad study never stops the batch
                n_failed += 1
                rec["error"] = f"{type(exc).__name__}: {exc}"
                log.warning("study %s failed, using prevalence fallback: %s", uid, rec["error"])
            _append(journal, rec)
            done[uid] = rec
            n_new += 1
            bar.update(1)
            elapsed = time.perf_counter() - t0
            bar.set_postfix(per_min=f"{60 * n_new / max(elapsed, 1e-9):.1f}")
    bar.close()
    out_rows: list[list[object]] = []
    failures = []
    for r in rows:
        rec = done.get(r["StudyInstanceUID"], {})
        pred = rec.get("pred")
        value = pred[r["prediction_type"]] if pred else PREVALENCE[r["prediction_type"]]
        out_rows.append([r["row_id"], f"{min(1.0, max(0.0, value)):.6f}"])
    for uid in uids:
        if "error" in done.get(uid, {}):
            failures.append({"StudyInstanceUID": uid, "error": done[uid]["error"], "fallback": "training prevalence"})
    write_csv_atomic(cfg.out, ("row_id", "fractured"), out_rows)
    write_json(_failures_path(cfg.out), failures)
    seconds = time.perf_counter() - t0
    summary = {
        "studies": len(uids),
        "predicted_now": n_new - n_failed,
        "reused_from_journal": len(uids) - len(todo),
        "failed": len(failures),
        "rows": len(out_rows),
        "seconds": round(seconds, 2),
        "studies_per_min": round(60 * n_new / seconds, 2) if seconds > 0 and n_new else None,
        "submission": str(cfg.out),
        "failures_file": str(_failures_path(cfg.out)),
    }
    return summary
