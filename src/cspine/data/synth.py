"""Synthetic RSNA 2022-layout cervical spine CT: labels, studies in memory, and the dataset on disk.

Why: the real data (350 GB, behind a licence) cannot be reached from CI or a first try of the tool, so cspine ships a
generator whose output a reader cannot tell apart from the RSNA download in layout and file format, with anatomy
and fractures that a model has to learn from shape, not from a global shortcut.

Determinism: every study draws from its own ``numpy.random.Generator`` streams keyed by (seed, split, index, stream),
so study i is the same whatever the number of studies, the worker count or the order of writing. The label stream
is separate and cheap (:func:`sample_labels`), so prevalence can be checked over thousands of studies without
building a single volume.

Example::

    from pathlib import Path
    from cspine.data.synth import SynthConfig, generate_dataset, generate_study
    study = generate_study(seed=0, size="small", index=3)       # in memory
    summary = generate_dataset(SynthConfig(out=Path("synth"), studies=20))
"""

from __future__ import annotations

import functools
import io
import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

from cspine.data.anatomy import Anatomy, Grid, build_anatomy, render
from cspine.io.volume import Volume, affine_from_dicom
from cspine.labels import CERVICAL, PATIENT, PREDICTION_TYPES, PREVALENCE, row_id

log = logging.getLogger(__name__)

Size = Literal["small", "full"]
Split = Literal["train", "test"]
SIZES: tuple[str, ...] = ("small", "full")

#: Transfer syntaxes used, cycled across studies so any four consecutive studies contain all of them.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, Non-Hierarchical, First-Order Prediction (SV1)
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.5",  # RLE Lossless
)

#: Pixel storage variants: (name, RescaleIntercept, PixelRepresentation, BitsStored).
STORAGE: tuple[tuple[str, float, int, int], ...] = (
    ("u12", -1024.0, 0, 12),  # the common RSNA case
    ("u16", -1024.0, 0, 16),
    ("s16", 0.0, 1, 16),  # signed HU, intercept 0
    ("s16i", -1024.0, 1, 16),
)
STORAGE_P = (0.45, 0.15, 0.25, 0.15)
HU_MIN, HU_MAX = -1024, 3071
TEST_STREAM = 1_000_003  # keeps test studies independent of the number of training studies

#: Fracture kinds per vertebra and their probabilities.
KINDS: dict[str, tuple[tuple[str, ...], tuple[float, ...]]] = {
    "C1": (("ring",), (1.0,)),
    "C2": (("dens", "body_line", "posterior", "wedge"), (0.4, 0.3, 0.2, 0.1)),
    **{v: (("body_line", "wedge", "posterior"), (0.4, 0.25, 0.35)) for v in CERVICAL[2:]},
}
SUBTLE_P = 0.4
BOX_P = 0.5  # fraction of fractured training studies with boxes in train_bounding_boxes.csv

# ---------------------------------------------------------------------------------------------------------------
# Labels: an exact, calibrated distribution over sets of fractured levels
# ---------------------------------------------------------------------------------------------------------------

_K_P = (0.62, 0.26, 0.12)  # number of fractured levels in a positive patient: mean 1.5 = sum(prevalence) / 0.476
_NONCONTIG_P = 0.25  # chance that the extra level is not adjacent (non-contiguous injuries occur)


def _set_distribution(q: np.ndarray) -> dict[frozenset[int], float]:
    """Distribution over fractured level sets given the primary-level probabilities q (length 7).

    Primary level v ~ q; a second level is adjacent (75 %) or drawn from q away from v; a third extends a
    contiguous run (adjacent injuries are the rule in trauma) or adds another level from q.
    """
    n = len(q)
    out: dict[frozenset[int], float] = {}

    def add(s: frozenset[int], p: float) -> None:
        out[s] = out.get(s, 0.0) + p

    def far(v: frozenset[int]) -> list[tuple[int, float]]:
        excl = set(v) | {x + 1 for x in v} | {x - 1 for x in v}
        cand = [(u, float(q[u])) for u in range(n) if u not in excl]
        tot = sum(p for _, p in cand)
        return [(u, p / tot) for u, p in cand]

    for v in range(n):
        pv = float(q[v])
        add(frozenset([v]), pv * _K_P[0])
        nbrs = [u for u in (v - 1, v + 1) if 0 <= u < n]
        for u in nbrs:
            add(frozenset([v, u]), pv * _K_P[1] * (1 - _NONCONTIG_P) / len(nbrs))
        for u, pu in far(frozenset([v])):
            add(frozenset([v, u]), pv * _K_P[1] * _NONCONTIG_P * pu)
        runs = [(a, a + 1, a + 2) for a in range(v - 2, v + 1) if a >= 0 and a + 2 < n]
        for r in runs:
            add(frozenset(r), pv * _K_P[2] * (1 - _NONCONTIG_P) / len(runs))
        for u in nbrs:
            pair = frozenset([v, u])
            for w, pw in far(pair):
                add(pair | {w}, pv * _K_P[2] * _NONCONTIG_P * pw / len(nbrs))
    return out


