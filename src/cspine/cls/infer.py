"""Inference: a Volume and its vertebra mask (+ a model directory) -> calibrated fracture probabilities.

The model directory alone is enough: ``config.json`` rebuilds the crops and the networks, ``fold*.pt`` are the fold
ensemble (logits averaged; each with its lucency model ``fold*.features.json``), ``calibration.json`` the
temperatures. The mask may be ground truth or predicted by the segmentation stage; a vertebra the mask lacks gets
the RSNA prevalence as its probability and no slice scores. A model bundle keeps this directory as its ``cls/``
sub-folder and passes that path here.

Example::

    from cspine.cls.infer import load_classifier
    clf = load_classifier("model_dir")                  # load once
    pred = clf.predict(volume, mask)                    # per study
    pred.probabilities["C2"], pred.probabilities["patient_overall"]
    pred.slice_scores["C2"]                             # [{"z", "instance", "score"}, ...] for the report
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cspine.cls.calibrate import Calibration
from cspine.cls.config import CropConfig, TrainConfig
from cspine.cls.crops import vertebra_crops
from cspine.cls.dataset import StudyArrays, stack_study
from cspine.cls.domain import NetworkDomain
from cspine.cls.model_dir import fold_checkpoints, load_config
from cspine.cls.recipes import get_recipe, share_networks
from cspine.io.volume import Volume
from cspine.labels import CERVICAL, LABEL_VALUES, PREDICTION_TYPES, PREVALENCE
from cspine.runtime import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyPrediction:
    """The classifier's answer for one study.

    Attributes:
        probabilities: calibrated P(fractured) for patient_overall and C1..C7 (what a submission uses).
        uncalibrated: the same before temperature scaling.
        present: whether the mask contained each vertebra (absent ones fall back to the prevalence).
        slice_scores: per vertebra, per sampled slice: z index, InstanceNumber and the slice score in [0, 1]
            (the sequence model's box head, the seed baseline's per-image probability; 0 without the network).
        not_assessed: why fractures were not assessed on this study (a scan coarser than the classifier learned
            from: cspine.cls.domain), None when they were; the probabilities are then the RSNA prevalence.
    """

    probabilities: dict[str, float]
    uncalibrated: dict[str, float]
    present: dict[str, bool]
    slice_scores: dict[str, list[dict[str, Any]]]
    not_assessed: str | None = None


class Classifier:
    """A loaded model directory (all folds), ready to predict many studies."""

    def __init__(self, model_dir: str | Path, device: str = "auto") -> None:
        self.model_dir = Path(model_dir)
        self.config: TrainConfig = load_config(self.model_dir)
        self.device = resolve_device(device)
        paths = fold_checkpoints(self.model_dir)
        if not paths:
            raise FileNotFoundError(f"{self.model_dir}: no fold*.pt weights (training not finished?)")
        # weights come from the checkpoints: never ask for the pretrained file again
        self.recipe_ = get_recipe(self.config.recipe, replace(self.config.model, pretrained=None), self.config.crop)
        self.folds = share_networks([self.recipe_.load_fold(p, self.device) for p in paths])
        self.calibration = Calibration.load(self.model_dir)
        self.domain = NetworkDomain.load(self.model_dir)

    @property
    def recipe(self) -> str:
        return self.config.recipe

    def refusal(self, volume: Volume) -> str | None:
        """Why fractures are not assessed on this scan (cspine.cls.domain); None when they are."""
        return None if self.domain is None else self.domain.refusal(volume.spacing)

    def study_arrays(self, volume: Volume, mask: np.ndarray) -> StudyArrays:
        """The crops and statistics of the vertebrae of ``mask``, as this model reads them."""
        return study_arrays(volume, mask, self.config.crop)

    def logit_parts(
        self, volume: Volume, mask: np.ndarray, arrays: StudyArrays | None = None
    ) -> dict[str, np.ndarray] | None:
        """Each vertebra's logit split into its network and statistics parts (benchmarks: which part ranks);
        ``arrays``: the study's :meth:`study_arrays` when already made."""
        st = arrays if arrays is not None else self.study_arrays(volume, mask)
        return self.recipe_.logit_parts(self.folds, st, self.device)

    def predict(
        self,
        volume: Volume,
        mask: np.ndarray,
        timings: dict[str, float] | None = None,
        arrays: StudyArrays | None = None,
    ) -> StudyPrediction:
        """Crop the vertebrae of ``mask`` from ``volume`` (unless ``arrays`` holds them already) and predict
        (calibrated); adds crop/classify seconds to ``timings`` when given. A scan outside the classifier's domain
        is not read: the RSNA prevalence, and why."""
        refusal = self.refusal(volume)
        if refusal is not None:
            labels = set(np.unique(mask).tolist())
            present = {v: LABEL_VALUES[v] in labels for v in CERVICAL}
            return StudyPrediction(dict(PREVALENCE), dict(PREVALENCE), present, {}, not_assessed=refusal)
        t0 = time.perf_counter()
        st = arrays if arrays is not None else self.study_arrays(volume, mask)
        t1 = time.perf_counter()
        raw, slices = self.recipe_.predict_study(self.folds, st, self.device)
        cal = self.calibration.apply(raw[None])[0]
        if timings is not None:
            timings["crop"] = timings.get("crop", 0.0) + t1 - t0
            timings["classify"] = timings.get("classify", 0.0) + time.perf_counter() - t1
        return StudyPrediction(
            probabilities={t: float(cal[j]) for j, t in enumerate(PREDICTION_TYPES)},
            uncalibrated={t: float(raw[j]) for j, t in enumerate(PREDICTION_TYPES)},
            present={v: bool(st.present[i]) for i, v in enumerate(CERVICAL)},
            slice_scores={
                v: [
                    {"z": int(st.z[i, k]), "instance": int(st.instance[i, k]), "score": float(slices[i, k])}
                    for k in range(st.z.shape[1])
                ]
                for i, v in enumerate(CERVICAL)
                if st.present[i]
            },
        )


