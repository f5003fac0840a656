"""Torch datasets over the crop cache: one item per study (sequence model) or per image (seed baseline).

Augmentation is the only randomness and it is keyed by (seed, epoch, item), so a resumed or a distributed run
sees exactly the images an uninterrupted single-process run would. Crops stay uint8 until the model scales them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from cspine.cls.config import CropConfig
from cspine.cls.crop_cache import CropStudy
from cspine.features.lucency import N_LUCENCY
from cspine.labels import CERVICAL, PREDICTION_TYPES

NV = len(CERVICAL)


@dataclass(frozen=True)
class StudyArrays:
    """All crops of one study, shaped for the sequence model.

    Attributes:
        images: (7, K, C, S, S) uint8, zeros for vertebrae the mask lacks.
        present: (7,) bool.
        labels: (8,) float32 in PREDICTION_TYPES order (zeros when unknown).
        slice_labels: (7, K) float32 from the boxes.
        slice_valid: (7, K) bool: where a slice label is known (the study has boxes, or the vertebra is not fractured).
        z: (7, K) int64 slice indices; instance: (7, K) int64 InstanceNumbers (-1 where absent).
        stats: (7, N_LUCENCY) float32 lucency statistics (zeros where absent).
    """

    uid: str
    images: np.ndarray
    present: np.ndarray
    labels: np.ndarray
    slice_labels: np.ndarray
    slice_valid: np.ndarray
    z: np.ndarray
    instance: np.ndarray
    stats: np.ndarray


def stack_study(
    uid: str, crops: dict[str, dict[str, np.ndarray]], crop: CropConfig, labels: dict[str, int] | None, has_boxes: bool
) -> StudyArrays:
    """Arrange per-vertebra crop arrays (from the cache or computed in memory) into a StudyArrays."""
    k, c, s = crop.slices, crop.channels, crop.size
    images = np.zeros((NV, k, c, s, s), np.uint8)
    present = np.zeros(NV, bool)
    sl = np.zeros((NV, k), np.float32)
    valid = np.zeros((NV, k), bool)
    z = np.full((NV, k), -1, np.int64)
    inst = np.full((NV, k), -1, np.int64)
    stats = np.zeros((NV, N_LUCENCY), np.float32)
    y = np.array([float(labels[t]) for t in PREDICTION_TYPES], np.float32) if labels else np.zeros(8, np.float32)
    for i, v in enumerate(CERVICAL):
        if v not in crops:
            continue
        a = crops[v]
        if a["images"].shape != (k, c, s, s):
            raise ValueError(
                f"{uid} {v}: crop shape {a['images'].shape} differs from the config's {(k, c, s, s)}; "
                "rebuild the crops with the model's crop settings"
            )
        images[i] = a["images"]
        present[i] = True
        sl[i] = a["slice_labels"]
        valid[i] = has_boxes or (labels is not None and labels.get(v, 0) == 0)
        z[i] = a["z"]
        inst[i] = a["instance"]
        stats[i] = a["stats"]
    return StudyArrays(uid, images, present, y, sl, valid, z, inst, stats)


def load_study(study: CropStudy, crop: CropConfig) -> StudyArrays:
    """Read one study's crops from the cache."""
    return stack_study(study.uid, {v: study.load(v) for v in study.present}, crop, study.labels, study.has_boxes)