@functools.lru_cache(maxsize=1)
def label_distribution() -> tuple[tuple[frozenset[int], ...], np.ndarray]:
    """Level-set distribution whose per-vertebra marginals equal PREVALENCE given a positive patient.

    Calibrated by iterative proportional scaling of the primary-level probabilities; exact (no sampling noise).
    """
    target = np.array([PREVALENCE[v] for v in CERVICAL]) / PREVALENCE[PATIENT]
    q = target / target.sum()
    for _ in range(200):
        dist = _set_distribution(q)
        marg = np.zeros(len(CERVICAL))
        for s, p in dist.items():
            for v in s:
                marg[v] += p
        q = q * (target / marg)
        q /= q.sum()
    dist = _set_distribution(q)
    sets = tuple(sorted(dist, key=lambda s: (len(s), sorted(s))))
    probs = np.array([dist[s] for s in sets])
    return sets, probs / probs.sum()


def _rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), TEST_STREAM if split == "test" else 0, int(index), stream])


def sample_labels(seed: int, index: int, split: Split = "train") -> dict[str, int]:
    """train.csv row of one study (patient_overall, C1..C7), without building anything else. Cheap."""
    rng = _rng(seed, split, index, 0)
    labels = {p: 0 for p in PREDICTION_TYPES}
    if rng.random() < PREVALENCE[PATIENT]:
        sets, probs = label_distribution()
        chosen = sets[int(rng.choice(len(sets), p=probs))]
        for v in chosen:
            labels[CERVICAL[v]] = 1
        labels[PATIENT] = 1
    return labels


def fracture_plan(seed: int, index: int, split: Split = "train") -> list[tuple[str, str, bool]]:
    """(vertebra, kind, subtle) for each fractured level of a study."""
    labels = sample_labels(seed, index, split)
    rng = _rng(seed, split, index, 1)
    plan = []
    for v in CERVICAL:
        if labels[v]:
            kinds, p = KINDS[v]
            kind = str(kinds[int(rng.choice(len(kinds), p=p))])
            plan.append((v, kind, bool(rng.random() < SUBTLE_P)))
    return plan