def study_arrays(volume: Volume, mask: np.ndarray, crop: CropConfig) -> StudyArrays:
    """The crops and statistics of the vertebrae of ``mask`` with the crop settings ``crop`` (a model's
    ``config.crop``): a function of the settings alone, so that other processes can make them."""
    crops = vertebra_crops(volume, mask, crop)
    arrays = {v: vars(c) for v, c in crops.items()}  # the crop's fields under the names the cache uses
    return stack_study(str(volume.meta.get("StudyInstanceUID", "study")), arrays, crop, None, False)


def load_classifier(model_dir: str | Path, device: str = "auto") -> Classifier:
    """Load a model directory (from ``cspine train-cls``, or a bundle's ``cls/`` folder) once for many studies."""
    return Classifier(model_dir, device)


def predict_study(
    volume: Volume, mask: np.ndarray, model: str | Path | Classifier, device: str = "auto"
) -> StudyPrediction:
    """One study: ``model`` is a model directory or an already loaded :class:`Classifier`."""
    clf = model if isinstance(model, Classifier) else load_classifier(model, device)
    return clf.predict(volume, mask)


def predict_prepared(
    model_dir: str | Path,
    cache: Path,
    split: str = "test",
    masks: Path | None = None,
    out_csv: Path | None = None,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Predict every prepared study of a cache split (GT masks from the cache, or ``masks/<uid>.nii[.gz]``).

    Studies without a mask get the RSNA prevalence for every target (and a warning). Optionally writes a wide CSV.
    """
    from tqdm import tqdm

    from cspine.data.cache import load_prepared, prepared_studies
    from cspine.io import load_segmentation

    clf = load_classifier(model_dir, device)
    out: dict[str, dict[str, float]] = {}
    for d in tqdm(prepared_studies(Path(cache), split), desc="classify", unit="study", disable=not progress):
        st = load_prepared(d)
        mask = st.mask
        if masks is not None:
            cand = [Path(masks) / f"{st.uid}{s}" for s in (".nii.gz", ".nii")]
            path = next((p for p in cand if p.exists()), None)
            mask = load_segmentation(path, st.volume) if path else None
        if mask is None:
            log.warning("%s: no vertebra mask; predicting the prevalence", st.uid)
            out[st.uid] = dict(PREVALENCE)
            continue
        out[st.uid] = clf.predict(st.volume, mask).probabilities
    if out_csv is not None:
        from cspine.cls.evaluate import write_wide

        uids = sorted(out)
        write_wide(out_csv, uids, np.array([[out[u][t] for t in PREDICTION_TYPES] for u in uids]))
    return out


__all__ = ["Classifier", "StudyPrediction", "load_classifier", "predict_prepared", "predict_study"]
