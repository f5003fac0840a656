"""`cspine pacs`: studies from a PACS over DICOMweb in, SEG + SR (+ key objects) back into the same PACS.

For each study (given by StudyInstanceUID, or every study a QIDO-RS query matches): find its CT series (QIDO-RS),
retrieve them (WADO-RS) into a temporary folder, predict as ``cspine predict --dicom`` does, and store the DICOM
outputs back (STOW-RS). The retrieved images are deleted when the study is done; the result folder
OUT/<StudyInstanceUID>/ keeps result.json, the mask, the report and the DICOM outputs.

A batch never dies for one study: each finished or failed study is one line of OUT/pacs_journal.jsonl, and a rerun
skips the studies it lists as done (resumable). Bad cases are one line each: the server is down, the study is not
there, the study has no CT series.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cspine.errors import CspineInputError
from cspine.submit import _append, _read_journal

log = logging.getLogger(__name__)

JOURNAL = "pacs_journal.jsonl"
#: DICOM tags by keyword, as QIDO-RS returns them (DICOM JSON keys are hex tags).
_TAG = {"StudyInstanceUID": "0020000D", "SeriesInstanceUID": "0020000E", "Modality": "00080060"}


class PacsError(CspineInputError):
    """The PACS cannot give what was asked (down, study missing, no CT series); the message says which."""


@dataclass(frozen=True)
class PacsConfig:
    """Where the PACS is, which studies, which model, where the result folders go."""

    url: str
    model: Path
    out: Path
    studies: tuple[str, ...] = ()
    query: Mapping[str, str] = field(default_factory=dict)
    store: bool = True
    device: str = "auto"
    threshold: float = 0.5
    limit: int | None = None
    timeout: float = 60.0


def _value(item: Mapping[str, Any], keyword: str) -> str | None:
    values = item.get(_TAG[keyword], {}).get("Value") or []
    return str(values[0]) if values else None


class Pacs:
    """A DICOMweb endpoint with the few calls cspine makes, each turning transport failures into one line."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        from dicomweb_client.api import DICOMwebClient

        self.url = url.rstrip("/")
        self.client = DICOMwebClient(self.url, timeout=timeout)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import requests

        try:
            return fn(*args, **kwargs)
        except requests.exceptions.ConnectionError as exc:
            raise PacsError(f"{self.url}: PACS not reachable ({what}); is the server running, the URL right?") from exc
        except requests.exceptions.Timeout as exc:
            raise PacsError(f"{self.url}: PACS timed out ({what})") from exc
        except requests.exceptions.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else "?"
            raise PacsError(f"{self.url}: PACS answered HTTP {code} to {what}") from exc

    def ping(self) -> None:
        """One cheap query, so that a server that is down or a wrong URL is said at once (no retries with back-off,
        which later calls keep for busy servers) and before any model loads."""
        self.client.set_http_retry_params(retry=False)
        try:
            self._call("a first query", self.client.search_for_studies, limit=1)
        finally:
            self.client.set_http_retry_params()

    def find_studies(self, query: Mapping[str, str], limit: int | None = None, page: int = 100) -> list[str]:
        """StudyInstanceUIDs of the studies a QIDO-RS query matches (e.g. ModalitiesInStudy=CT), page by page.

        Paging stops at a short page or at a page that brings nothing new (a server ignoring ``offset``).
        """
        uids: list[str] = []
        while limit is None or len(uids) < limit:
            found = self._call("a study query", self.client.search_for_studies, search_filters=dict(query),
                               limit=page, offset=len(uids))  # fmt: skip
            new = [u for u in (_value(s, "StudyInstanceUID") for s in found) if u and u not in uids]
            uids.extend(new)
            if len(found) < page or not new:
                break
        return uids[:limit] if limit else uids

    def ct_series(self, study_uid: str) -> list[str]:
        """The CT series of a study. Raises PacsError when the study is not there or holds no CT series."""
        series = self._call(f"the series query of study {study_uid}", self.client.search_for_series,
                            study_instance_uid=study_uid)
        if not series:
            raise PacsError(f"{self.url}: study {study_uid} not found")
        ct = [_value(s, "SeriesInstanceUID") for s in series if _value(s, "Modality") == "CT"]
        if not ct:
            modalities = sorted({_value(s, "Modality") or "?" for s in series})
            raise PacsError(f"{self.url}: study {study_uid} has no CT series (modalities: {', '.join(modalities)})")
        return [u for u in ct if u]

    def retrieve(self, study_uid: str, series_uids: Sequence[str], folder: Path) -> int:
        """Write every instance of the series into ``folder``; returns how many."""
        n = 0
        for series_uid in series_uids:
            for ds in self._call(f"the retrieval of series {series_uid}", self.client.retrieve_series,
                                 study_uid, series_uid):
                ds.save_as(folder / f"{n:06d}.dcm", enforce_file_format=True)
                n += 1
        return n

    def store(self, files: Sequence[Path]) -> None:
        """STOW-RS the given DICOM files."""
        import pydicom

        datasets = [pydicom.dcmread(f) for f in files]
        self._call("storing the results", self.client.store_instances, datasets)


