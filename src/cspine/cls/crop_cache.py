"""The crop cache of a prepared dataset: ``cspine crops`` and what training reads (cspine.cls.crops computes them).

The cache is keyed by the crop settings and the mask source, and each study by a fingerprint of its cached files,
so a changed mask or setting rebuilds and nothing else does. Layout::

    CROPS/<key>/index.json                          crop config, mask source, studies, skipped studies
    CROPS/<key>/<split>/<uid>/crops.json            fingerprint, labels, vertebrae present, boxes or not
    CROPS/<key>/<split>/<uid>/<C1..C7>.npz          images uint8 (K, C, S, S), z, instance, slice_labels, box_rects,
                                                    stats (lucency statistics)
    CROPS/<key>/png/<uid>.png                       with --png: a grid to look at (boxes drawn in red)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cspine.cls.config import CropConfig
from cspine.cls.crops import vertebra_crops
from cspine.errors import CspineInputError
from cspine.labels import CERVICAL
from cspine.runtime import write_json

log = logging.getLogger(__name__)

CROPS_JSON = "crops.json"
INDEX_JSON = "index.json"
#: More failed studies than this share of a split is systematic: build_crops stops instead of training on the rest.
MAX_FAILED_FRACTION = 0.2


@dataclass(frozen=True)
class CropsConfig:
    """What ``cspine crops`` (and the first step of ``train-cls``) builds.

    Attributes:
        data: a prepared cache (``cspine prepare``).
        out: crop cache root; default ``<data>/crops``.
        crop: crop settings.
        masks: folder of predicted masks ``<uid>.nii[.gz]`` (segmentation stage) for studies without their own.
        masks_first: take the ``masks`` folder's mask even where the study has a ground-truth one: train on the
            masks the model will see at prediction time (the segmenter's, with its errors), as RSNA winners did.
        split: which split of the cache.
        limit: at most this many studies (0 = all), for quick looks and tests.
        workers: studies cropped in parallel.
        png: also write a PNG grid per study.
    """

    data: Path
    out: Path | None = None
    crop: CropConfig = field(default_factory=CropConfig)
    masks: Path | None = None
    masks_first: bool = False
    split: str = "train"
    limit: int = 0
    workers: int = 1
    png: bool = False

    @property
    def mask_source(self) -> str:
        if self.masks is None:
            return "gt"
        return f"{'pred-first' if self.masks_first else 'pred'}:{Path(self.masks).resolve()}"

    @property
    def folder(self) -> Path:
        """The cache folder of these settings."""
        root = self.out if self.out is not None else self.data / "crops"
        return root / self.crop.key(self.mask_source)


@dataclass(frozen=True)
class CropStudy:
    """A study in the crop cache, as training reads it."""

    uid: str
    folder: Path
    labels: dict[str, int] | None
    present: tuple[str, ...]
    has_boxes: bool

    def load(self, vertebra: str) -> dict[str, np.ndarray]:
        """Arrays of one vertebra's crop (images, z, instance, slice_labels, box_rects, stats)."""
        with np.load(self.folder / f"{vertebra}.npz") as f:
            return {k: f[k] for k in f.files}

    def load_stats(self, vertebra: str) -> np.ndarray:
        """Only the lucency statistics of one vertebra (the images stay on disk)."""
        with np.load(self.folder / f"{vertebra}.npz") as f:
            return f["stats"]


def _fingerprint(study_dir: Path, mask_path: Path | None, key: str) -> str:
    """Content hash of what a study's crops depend on: its meta.json, its mask file and the crop key."""
    h = hashlib.sha1(key.encode())
    h.update((study_dir / "meta.json").read_bytes())
    if mask_path is not None and mask_path.exists():
        h.update(mask_path.read_bytes())
    return h.hexdigest()


def _mask_path(cfg: CropsConfig, study_dir: Path) -> Path | None:
    """The study's own (ground-truth) mask when it has one, else its mask in ``cfg.masks`` (pseudo-labels);
    the other way round with ``cfg.masks_first``."""
    own = study_dir / "mask.nii.gz"
    given = None
    if cfg.masks is not None:
        given = next((p for s in (".nii.gz", ".nii") if (p := Path(cfg.masks) / f"{study_dir.name}{s}").exists()), None)
    first, second = (given, own) if cfg.masks_first else (own, given)
    for p in (first, second):
        if p is not None and p.exists():
            return p
    return None


def _crop_one(job: tuple[CropsConfig, str]) -> dict[str, Any]:
    """Worker: crop one study unless its cached crops are current; returns a status record.

    A typed input error (CspineInputError: an unreadable file, a mask that does not fit its volume) is recorded as
    the study's failure, so one bad study does not stop the batch; anything else is a bug and propagates.
    """
    from cspine.data.cache import load_prepared
    from cspine.io import load_segmentation

    cfg, study = job
    study_dir = Path(study)
    uid = study_dir.name
    dest = cfg.folder / cfg.split / uid
    try:
        mask_path = _mask_path(cfg, study_dir)
        if mask_path is None:
            return {"uid": uid, "status": "skipped", "reason": "no vertebra mask"}
        fp = _fingerprint(study_dir, mask_path, cfg.crop.key(cfg.mask_source))
        if (dest / CROPS_JSON).exists():
            meta = json.loads((dest / CROPS_JSON).read_text())
            if meta.get("fingerprint") == fp and not (cfg.png and not (cfg.folder / "png" / f"{uid}.png").exists()):
                return {"uid": uid, "status": "cached", **meta}
        st = load_prepared(study_dir)
        mask = st.mask if cfg.masks is None else load_segmentation(mask_path, st.volume)
        if mask is None:
            return {"uid": uid, "status": "skipped", "reason": "no vertebra mask"}
        crops = vertebra_crops(st.volume, mask, cfg.crop, st.boxes, st.labels)
        if not crops:
            return {"uid": uid, "status": "skipped", "reason": "mask has no cervical vertebra (values 1..7)"}
        tmp = dest.with_name(f".{uid}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for v, c in crops.items():
            np.savez_compressed(
                tmp / f"{v}.npz",
                images=c.images,
                z=c.z,
                instance=c.instance,
                slice_labels=c.slice_labels,
                box_rects=c.box_rects,
                window_yx=np.array(c.window_yx),
                stats=c.stats,
            )
        meta = {
            "fingerprint": fp,
            "labels": st.labels,
            "present": sorted(crops, key=CERVICAL.index),
            "has_boxes": bool(st.boxes),
            "mask": str(mask_path),
        }
        write_json(tmp / CROPS_JSON, meta)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        if cfg.png:
            from cspine.cls.plots import crop_grid

            crop_grid(crops, cfg.folder / "png" / f"{uid}.png", title=_title(uid, st.labels))
        return {"uid": uid, "status": "built", **meta}
    except CspineInputError as exc:
        return {"uid": uid, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"}


def _title(uid: str, labels: dict[str, int] | None) -> str:
    if not labels:
        return uid
    frac = [v for v in CERVICAL if labels.get(v)]
    return f"{uid}  fractured: {', '.join(frac) if frac else 'none'}"


def build_crops(cfg: CropsConfig, progress: bool = False) -> list[CropStudy]:
    """Crop every study of a split of a prepared cache (reusing current cached crops); return the usable studies.

    Studies without a mask are skipped (listed in index.json with the reason), so a cache where only some
    studies are segmented still trains on those. Studies with bad input are recorded as failed the same way,
    unless more than MAX_FAILED_FRACTION of them fail: that is systematic (a wrong folder, a wrong mask source),
    and training on what is left would silently shrink the training set, so it stops with the first reason.
    """
    from tqdm import tqdm

    from cspine.data.cache import prepared_studies

    if not Path(cfg.data).is_dir():
        raise FileNotFoundError(f"{cfg.data}: prepared cache folder not found (run `cspine prepare` first)")
    studies = prepared_studies(Path(cfg.data), cfg.split)
    if not studies:
        raise ValueError(f"{cfg.data}: no prepared {cfg.split} studies (expected {cfg.data}/{cfg.split}/<uid>/)")
    if cfg.masks is not None and not Path(cfg.masks).is_dir():
        raise FileNotFoundError(f"{cfg.masks}: mask folder not found")
    if cfg.limit:
        studies = studies[: cfg.limit]
    jobs = [(cfg, str(s)) for s in studies]
    bar = tqdm(total=len(jobs), desc="crops", unit="study", disable=not progress)
    results = []
    if cfg.workers <= 1:
        for j in jobs:
            results.append(_crop_one(j))
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=cfg.workers) as ex:
            for r in ex.map(_crop_one, jobs, chunksize=4):
                results.append(r)
                bar.update()
    bar.close()
    ok = [r for r in results if r["status"] in ("built", "cached")]
    bad = [r for r in results if r["status"] not in ("built", "cached")]
    for r in bad:
        log.warning("crops %s %s: %s", r["uid"], r["status"], r["reason"])
    write_json(
        cfg.folder / INDEX_JSON,
        {
            "crop": asdict(cfg.crop),
            "mask_source": cfg.mask_source,
            "split": cfg.split,
            "studies": [r["uid"] for r in ok],
            "built": sum(r["status"] == "built" for r in results),
            "cached": sum(r["status"] == "cached" for r in results),
            "skipped": [{"uid": r["uid"], "status": r["status"], "reason": r["reason"]} for r in bad],
        },
    )
    failed = [r for r in results if r["status"] == "failed"]
    if len(failed) > MAX_FAILED_FRACTION * len(results):
        raise CspineInputError(
            f"{cfg.data}: {len(failed)} of {len(results)} studies failed to crop (more than "
            f"{MAX_FAILED_FRACTION:.0%}: systematic), e.g. {failed[0]['uid']}: {failed[0]['reason']}"
        )
    return [
        CropStudy(
            uid=r["uid"],
            folder=cfg.folder / cfg.split / r["uid"],
            labels=r.get("labels"),
            present=tuple(r["present"]),
            has_boxes=bool(r["has_boxes"]),
        )
        for r in ok
    ]