def augment_stack(images: np.ndarray, rng: np.random.Generator, image_channels: int) -> np.ndarray:
    """Flip left-right, shift by up to 1/8 of the crop, jitter contrast and brightness (image channels only).

    Applied per vertebra with the same draw for its K slices, so the slice sequence stays coherent.
    ``images`` is (..., K, C, S, S) uint8; returns a new uint8 array.
    """
    out = images.copy()
    lead = out.shape[:-4]
    s = out.shape[-1]
    for idx in np.ndindex(*lead) if lead else [()]:
        x = out[idx]
        if rng.random() < 0.5:
            x = x[..., ::-1]
        dy, dx = rng.integers(-s // 8, s // 8 + 1, size=2)
        x = np.roll(x, (int(dy), int(dx)), axis=(-2, -1))
        if dy > 0:
            x[..., :dy, :] = 0
        elif dy < 0:
            x[..., dy:, :] = 0
        if dx > 0:
            x[..., :, :dx] = 0
        elif dx < 0:
            x[..., :, dx:] = 0
        gain, bias = rng.uniform(0.9, 1.1), rng.uniform(-10, 10)
        img = x[:, :image_channels].astype(np.float32) * gain + bias
        x = x.copy()
        x[:, :image_channels] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        out[idx] = x
    return out


class StudyStore:
    """The studies' crops by row: preloaded when they fit in ``preload_bytes``, else read from the cache on demand.

    CPU-sized crops of a few hundred studies fit in memory easily; winners-sized crops of 2,000 studies
    (24 x 384 x 384 per vertebra) do not, and are streamed by DataLoader workers instead.
    """

    def __init__(self, studies: Sequence[CropStudy], crop: CropConfig, preload_bytes: float = 4e9):
        self.studies = list(studies)
        self.crop = crop
        per = NV * crop.slices * crop.channels * crop.size * crop.size
        self._cache = [load_study(s, crop) for s in self.studies] if per * len(self.studies) <= preload_bytes else None

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, i: int) -> StudyArrays:
        return self._cache[i] if self._cache is not None else load_study(self.studies[i], self.crop)

    @property
    def uids(self) -> list[str]:
        return [s.uid for s in self.studies]

    def study_stats(self, rows: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 7, N_LUCENCY) lucency statistics and (n, 7) presence of ``rows`` (to standardise and fit the
        linear path with); a streamed store reads only the statistics, not the images."""
        stats = np.zeros((len(rows), NV, N_LUCENCY), np.float32)
        present = np.zeros((len(rows), NV), bool)
        for j, r in enumerate(rows):
            if self._cache is not None:
                st = self._cache[int(r)]
                stats[j], present[j] = st.stats, st.present
                continue
            study = self.studies[int(r)]
            for v in study.present:
                i = CERVICAL.index(v)
                stats[j, i], present[j, i] = study.load_stats(v), True
        return torch.from_numpy(stats), torch.from_numpy(present)

    def labels(self) -> np.ndarray:
        """(n, 8) labels in PREDICTION_TYPES order (studies without labels are an error here)."""
        missing = [s.uid for s in self.studies if not s.labels]
        if missing:
            raise ValueError(f"{len(missing)} studies have no labels (not in train.csv?), e.g. {missing[0]}")
        return np.array([[float(s.labels[t]) for t in PREDICTION_TYPES] for s in self.studies], np.float32)


class _EpochDataset(Dataset):
    """Rows of a StudyStore with seeded, per-epoch augmentation (set_epoch before each epoch)."""

    def __init__(self, store: StudyStore, rows: Sequence[int] | np.ndarray, augment: bool = False, seed: int = 0):
        self.store = store
        self.rows = np.asarray(rows, dtype=np.int64)
        self.crop = store.crop
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)


class StudyDataset(_EpochDataset):
    """One item per study (rows of a StudyStore): the tensors the sequence model and its loss need."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        r = int(self.rows[i])
        st = self.store[r]
        images = st.images
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, r])
            images = augment_stack(images, rng, self.crop.channels - int(self.crop.mask_channel))
        return {
            "images": torch.from_numpy(np.ascontiguousarray(images)),
            "present": torch.from_numpy(st.present),
            "stats": torch.from_numpy(st.stats),
            "labels": torch.from_numpy(st.labels),
            "slice_labels": torch.from_numpy(st.slice_labels),
            "slice_valid": torch.from_numpy(st.slice_valid),
            "row": torch.tensor(r),
        }


@dataclass(frozen=True)
class ImageIndex:
    """Where each single image of the seed baseline comes from: study row, vertebra 0..6, slice 0..K-1."""

    study: np.ndarray
    vertebra: np.ndarray
    slice: np.ndarray

    def __len__(self) -> int:
        return len(self.study)


def image_index(store: StudyStore) -> ImageIndex:
    """Every (study, vertebra, slice) image of the vertebrae present, in a fixed order (no image is read)."""
    k = store.crop.slices
    rows = [(i, CERVICAL.index(v), j) for i, st in enumerate(store.studies) for v in st.present for j in range(k)]
    arr = np.array(rows, dtype=np.int64).reshape(-1, 3)
    return ImageIndex(arr[:, 0], arr[:, 1], arr[:, 2])


class ImageDataset(_EpochDataset):
    """Single crop images (rows of an ImageIndex) with their vertebra's study-level label: the seed's samples."""

    def __init__(self, store: StudyStore, index: ImageIndex, rows: np.ndarray, augment: bool = False, seed: int = 0):
        super().__init__(store, rows, augment, seed)
        self.index = index

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        r = int(self.rows[i])
        s, v, k = int(self.index.study[r]), int(self.index.vertebra[r]), int(self.index.slice[r])
        st = self.store[s]
        img = st.images[v, k]
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, r])
            img = augment_stack(img[None, None], rng, self.crop.channels - int(self.crop.mask_channel))[0, 0]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img)),
            "label": torch.tensor(float(st.labels[1 + v])),
            "vertebra": torch.tensor(v),
            "row": torch.tensor(r),
        }