# ---------------------------------------------------------------------------------------------------------------
# Studies
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthConfig:
    """What ``cspine synth`` writes. Saved beside the data as ``synth.json``."""

    out: Path
    studies: int = 20
    seed: int = 0
    size: Size = "small"
    segmented: float = 0.5
    test_studies: int = 5
    workers: int = 1

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {', '.join(SIZES)}, got {self.size!r}")
        if self.studies < 0 or self.test_studies < 0:
            raise ValueError("studies and test_studies must be >= 0")
        if not 0.0 <= self.segmented <= 1.0:
            raise ValueError(f"segmented is a fraction in [0, 1], got {self.segmented}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


@dataclass
class SynthStudy:
    """One generated study, in memory.

    ``volume`` is exactly what ``cspine.io.load_series`` reads back from the written files (int16 HU, slices in
    ascending z, instance numbers per slice). ``tissue`` is the phantom's ground-truth tissue class per voxel
    (:data:`cspine.data.anatomy.TISSUES`; 0 also where the reconstruction circle pads). ``boxes`` are computed
    for every fractured study (each also names its ``vertebra``); ``has_boxes`` says whether they are published
    in train_bounding_boxes.csv (RSNA boxes cover only a subset of positives).
    """

    uid: str
    split: str
    index: int
    volume: Volume
    mask: np.ndarray
    tissue: np.ndarray
    labels: dict[str, int]
    boxes: list[dict[str, Any]]
    fractures: list[dict[str, Any]]
    has_boxes: bool
    transfer_syntax: str
    storage: str
    top_first: bool
    params: dict[str, Any] = field(default_factory=dict)


def study_uid(seed: int, index: int, split: Split = "train") -> str:
    """Deterministic StudyInstanceUID under pydicom's root (RSNA's are under 1.2.826.0.1.3680043 too)."""
    return generate_uid(PYDICOM_ROOT_UID, entropy_srcs=["cspine-synth", "study", str(seed), split, str(index)])


def _grid(rng: np.random.Generator, anat: Anatomy, size: Size) -> tuple[Grid, float]:
    """Scanner geometry: pixel spacing, slice spacing and field of view; same extent for both sizes."""
    dx_full = float(rng.uniform(0.25, 0.45))
    dz_full = float(rng.choice([0.5, 0.625, 0.75, 0.8, 1.0]))
    length = anat.z_top - anat.z_bottom
    k_full = int(np.clip(round(length / dz_full), 200, 600))
    k_small = int(rng.integers(90, 111))
    length = k_full * dz_full
    fov = 512 * dx_full
    cx = anat.centre_xy[0] + float(rng.uniform(-8, 8))
    cy = anat.centre_xy[1] + float(rng.uniform(-12, 8))
    if size == "full":
        n, dx, k, dz = 512, dx_full, k_full, dz_full
    else:
        n, dx, k = 128, dx_full * 4, k_small
        dz = length / k_small
    dz = round(dz, 4)
    dx = round(dx, 6)
    z0 = anat.z_top - (k - 1) * dz
    origin = (round(cx - fov / 2 + dx / 2, 4), round(cy - fov / 2 + dx / 2, 4), round(z0, 4))
    return Grid((k, n, n), (dz, dx, dx), origin), dx_full


def generate_study(seed: int, size: Size = "small", index: int = 0, split: Split = "train") -> SynthStudy:
    """Generate one study in memory (no disk). Deterministic in (seed, size, index, split)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    labels = sample_labels(seed, index, split)
    plan = fracture_plan(seed, index, split)
    rng_anat = _rng(seed, split, index, 2)
    rng_fx = _rng(seed, split, index, 3)
    rng_geo = _rng(seed, split, index, 4)
    rng_noise = _rng(seed, split, index, 5)
    rng_file = _rng(seed, split, index, 6)
    h_min = 0.0  # subtle width is clamped below to the sampled grid's pixel; see make_fracture
    anat = build_anatomy(rng_anat, plan, rng_fx, h_min)
    grid, _ = _grid(rng_geo, anat, size)
    # a 1-pixel subtle line at this sampling
    for part in anat.parts:
        part.fractures = [
            f if not f.subtle else type(f)(**{**f.__dict__, "width": max(f.width, grid.spacing[2])})
            for f in part.fractures
        ]
    noise_full = float(rng_geo.uniform(18, 45))
    sigma = noise_full if size == "full" else noise_full / 3.0
    res = render(anat, grid, sigma, rng_noise)

    storage_i = int(rng_file.choice(len(STORAGE), p=STORAGE_P))
    storage, intercept, _, _ = STORAGE[storage_i]
    syntax = TRANSFER_SYNTAXES[(index + seed + (1 if split == "test" else 0)) % len(TRANSFER_SYNTAXES)]
    top_first = bool(rng_file.random() < 0.5)
    hu = np.clip(np.rint(res.hu), HU_MIN, HU_MAX).astype(np.int16)
    padding = None
    if storage.startswith("s") and rng_file.random() < 0.5:  # reconstruction circle padding, as many scanners do
        padding = -2000 if intercept == 0 else -3024
        n = grid.shape[1]
        yy, xx = np.mgrid[:n, :n]
        outside = (yy - (n - 1) / 2) ** 2 + (xx - (n - 1) / 2) ** 2 > (n / 2) ** 2
        hu[:, outside] = padding
        res.tissue[:, outside] = 0
    k = grid.shape[0]
    instance = np.arange(k, 0, -1) if top_first else np.arange(1, k + 1)
    dz, dy, dx = grid.spacing
    affine = affine_from_dicom(
        np.array(grid.origin), np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, dz]), (dy, dx)
    )
    uid = study_uid(seed, index, split)
    meta = {
        "StudyInstanceUID": uid,
        "transfer_syntax": syntax,
        "storage": storage,
        "padding_hu": padding,
        "synthetic": True,
    }
    vol = Volume(hu, (dz, dy, dx), affine, instance.astype(np.int64), meta)

    # bounding boxes in RSNA convention: pixel coords of each slice, slice_number = InstanceNumber
    fracs: list[dict[str, Any]] = []
    boxes: list[dict[str, Any]] = []
    fi = 0
    for part in anat.parts:
        for f in part.fractures:
            desc = f.describe()
            slices = res.fracture_slices.get(fi, {})
            desc["slices"] = sorted(int(instance[kz]) for kz in slices)
            fracs.append(desc)
            pad = 1.5 / dx
            for kz in sorted(slices):
                r0, r1, c0, c1, vr0, vr1, vc0, vc1 = slices[kz]
                x0 = max(c0 - pad, vc0)
                y0 = max(r0 - pad, vr0)
                x1 = min(c1 + 1 + pad, vc1 + 1)
                y1 = min(r1 + 1 + pad, vr1 + 1)
                boxes.append(
                    {
                        "x": round(float(x0), 3),
                        "y": round(float(y0), 3),
                        "width": round(float(x1 - x0), 3),
                        "height": round(float(y1 - y0), 3),
                        "slice_number": int(instance[kz]),
                        "vertebra": f.vertebra,
                    }
                )
            fi += 1
    boxes.sort(key=lambda b: (b["slice_number"], b["x"], b["y"]))
    has_boxes = split == "train" and labels[PATIENT] == 1 and bool(rng_file.random() < BOX_P)
    params = {**anat.params, "noise_sigma": sigma, "pixel_spacing": dx, "slice_spacing": dz, "slices": k}
    return SynthStudy(
        uid=uid,
        split=split,
        index=index,
        volume=vol,
        mask=res.mask,
        tissue=res.tissue,
        labels=labels,
        boxes=boxes,
        fractures=fracs,
        has_boxes=has_boxes,
        transfer_syntax=syntax,
        storage=storage,
        top_first=top_first,
        params=params,
    )


# ---------------------------------------------------------------------------------------------------------------
# The dataset on disk
# ---------------------------------------------------------------------------------------------------------------


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


def _write_one(job: _Job) -> dict[str, Any]:
    """Worker: generate one study and write its series (and mask); returns the rows the CSVs need."""
    from cspine.data.dicom_writer import nifti_bytes, write_atomic, write_series

    t0 = time.perf_counter()
    study = generate_study(job.seed, job.size, job.index, job.split)
    t1 = time.perf_counter()
    nbytes = write_series(study, Path(job.folder), job.patient_number)
    if job.nifti:
        nbytes += write_atomic(Path(job.nifti), nifti_bytes(study))
    return {
        "uid": study.uid,
        "split": job.split,
        "index": job.index,
        "labels": study.labels,
        "boxes": [{k: b[k] for k in ("x", "y", "width", "height", "slice_number")} for b in study.boxes]
        if study.has_boxes
        else [],
        "fractures": study.fractures,
        "segmented": job.nifti is not None,
        "slices": int(study.volume.shape[0]),
        "shape": list(study.volume.shape),
        "transfer_syntax": study.transfer_syntax,
        "storage": study.storage,
        "top_first": study.top_first,
        "bytes": nbytes,
        "seconds_generate": round(t1 - t0, 3),
        "seconds_write": round(time.perf_counter() - t1, 3),
    }


def _csv(rows: list[list[Any]]) -> bytes:
    """CSV bytes with '\n' line ends and plain formatting, so equal inputs give equal bytes on every platform."""
    out = io.StringIO()
    for r in rows:
        out.write(",".join(_fmt(v) for v in r) + "\n")
    return out.getvalue().encode()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(round(v, 3)) if not v.is_integer() else f"{v:.1f}"
    return str(v)


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
    from cspine.data.dicom_writer import write_atomic

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
                str(out / "train_images" / uid),
                str(out / "segmentations" / f"{uid}.nii") if i in seg else None,
                i + 1,
            )
        )
    for i in range(cfg.test_studies):
        uid = study_uid(cfg.seed, i, "test")
        jobs.append(_Job(cfg.seed, cfg.size, "test", i, str(out / "test_images" / uid), None, 100_000 + i + 1))
    for sub in ("train_images", "test_images"):
        (out / sub).mkdir(exist_ok=True)
    if seg:
        (out / "segmentations").mkdir(exist_ok=True)
    results = list(_run(jobs, cfg.workers, progress))
    train = [r for r in results if r["split"] == "train"]
    test = [r for r in results if r["split"] == "test"]

    nbytes = sum(r["bytes"] for r in results)
    nbytes += write_atomic(
        out / "train.csv",
        _csv(
            [["StudyInstanceUID", *PREDICTION_TYPES]]
            + [[r["uid"], *(r["labels"][p] for p in PREDICTION_TYPES)] for r in train]
        ),
    )
    box_rows: list[list[Any]] = [["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]]
    for r in train:
        box_rows += [
            [r["uid"], float(b["x"]), float(b["y"]), float(b["width"]), float(b["height"]), b["slice_number"]]
            for b in r["boxes"]
        ]
    nbytes += write_atomic(out / "train_bounding_boxes.csv", _csv(box_rows))
    test_rows: list[list[Any]] = [["row_id", "StudyInstanceUID", "prediction_type"]]
    sub_rows: list[list[Any]] = [["row_id", "fractured"]]
    for r in test:
        for p in PREDICTION_TYPES:
            test_rows.append([row_id(r["uid"], p), r["uid"], p])
            sub_rows.append([row_id(r["uid"], p), 0.5])
    nbytes += write_atomic(out / "test.csv", _csv(test_rows))
    nbytes += write_atomic(out / "sample_submission.csv", _csv(sub_rows))

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
        boxes=len(box_rows) - 1,
        slices=sum(r["slices"] for r in results),
        bytes=nbytes,
        seconds=round(time.perf_counter() - t0, 2),
        transfer_syntaxes=syntaxes,
    )
    record = {
        "config": {**asdict(cfg), "out": str(cfg.out)},
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


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("cspine", "numpy", "scipy", "pydicom", "python-gdcm", "pylibjpeg", "nibabel"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "missing"
    return out