def process_study(pacs: Pacs, uid: str, cfg: PacsConfig, bundle: Any) -> dict[str, Any]:
    """Retrieve, predict and (optionally) store back one study; returns its journal record."""
    from cspine.predict import PredictConfig, predict_study

    t0 = time.perf_counter()
    series = pacs.ct_series(uid)
    out = cfg.out / uid
    with tempfile.TemporaryDirectory(prefix="cspine-pacs-") as tmp:
        n = pacs.retrieve(uid, series, Path(tmp))
        pcfg = PredictConfig(study=Path(tmp), model=cfg.model, out=out, device=cfg.device,
                             threshold=cfg.threshold, dicom=True)
        result = predict_study(pcfg, bundle=bundle)
    dicom = result.get("dicom", {})
    if cfg.store:
        pacs.store([Path(p) for p in dicom.values()])
    return {"uid": uid, "status": "done", "instances": n, "stored": sorted(dicom) if cfg.store else [],
            "patient_overall": result.get("patient_overall"), "seconds": round(time.perf_counter() - t0, 2)}


def run_pacs(cfg: PacsConfig, progress: bool = False) -> dict[str, Any]:
    """Run on the given studies or on every study the query matches; see the module docstring.

    With one study given by UID, its failure is raised (one clear line at the CLI); in a batch, failures are
    recorded in the journal and the batch goes on.
    """
    from tqdm import tqdm

    from cspine.bundle import load_bundle

    if bool(cfg.studies) == bool(cfg.query):
        raise CspineInputError("give either study UIDs or a query (e.g. ModalitiesInStudy=CT), not both or neither")
    pacs = Pacs(cfg.url, timeout=cfg.timeout)
    pacs.ping()
    uids = list(cfg.studies) if cfg.studies else pacs.find_studies(cfg.query, cfg.limit)
    cfg.out.mkdir(parents=True, exist_ok=True)
    journal = cfg.out / JOURNAL
    done = {u for u, rec in _read_journal(journal).items() if rec.get("status") == "done"}
    todo = [u for u in uids if u not in done]
    single = len(cfg.studies) == 1
    bundle = load_bundle(cfg.model, device=cfg.device) if todo else None
    failed: list[dict[str, Any]] = []
    bar = tqdm(total=len(uids), initial=len(uids) - len(todo), desc="pacs", unit="study", disable=not progress)
    for uid in todo:
        try:
            rec = process_study(pacs, uid, cfg, bundle)
        except Exception as exc:  # one bad study never stops the batch
            if single:
                raise
            rec = {"uid": uid, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
            failed.append(rec)
            log.warning("study %s failed: %s", uid, rec["error"])
        _append(journal, rec)
        bar.update(1)
    bar.close()
    return {"studies": len(uids), "done_before": len(uids) - len(todo), "processed": len(todo) - len(failed),
            "failed": failed, "journal": str(journal), "out": str(cfg.out)}
