"""One synthetic study in memory: anatomy sampled for the study, rendered on its scanner grid, encoded choices made.

Deterministic in (seed, size, index, split): each concern draws from its own stream (see
:func:`cspine.synth.sampling.study_rng`), so changing one does not shift the others.

Example::

    from cspine.synth import generate_study
    study = generate_study(seed=0, size="small", index=3)
    study.volume.array, study.mask, study.labels
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

from cspine.io.volume import Volume, affine_from_dicom
from cspine.labels import CERVICAL_VALUES, PATIENT
from cspine.synth.anatomy import Anatomy, build_anatomy
from cspine.synth.appearance import (
    NO_CSPINE,
    PADDING,
    bone_streaks,
    draw_fov,
    metal_streaks,
    noise_level,
    pad_circle,
    wide_grid,
)
from cspine.synth.config import PROFILES, SIZES, Profile, Size
from cspine.synth.render import Grid, render
from cspine.synth.sampling import BOX_P, Split, fracture_plan, sample_labels, study_rng
from cspine.synth.writer import STORAGE, TRANSFER_SYNTAXES

STORAGE_P = (0.45, 0.15, 0.25, 0.15)
HU_MIN, HU_MAX = -1024, 3071


@dataclass
class SynthStudy:
    """One generated study, in memory.

    ``volume`` is exactly what ``cspine.io.load_series`` reads back from the written files (int16 HU, slices in
    ascending z, instance numbers per slice). ``tissue`` is the phantom's ground-truth tissue class per voxel
    (:data:`cspine.synth.parts.TISSUES`; 0 also where the reconstruction circle pads). ``boxes`` are computed
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
    #: what the wide profile drew (field of view, scanner); written to synth.json; empty for the default profile
    extra: dict[str, Any] = field(default_factory=dict)


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


def generate_study(
    seed: int, size: Size = "small", index: int = 0, split: Split = "train", profile: Profile = "default"
) -> SynthStudy:
    """Generate one study in memory (no disk). Deterministic in (seed, size, index, split, profile).

    ``profile="wide"`` draws a field of view (head, head and neck, neck, neck and chest, chest, abdomen), a
    resolution of 0.3-5 mm in-plane and 0.5-5 mm between slices, and a scanner (noise, streaks, HU calibration,
    padding) from stream 7, and widens the anatomy; studies whose field of view holds no cervical vertebra have an
    empty cervical mask and every label 0. What was drawn is in ``SynthStudy.extra``.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    labels = sample_labels(seed, index, split)
    plan = fracture_plan(seed, index, split)
    wide = profile == "wide"
    rng_wide = study_rng(seed, split, index, 7)
    fov = draw_fov(rng_wide) if wide else "neck"
    if fov in NO_CSPINE:
        labels = {p: 0 for p in labels}
        plan = []
    rng_anat = study_rng(seed, split, index, 2)
    rng_fx = study_rng(seed, split, index, 3)
    rng_geo = study_rng(seed, split, index, 4)
    rng_noise = study_rng(seed, split, index, 5)
    rng_file = study_rng(seed, split, index, 6)
    h_min = 0.0  # subtle width is clamped below to the sampled grid's pixel; see make_fracture
    anat = build_anatomy(rng_anat, plan, rng_fx, h_min, wide=wide)
    grid = wide_grid(rng_wide, anat, size, fov) if wide else _grid(rng_geo, anat, size)[0]
    # a 1-pixel subtle line at this sampling
    for part in anat.parts:
        part.fractures = [
            f if not f.subtle else type(f)(**{**f.__dict__, "width": max(f.width, grid.spacing[2])})
            for f in part.fractures
        ]
    corr = None
    if wide:
        sigma, corr = noise_level(rng_wide, grid)
    else:
        noise_full = float(rng_geo.uniform(18, 45))
        sigma = noise_full if size == "full" else noise_full / 3.0
    res = render(anat, grid, sigma, rng_noise, noise_corr=corr)
    extra: dict[str, Any] = {}
    if wide:
        extra = {
            "profile": profile,
            "fov": fov,
            "cervical_spine": bool(np.isin(res.mask, CERVICAL_VALUES).any()),
            **_scanner(res.hu, grid, anat, rng_wide),
            "noise_sigma": round(sigma, 2),
            "noise_corr_px": round(float(corr or 0.0), 3),
            "pixel_spacing": grid.spacing[2],
            "slice_spacing": grid.spacing[0],
            "shape": list(grid.shape),
        }

    storage_i = int(rng_file.choice(len(STORAGE), p=STORAGE_P))
    storage, intercept, _, _ = STORAGE[storage_i]
    syntax = TRANSFER_SYNTAXES[(index + seed + (1 if split == "test" else 0)) % len(TRANSFER_SYNTAXES)]
    top_first = bool(rng_file.random() < 0.5)
    hu = np.clip(np.rint(res.hu), HU_MIN, HU_MAX).astype(np.int16)
    padding = None
    if wide:
        padding = PADDING[int(rng_wide.integers(len(PADDING)))]
        if padding is not None and padding < HU_MIN and not storage.startswith("s"):  # needs signed storage
            storage = ("s16", "s16i")[int(rng_wide.integers(2))]
        extra["padding_hu"] = padding
    elif storage.startswith("s") and rng_file.random() < 0.5:  # reconstruction circle padding, as many scanners do
        padding = -2000 if intercept == 0 else -3024
    if padding is not None:
        pad_circle(hu, res.tissue, padding)
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
    params = {
        **anat.params,
        "landmarks": anat.landmarks,
        "noise_sigma": sigma,
        "pixel_spacing": dx,
        "slice_spacing": dz,
        "slices": k,
    }
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
        extra=extra,
    )


def _scanner(hu: np.ndarray, grid: Grid, anat: Anatomy, rng: np.random.Generator) -> dict[str, Any]:
    """The wide profile's scanner, in place on float HU: streaks from metal and dense bone, then calibration."""
    metal = metal_streaks(hu, grid, anat.metal, rng)
    bone = bone_streaks(hu, grid, rng)
    slope = float(rng.uniform(0.97, 1.03))
    offset = float(np.clip(rng.normal(0.0, 12.0), -35.0, 35.0))
    hu *= np.float32(slope)
    hu += np.float32(offset)
    return {
        "metal_streak_slices": metal,
        "bone_streak_slices": bone,
        "hu_slope": round(slope, 4),
        "hu_offset": round(offset, 2),
    }
