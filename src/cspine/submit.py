"""`cspine submit`: test_images/ -> submission.csv, never dying for one study, resumable.

Why it is built this way: a Kaggle test set has ~1,500 studies and takes hours; a run that
dies on one corrupt study, or loses hours of work to a kill, is worse than useless. So each
finished study is appended to a journal (one JSON line, flushed) beside the output; a rerun
reads the journal and skips what is done. A study that fails gets the training prevalence as
its prediction, a warning and a line in the failures file. DICOM decoding of the next study
runs in a background thread while the model works on the current one (and the decoding itself
in child processes, so a decoder that panics or crashes fails one study, not the batch).

A journal line is reused only when it is still true: each records the model's identity (a hash
of the bundle's files) and the study's input (names, sizes and modification times of its files).
A rerun with another model or a changed study recomputes those rows, and failed rows are tried
again (a study fixed since) unless ``retry_failed`` is off. The summary says what happened.
"""

from __future__ import annotations

import hashlib
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
    """Where the test set and the model are, where the submission goes; whether failed studies are retried."""

    data: Path
    model: Path
    out: Path
    device: str = "auto"
    split: str = "test"
    retry_failed: bool = True


def model_identity(model: Path) -> str:
    """sha256 over the bundle's files (relative names and contents): the same bytes, the same answers."""
    h = hashlib.sha256()
    root = Path(model)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for f in files:
        name = f.relative_to(root) if f != root else Path(f.name)
        if f != root and any(part.startswith(".") for part in name.parts):
            continue  # temporary files of an interrupted write
        h.update(str(name).encode("utf-8", "surrogateescape") + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def input_identity(study: Path) -> str:
    """Names, sizes and modification times of a study's files, hashed: a study changed since is read again."""
    h = hashlib.sha256()
    try:
        files = sorted(p for p in study.rglob("*") if p.is_file()) if study.is_dir() else [study]
        for f in files:
            st = f.stat()
            name = str(f.relative_to(study) if f != study else f.name)
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    except OSError:
        return "unreadable"
    return h.hexdigest()[:16]


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


#: Why a journal row is computed again on a rerun.
_RECOMPUTE_REASONS = ("model_changed", "input_changed", "retry_failed")


def _reusable(rec: dict[str, Any] | None, model_id: str, input_id: str, retry_failed: bool) -> str:
    """Why a journal line is (not) reused: 'reuse', or the reason it is recomputed."""
    if rec is None:
        return "new"
    if rec.get("model") != model_id:
        return "model_changed"
    if rec.get("input") != input_id:
        return "input_changed"
    if "error" in rec and retry_failed:
        return "retry_failed"
    return "reuse"


def submit(cfg: SubmitConfig, progress: bool = False) -> dict[str, Any]:
    """Predict every study of test.csv and write the submission in test.csv's row order.

    Returns a summary: studies predicted now, reused from the journal, recomputed (and why), failed; seconds;
    output paths.
    """
    from tqdm import tqdm

    from cspine.bundle import load_bundle
    from cspine.io import load_series

    ds = RsnaDataset(cfg.data)
    rows = ds.test_rows()
    uids = list(dict.fromkeys(r["StudyInstanceUID"] for r in rows))
    bundle = load_bundle(cfg.model, device=cfg.device)  # a broken bundle fails here, before any work
    model_id = model_identity(cfg.model)
    journal = _journal_path(cfg.out)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    done = _read_journal(journal)
    input_ids = {uid: input_identity(ds.study_dir(cfg.split, uid)) for uid in uids}
    reasons = {uid: _reusable(done.get(uid), model_id, input_ids[uid], cfg.retry_failed) for uid in uids}
    todo = [u for u in uids if reasons[u] != "reuse"]
    for why in _RECOMPUTE_REASONS:
        n = sum(reasons[u] == why for u in todo)
        if n:
            log.info("recomputing %d journal row(s): %s", n, why.replace("_", " "))
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
            rec: dict[str, Any] = {"uid": uid, "model": model_id, "input": input_ids[uid]}
            try:
                vol = fut.result()
                out = bundle.predict(vol)
                probs = out.probabilities
                rec["pred"] = {k: None if probs[k] is None else float(probs[k]) for k in PREDICTION_TYPES}
                absent = [k for k in PREDICTION_TYPES if probs[k] is None]
                if out.not_assessed:  # a scan outside the classifier's domain: every row the prevalence, and why
                    rec["not_assessed"] = out.not_assessed
                elif absent:  # not in the field of view: the row gets the prevalence, recorded as such
                    rec["not_in_view"] = absent
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # one bad study never stops the batch (native panics included)
                n_failed += 1
                first = (str(exc).strip().splitlines() or [""])[0]
                rec["error"] = f"{type(exc).__name__}: {first}"
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
        value = pred.get(r["prediction_type"]) if pred else None
        if value is None:
            value = PREVALENCE[r["prediction_type"]]
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
        "failed_now": n_failed,
        "reused_from_journal": len(uids) - len(todo),
        "recomputed": {why: sum(reasons[u] == why for u in todo) for why in _RECOMPUTE_REASONS},
        "failed": len(failures),
        "rows": len(out_rows),
        # rows whose vertebra (or whole cervical spine) the model found no trace of: written as the prevalence
        "rows_not_in_view": sum(len(done.get(u, {}).get("not_in_view", [])) for u in uids),
        "studies_without_cervical_spine": sum(
            len(done.get(u, {}).get("not_in_view", [])) == len(PREDICTION_TYPES) for u in uids
        ),
        # studies coarser than the classifier learned from (cspine.cls.domain): every row the prevalence
        "studies_not_assessed": sum("not_assessed" in done.get(u, {}) for u in uids),
        "model_id": model_id,
        "seconds": round(seconds, 2),
        "studies_per_min": round(60 * n_new / seconds, 2) if seconds > 0 and n_new else None,
        "submission": str(cfg.out),
        "failures_file": str(_failures_path(cfg.out)),
    }
    return summary
