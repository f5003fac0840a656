"""The RSNA 2022 dataset layout: where studies, masks and CSVs live, and how to read them.

Only the standard library's csv module is used: the files are small and the columns fixed.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from cspine.errors import CspineInputError
from cspine.labels import PREDICTION_TYPES, split_row_id

TRAIN_COLUMNS = ("StudyInstanceUID", *PREDICTION_TYPES)
BOX_COLUMNS = ("StudyInstanceUID", "x", "y", "width", "height", "slice_number")
TEST_COLUMNS = ("row_id", "StudyInstanceUID", "prediction_type")
SUBMISSION_COLUMNS = ("row_id", "fractured")
SPLITS = ("train", "test")

#: File and folder names of the layout (read here, written by :mod:`cspine.synth.writer`).
TRAIN_CSV = "train.csv"
BOXES_CSV = "train_bounding_boxes.csv"
TEST_CSV = "test.csv"
SAMPLE_SUBMISSION_CSV = "sample_submission.csv"
SEGMENTATIONS_DIR = "segmentations"
MASK_SUFFIXES = (".nii", ".nii.gz")


def images_dirname(split: str) -> str:
    """``train_images`` / ``test_images``."""
    return f"{split}_images"


def slice_filename(slice_number: int) -> str:
    """A study's slice file: ``<slice_number>.dcm`` (the number train_bounding_boxes.csv refers to)."""
    return f"{int(slice_number)}.dcm"


@dataclass(frozen=True)
class Box:
    """A fracture box on one axial slice, in pixels of that slice (x = column, y = row)."""

    x: float
    y: float
    width: float
    height: float
    slice_number: int


@dataclass(frozen=True)
class RsnaDataset:
    """An RSNA-layout folder. Paths are computed, nothing is read until asked."""

    root: Path

    def __post_init__(self) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: dataset folder not found")
        if not any((self.root / images_dirname(s)).is_dir() for s in SPLITS):
            raise CspineInputError(f"{self.root}: not an RSNA-layout dataset (no train_images/ or test_images/ folder)")

    def images_dir(self, split: str) -> Path:
        return self.root / images_dirname(split)

    def study_dir(self, split: str, uid: str) -> Path:
        return self.images_dir(split) / uid

    def study_uids(self, split: str) -> list[str]:
        """Study folders present on disk for a split, sorted."""
        d = self.images_dir(split)
        return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []

    def segmentation_path(self, uid: str) -> Path | None:
        """The study's mask file, if it has one (.nii or .nii.gz)."""
        for suffix in MASK_SUFFIXES:
            p = self.root / SEGMENTATIONS_DIR / f"{uid}{suffix}"
            if p.exists():
                return p
        return None

    def train_labels(self) -> dict[str, dict[str, int]]:
        """train.csv as {StudyInstanceUID: {patient_overall: 0/1, C1: ..., C7: ...}}."""
        return read_train_labels(self.root / TRAIN_CSV)

    def boxes(self) -> dict[str, list[Box]]:
        """train_bounding_boxes.csv grouped by study (empty when the file is absent)."""
        path = self.root / BOXES_CSV
        out: dict[str, list[Box]] = {}
        if not path.exists():
            return out
        for r in _read_csv(path, BOX_COLUMNS):
            out.setdefault(r["StudyInstanceUID"], []).append(
                Box(float(r["x"]), float(r["y"]), float(r["width"]), float(r["height"]), int(float(r["slice_number"])))
            )
        return out

    def test_rows(self) -> list[dict[str, str]]:
        """test.csv rows in file order (row_id, StudyInstanceUID, prediction_type), checked for consistency."""
        rows = _read_csv(self.root / TEST_CSV, TEST_COLUMNS)
        for r in rows:
            uid, ptype = split_row_id(r["row_id"])
            if uid != r["StudyInstanceUID"] or ptype != r["prediction_type"]:
                raise CspineInputError(f"{self.root / TEST_CSV}: row_id {r['row_id']!r} does not match its columns")
        return rows


def read_train_labels(path: Path) -> dict[str, dict[str, int]]:
    """A train.csv-style file (StudyInstanceUID, patient_overall, C1..C7) as {uid: {target: 0/1}}."""
    rows = _read_csv(Path(path), TRAIN_COLUMNS)
    return {r["StudyInstanceUID"]: {k: int(float(r[k])) for k in PREDICTION_TYPES} for r in rows}


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise CspineInputError(f"{path}: missing column(s) {', '.join(missing)}; found {reader.fieldnames}")
        return list(reader)


def write_csv_atomic(path: Path, header: tuple[str, ...] | list[str], rows: list[list[object]]) -> None:
    """Write a CSV so that a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, path)
