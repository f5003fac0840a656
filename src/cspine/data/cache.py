"""Prepared studies: DICOM decoded once, cached as NIfTI + JSON, so training never decodes DICOM again.

Layout of a cache folder::

    CACHE/<split>/<StudyInstanceUID>/volume.nii.gz   int16 HU, opens aligned in 3D Slicer
    CACHE/<split>/<StudyInstanceUID>/mask.nii.gz     uint8 labels on the same grid (studies with a mask)
    CACHE/<split>/<StudyInstanceUID>/meta.json       exact affine, spacing, instance numbers, labels, boxes, DICOM meta
    CACHE/failures.json                              one record per study that could not be prepared
    CACHE/prepare.json                               run record: versions, config, counts, timings

A study folder appears only when complete (built under a temporary name, then renamed),
so a killed run leaves no half study behind and a rerun skips what is done.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cspine.data.rsna import RsnaDataset
from cspine.errors import CspineInputError
from cspine.io import load_segmentation, load_series
from cspine.io.nifti import read_nifti, save_nifti
from cspine.io.volume import Volume
from cspine.process_pool import run_in_processes
from cspine.runtime import versions, write_json

log = logging.getLogger(__name__)

VOLUME_FILE = "volume.nii.gz"
MASK_FILE = "mask.nii.gz"
META_FILE = "meta.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PrepareConfig:
    """What ``cspine prepare`` does: which dataset, where to, how many studies at once, which shard."""

    data: Path
    out: Path
    workers: int = 1
    shard: tuple[int, int] = (0, 1)
    splits: tuple[str, ...] = ("train", "test")


@dataclass(frozen=True)
class PreparedStudy:
    """One cached study, as training and evaluation read it."""

    uid: str
    split: str
    volume: Volume
    mask: np.ndarray | None
    labels: dict[str, int] | None = None
    boxes: list[dict[str, float]] = field(default_factory=list)


def save_prepared(
    dest: Path,
    vol: Volume,
    mask: np.ndarray | None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write one study folder atomically (temporary sibling, then rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_nifti(vol.array, vol, tmp / VOLUME_FILE)
    if mask is not None:
        save_nifti(mask.astype(np.uint8), vol, tmp / MASK_FILE)
    meta = {
        "format": FORMAT_VERSION,
        "shape_zyx": list(vol.shape),
        "spacing_zyx": list(vol.spacing),
        "affine_zyx_lps": vol.affine.tolist(),
        "instance_numbers": [int(v) for v in vol.instance_numbers],
        "dicom": vol.meta,
        **(extra or {}),
    }
    write_json(tmp / META_FILE, meta)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def load_prepared(study_dir: Path, with_volume: bool = True) -> PreparedStudy:
    """Read a cached study back (volume and mask on the same grid, exact affine from meta.json)."""
    meta_path = study_dir / META_FILE
    if not meta_path.exists():
        raise CspineInputError(f"{study_dir}: not a prepared study (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    affine = np.array(meta["affine_zyx_lps"], dtype=np.float64)
    shape = tuple(meta["shape_zyx"])
    array = np.zeros((0, 0, 0), dtype=np.int16)
    if with_volume:
        data, _ = read_nifti(study_dir / VOLUME_FILE)
        array = np.ascontiguousarray(data.transpose(2, 1, 0)).astype(np.int16, copy=False)
        if array.shape != shape:
            raise CspineInputError(f"{study_dir}: volume shape {array.shape} differs from meta {shape}")
    vol = Volume(
        array=array if with_volume else np.zeros(shape, dtype=np.int16),
        spacing=tuple(meta["spacing_zyx"]),
        affine=affine,
        instance_numbers=np.array(meta["instance_numbers"], dtype=np.int64),
        meta=meta.get("dicom", {}),
    )
    mask = None
    if (study_dir / MASK_FILE).exists():
        data, _ = read_nifti(study_dir / MASK_FILE)
        mask = np.ascontiguousarray(data.transpose(2, 1, 0)).astype(np.uint8, copy=False)
    return PreparedStudy(
        uid=study_dir.name,
        split=meta.get("split", study_dir.parent.name),
        volume=vol,
        mask=mask,
        labels=meta.get("labels"),
        boxes=meta.get("boxes", []),
    )


def prepared_studies(cache: Path, split: str = "train") -> list[Path]:
    """Completed study folders of a split in a cache, sorted by UID."""
    d = cache / split
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / META_FILE).exists())


def _prepare_one(job: tuple[str, str, str, str | None, dict[str, Any], int]) -> tuple[str, str, str | None, float]:
    """Prepare one study; never raises (returns the error message instead)."""
    split, uid, study_dir, seg_path, extra, decode_workers = job
    t0 = time.perf_counter()
    try:
        vol = load_series(study_dir, workers=decode_workers)
        mask = load_segmentation(seg_path, vol) if seg_path else None
        save_prepared(Path(extra.pop("_dest")), vol, mask, {"split": split, **extra})
        return split, uid, None, time.perf_counter() - t0
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # one bad study must not stop the batch (a native panic included)
        first = (str(exc).strip().splitlines() or [""])[0]
        return split, uid, f"{type(exc).__name__}: {first}", time.perf_counter() - t0


def prepare_dataset(cfg: PrepareConfig, progress: bool = False) -> dict[str, Any]:
    """Cache every study of the dataset (this shard), skipping finished ones; record failures and go on.

    Returns a report dict: counts of prepared, skipped and failed studies, failures with messages, timings.
    """
    from tqdm import tqdm

    ds = RsnaDataset(cfg.data)
    labels = ds.train_labels() if (cfg.data / "train.csv").exists() else {}
    boxes = ds.boxes()
    jobs = []
    skipped = 0
    shard_i, shard_n = cfg.shard
    all_studies = [(split, uid) for split in cfg.splits for uid in ds.study_uids(split)]
    for k, (split, uid) in enumerate(all_studies):
        if k % shard_n != shard_i:
            continue
        dest = cfg.out / split / uid
        if (dest / META_FILE).exists():
            skipped += 1
            continue
        for stale in dest.parent.glob(f".{uid}.tmp*"):  # half-written by a killed run (this shard owns uid)
            shutil.rmtree(stale, ignore_errors=True)
        seg = ds.segmentation_path(uid) if split == "train" else None
        extra: dict[str, Any] = {"_dest": str(dest)}
        if uid in labels:
            extra["labels"] = labels[uid]
        if uid in boxes:
            extra["boxes"] = [asdict(b) for b in boxes[uid]]
        jobs.append((split, uid, str(ds.study_dir(split, uid)), str(seg) if seg else None, extra))
    failures_path = cfg.out / "failures.json"
    failures: dict[str, dict[str, str]] = {}
    if failures_path.exists():
        failures = {f"{r['split']}/{r['uid']}": r for r in json.loads(failures_path.read_text())}
    t0 = time.perf_counter()
    done = 0
    failed_now = 0
    seconds: list[float] = []
    bar = tqdm(total=len(jobs), desc="prepare", unit="study", disable=not progress)
    workers = max(1, cfg.workers)
    # One study at a time uses all cores for decoding; several at once decode serially each.
    decode_workers = None if workers == 1 else 1
    full_jobs = [(*j, decode_workers) for j in jobs]

    def record(result: tuple[str, str, str | None, float]) -> None:
        nonlocal done, failed_now
        split, uid, err, secs = result
        key = f"{split}/{uid}"
        seconds.append(secs)
        if err is None:
            done += 1
            failures.pop(key, None)
        else:
            failed_now += 1
            log.warning("prepare %s failed: %s", key, err)
            failures[key] = {"split": split, "uid": uid, "error": err}
            write_json(failures_path, sorted(failures.values(), key=lambda r: (r["split"], r["uid"])))
        bar.update(1)

    cfg.out.mkdir(parents=True, exist_ok=True)
    if workers == 1:
        for job in full_jobs:
            record(_prepare_one(job))
    else:

        def crashed(job: tuple[Any, ...]) -> None:
            record((job[0], job[1], f"{job[2]}: the process preparing this study died (a crash in a native library, "
                                    "or out of memory)", 0.0))  # fmt: skip

        run_in_processes(_prepare_one, full_jobs, workers, record, crashed)
    bar.close()
    write_json(failures_path, sorted(failures.values(), key=lambda r: (r["split"], r["uid"])))
    report = {
        "prepared": done,
        "skipped_existing": skipped,
        "failed": failed_now,
        "failures": sorted(failures.values(), key=lambda r: (r["split"], r["uid"])),
        "seconds_total": round(time.perf_counter() - t0, 2),
        "seconds_per_study_mean": round(float(np.mean(seconds)), 3) if seconds else None,
    }
    write_json(
        cfg.out / "prepare.json",
        {
            "config": {**asdict(cfg), "data": str(cfg.data), "out": str(cfg.out)},
            "versions": versions(),
            **report,
        },
    )
    return report


__all__ = [
    "PrepareConfig",
    "PreparedStudy",
    "load_prepared",
    "prepare_dataset",
    "prepared_studies",
    "save_prepared",
]
