"""A model bundle: one directory that is enough to predict.

Layout::

    MODEL/bundle.json   cspine version, creation time, components, metrics summary
    MODEL/seg/          vertebra segmentation model directory (weights, config, label map, preprocessing)
    MODEL/cls/          fracture classifier directory (weights per fold, config, crops, calibration)

Loading checks the bundle's format version (major.minor: another major, or a newer minor, is refused), the
formats of its two model directories and the lucency feature version its classifier was fitted on, and says
precisely what is missing or mismatched, so a partial copy or a bundle from an incompatible release fails at load,
not halfway through a 1,500-study submission.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cspine import __version__
from cspine.engine.formats import check_format
from cspine.errors import CspineInputError
from cspine.labels import PATIENT, PREDICTION_TYPES
from cspine.runtime import versions, write_json

if TYPE_CHECKING:
    from cspine.seg.infer import SegResult

log = logging.getLogger(__name__)

BUNDLE_FILE = "bundle.json"
#: major.minor of the bundle layout: a reader accepts its own major and any minor up to its own.
BUNDLE_FORMAT = "2.0"
#: Files that must exist in each component directory of a bundle.
REQUIRED = {"seg": ("config.json",), "cls": ("config.json",)}


class BundleError(CspineInputError):
    """A model directory that cannot be used; the message says what is wrong and where."""


@dataclass
class Prediction:
    """What the bundle returns for one study (all on the study's own grid)."""

    # None: the vertebra (or, for every target, the cervical spine) not in view, or fractures not assessed
    probabilities: dict[str, float | None]
    mask: np.ndarray
    vertebrae: dict[str, dict[str, Any]]
    slice_scores: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    cleanup: list[str] = field(default_factory=list)
    cervical_spine: str = "present"
    not_assessed: str | None = None  # why fractures were not assessed (cspine.cls.domain)


def component_formats() -> dict[str, Any]:
    """What this cspine writes into a bundle's two model directories (recorded in bundle.json, checked at load)."""
    from cspine.cls.config import MODEL_DIR_FORMAT
    from cspine.features.config import FEATURES_VERSION
    from cspine.seg.config import CONFIG_FORMAT

    return {"seg": {"format": CONFIG_FORMAT}, "cls": {"format": MODEL_DIR_FORMAT, "features": FEATURES_VERSION}}


def check_bundle(root: Path) -> dict[str, Any]:
    """Validate a bundle directory; return its bundle.json. Raises BundleError naming what is wrong."""
    if not root.exists():
        raise BundleError(f"{root}: model directory not found")
    info_path = root / BUNDLE_FILE
    if not info_path.exists():
        hint = (
            " (it looks like a single-stage model directory; build a bundle with cspine bundle)"
            if (root / "config.json").exists()
            else ""
        )
        raise BundleError(f"{root}: not a cspine model bundle, {BUNDLE_FILE} is missing{hint}")
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{info_path}: unreadable ({exc})") from exc
    check_format(info.get("format"), BUNDLE_FORMAT, f"{info_path}: bundle", error=BundleError)
    made = info.get("formats", {})
    for component, expected in component_formats().items():
        for key, value in expected.items():
            what = f"{root}: its {component}/ model's" + ("" if key == "format" else f" {key}")
            hint = "rebuild it with this cspine's train-seg, train-cls and bundle"
            check_format(made.get(component, {}).get(key), value, what, hint, BundleError)
    missing = [f"{c}/{f}" for c, files in REQUIRED.items() for f in files if not (root / c / f).exists()]
    if missing:
        raise BundleError(f"{root}: incomplete bundle, missing {', '.join(missing)}")
    return info


def _training_only(folder: str, names: list[str]) -> set[str]:
    """What prediction never reads: resume state (last.pt, with optimiser moments: 3x the weights) where best
    weights exist, and training work folders."""
    skip = {"work"} & set(names)
    if "last.pt" in names and "best.pt" in names:
        skip.add("last.pt")
    return skip


def make_bundle(seg_dir: Path, cls_dir: Path, out: Path, metrics: dict[str, Any] | None = None) -> Path:
    """Assemble a bundle from a segmentation and a classification model directory (copied)."""
    for name, d in (("segmentation", seg_dir), ("classification", cls_dir)):
        if not (d / "config.json").exists():
            raise BundleError(f"{d}: not a {name} model directory (no config.json)")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copytree(seg_dir, tmp / "seg", ignore=_training_only)
    shutil.copytree(cls_dir, tmp / "cls", ignore=_training_only)
    write_json(
        tmp / BUNDLE_FILE,
        {
            "format": BUNDLE_FORMAT,
            "cspine": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": versions(),
            "components": {"seg": "seg/", "cls": "cls/"},
            "formats": component_formats(),
            "metrics": metrics or {},
        },
    )
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


class Bundle:
    """A loaded bundle: segmenter and classifier in memory, ready for many studies."""

    def __init__(self, root: Path, info: dict[str, Any], segmenter: Any, classifier: Any) -> None:
        self.root = root
        self.info = info
        self.segmenter = segmenter
        self.classifier = classifier

    def summary(self) -> dict[str, Any]:
        """What made these predictions (for result.json)."""
        return {"path": str(self.root), "cspine": self.info.get("cspine"), "created": self.info.get("created")}

    def predict(
        self,
        vol: Any,
        timings: dict[str, float] | None = None,
        assume_cervical: bool = False,
        labels: np.ndarray | None = None,
    ) -> Prediction:
        """Segment, then classify one Volume (:meth:`segment`, :meth:`classify`); the mask holds C1..C7 only."""
        timings = {} if timings is None else timings
        return self.classify(vol, self.segment(vol, timings, assume_cervical, labels), timings)

    def segment(
        self,
        vol: Any,
        timings: dict[str, float] | None = None,
        assume_cervical: bool = False,
        labels: np.ndarray | None = None,
    ) -> SegResult:
        """The vertebra labels of one Volume: the segmenter's, or the user's own.

        A vertebra the segmentation does not find (or whose label failed the anatomical checks of
        :mod:`cspine.seg.presence`) is not present; with no cervical level in view ``cervical_spine`` is "absent".
        ``assume_cervical``: the caller knows the study is a cervical spine CT, so the anatomical checks are
        skipped and whatever the segmenter labels is kept. ``labels``: the user's own vertebra mask (project
        values on ``vol``'s grid) used instead of the segmenter; it is cleaned but not second-guessed by the
        anatomical checks nor renamed (:mod:`cspine.seg.naming`).
        """
        from cspine.seg.infer import InferConfig, finish_labels, segment_volume
        from cspine.seg.presence import SPINE_ABSENT

        timings = {} if timings is None else timings
        t = time.perf_counter()
        cfg = InferConfig(presence=None) if assume_cervical else None
        if labels is not None:
            own = InferConfig(presence=None, naming=None)
            seg = finish_labels(np.where(labels <= 7, labels, 0).astype(np.uint8), vol, own)
            if not any(v["present"] for v in seg.vertebrae.values()):
                seg.cervical_spine = SPINE_ABSENT
        else:
            seg = segment_volume(vol, self.segmenter, cfg)
        timings["segment"] = timings.get("segment", 0.0) + time.perf_counter() - t
        return seg

    def classify(self, vol: Any, seg: SegResult, timings: dict[str, float] | None = None) -> Prediction:
        """The probabilities of one Volume given its segmentation (:meth:`segment`): None for a vertebra that is
        not present, and for every target when no cervical spine is in view (nothing is classified then)."""
        from cspine.seg.presence import SPINE_ABSENT

        mask = np.where(seg.mask <= 7, seg.mask, 0).astype(np.uint8)
        common = {"mask": mask, "vertebrae": seg.vertebrae, "cleanup": list(seg.cleanup)}
        if seg.cervical_spine == SPINE_ABSENT:
            probs: dict[str, float | None] = dict.fromkeys(PREDICTION_TYPES)
            return Prediction(probs, warnings=list(seg.warnings), cervical_spine=SPINE_ABSENT, **common)
        cls = self.classifier.predict(vol, seg.mask, timings=timings)
        scores = {
            name: [(int(s["z"]), float(s["score"])) for s in items] for name, items in cls.slice_scores.items()
        }
        warnings = list(seg.warnings)
        if cls.not_assessed:
            warnings.append(f"fractures not assessed ({cls.not_assessed}): no fracture probabilities")
            probs = dict.fromkeys(PREDICTION_TYPES)
            return Prediction(probs, warnings=warnings, not_assessed=cls.not_assessed, **common)
        probs = {
            k: float(cls.probabilities[k]) if k == PATIENT or seg.vertebrae[k]["present"] else None
            for k in PREDICTION_TYPES
        }
        return Prediction(probs, slice_scores=scores, warnings=warnings, **common)


def load_bundle(root: str | Path, device: str = "auto") -> Bundle:
    """Check and load a bundle (a single-stage segmentation directory is not enough: both stages are needed)."""
    from cspine.cls.infer import load_classifier
    from cspine.seg.infer import load_model

    path = Path(root)
    info = check_bundle(path)
    try:
        segmenter = load_model(path / "seg", device=device)
        classifier = load_classifier(path / "cls", device=device)
    except BundleError:
        raise
    except (FileNotFoundError, KeyError, RuntimeError, ValueError) as exc:
        raise BundleError(f"{path}: broken model bundle ({type(exc).__name__}: {exc})") from exc
    return Bundle(path, info, segmenter, classifier)
