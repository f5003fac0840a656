"""The synthetic dataset on disk: :func:`generate_dataset` writes the RSNA layout for a :class:`SynthConfig`.

Why: the real data (350 GB, behind a licence) cannot be reached from CI or a first try of the tool, so cspine ships a
generator whose output a reader cannot tell apart from the RSNA download in layout and file format, with anatomy
and fractures that a model has to learn from shape, not from a global shortcut.

Example::

    from pathlib import Path
    from cspine.synth import SynthConfig, generate_dataset
    summary = generate_dataset(SynthConfig(out=Path("synth"), studies=20))
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cspine.data.rsna import BOX_COLUMNS, MASK_SUFFIXES, SEGMENTATIONS_DIR, images_dirname
from cspine.labels import PATIENT
from cspine.synth.config import Profile, Size, SynthConfig
from cspine.synth.sampling import Split
from cspine.synth.study import generate_study, study_uid
from cspine.synth.writer import nifti_bytes, write_atomic, write_series, write_tables

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`generate_dataset` wrote (also saved in ``synth.json``)."""

    out: str
    train_studies: int
    test_studies: int
    positives: int
    segmented: int
    box_studies: int
    boxes: int
    slices: int
    bytes: int
    seconds: float
    transfer_syntaxes: dict[str, int]


@dataclass(frozen=True)
class _Job:
    seed: int
    size: Size
    split: Split
    index: int
    folder: str
    nifti: str | None
    patient_number: int
    profile: Profile = "default"


def _write_one(job: _Job) -> dict[str, Any]:
    """Worker: generate one study and write its series (and mask); returns the rows the CSVs need."""
    t0 = time.perf_counter()
    study = generate_study(job.seed, job.size, job.index, job.split, job.profile)
    t1 = time.perf_counter()
    nbytes = write_series(study, Path(job.folder), job.patient_number)
    if job.nifti:
        nbytes += write_atomic(Path(job.nifti), nifti_bytes(study))
    return {
        "uid": study.uid,
        "split": job.split,
        "index": job.index,
        "labels": study.labels,
        "boxes": [{k: b[k] for k in BOX_COLUMNS[1:]} for b in study.boxes] if study.has_boxes else [],
        "fractures": study.fractures,
        "segmented": job.nifti is not None,
        "slices": int(study.volume.shape[0]),
        "shape": list(study.volume.shape),
        "transfer_syntax": study.transfer_syntax,
        "storage": study.storage,
        "top_first": study.top_first,
        **study.extra,  # the wide profile's field of view and scanner (none for the default profile)
        "bytes": nbytes,
        "seconds_generate": round(t1 - t0, 3),
        "seconds_write": round(time.perf_counter() - t1, 3),
    }


def segmented_indices(cfg: SynthConfig) -> set[int]:
    """Which training studies get a NIfTI mask: exactly round(segmented * studies), chosen by the seed."""
    n = round(cfg.segmented * cfg.studies)
    perm = np.random.default_rng([cfg.seed, 7]).permutation(cfg.studies)
    return {int(i) for i in perm[:n]}


def _run(jobs: list[_Job], workers: int, progress: bool) -> Iterator[dict[str, Any]]:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), unit="study", desc="cspine synth")
    try:
        if workers <= 1 or len(jobs) <= 1:
            for j in jobs:
                yield _write_one(j)
                if bar is not None:
                    bar.update()
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
                for r in pool.map(_write_one, jobs):
                    yield r
                    if bar is not None:
                        bar.update()
    finally:
        if bar is not None:
            bar.close()


def generate_dataset(cfg: SynthConfig, progress: bool = True) -> SynthSummary:
    """Write the RSNA layout under ``cfg.out`` and return a summary.

    Layout: train.csv, train_bounding_boxes.csv, test.csv, sample_submission.csv, train_images/<uid>/<n>.dcm,
    test_images/<uid>/<n>.dcm, segmentations/<uid>.nii, plus ``synth.json`` (config, versions, per-study facts
    including the hidden test labels, for evaluation). Every file is written atomically; rerunning with the same
    config rewrites byte-identical files.
    """
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    seg = segmented_indices(cfg)
    jobs: list[_Job] = []
    for i in range(cfg.studies):
        uid = study_uid(cfg.seed, i, "train")
        jobs.append(
            _Job(
                cfg.seed,
                cfg.size,
                "train",
                i,
                str(out / images_dirname("train") / uid),
                str(out / SEGMENTATIONS_DIR / f"{uid}{MASK_SUFFIXES[0]}") if i in seg else None,
                i + 1,
                cfg.profile,
            )
        )
    for i in range(cfg.test_studies):
        uid = study_uid(cfg.seed, i, "test")
        folder = str(out / images_dirname("test") / uid)
        jobs.append(_Job(cfg.seed, cfg.size, "test", i, folder, None, 100_000 + i + 1, cfg.profile))
    for split in ("train", "test"):
        (out / images_dirname(split)).mkdir(exist_ok=True)
    if seg:
        (out / SEGMENTATIONS_DIR).mkdir(exist_ok=True)
    results = list(_run(jobs, cfg.workers, progress))
    train = [r for r in results if r["split"] == "train"]
    test = [r for r in results if r["split"] == "test"]

    nbytes = sum(r["bytes"] for r in results)
    nbytes += write_tables(out, [(r["uid"], r["labels"], r["boxes"]) for r in train], [r["uid"] for r in test])

    syntaxes: dict[str, int] = {}
    for r in results:
        syntaxes[r["transfer_syntax"]] = syntaxes.get(r["transfer_syntax"], 0) + 1
    summary = SynthSummary(
        out=str(out),
        train_studies=len(train),
        test_studies=len(test),
        positives=sum(r["labels"][PATIENT] for r in train),
        segmented=sum(r["segmented"] for r in train),
        box_studies=sum(bool(r["boxes"]) for r in train),
        boxes=sum(len(r["boxes"]) for r in train),
        slices=sum(r["slices"] for r in results),
        bytes=nbytes,
        seconds=round(time.perf_counter() - t0, 2),
        transfer_syntaxes=syntaxes,
    )
    record = {
        "config": _config_record(cfg),
        "versions": _versions(),
        "summary": asdict(summary),
        "studies": [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in results],
        "timings": {r["uid"]: {"generate": r["seconds_generate"], "write": r["seconds_write"]} for r in results},
    }
    write_atomic(out / "synth.json", json.dumps(record, indent=1).encode())
    log.info(
        "synth: %d train + %d test studies, %.1f MB in %.1f s", len(train), len(test), nbytes / 1e6, summary.seconds
    )
    return summary


def _config_record(cfg: SynthConfig) -> dict[str, Any]:
    """The config as saved in synth.json; the default profile is left implicit, so that its synth.json keeps the
    bytes it had before profiles existed."""
    rec = {**asdict(cfg), "out": str(cfg.out)}
    if cfg.profile == "default":
        del rec["profile"]
    return rec


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("cspine", "numpy", "scipy", "pydicom", "python-gdcm", "pylibjpeg", "nibabel"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "missing"
    return out
