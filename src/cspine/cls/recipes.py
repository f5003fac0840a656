"""Classifier recipes as classes, chosen by name through :data:`RECIPE_CLASSES` (:func:`get_recipe`).

A recipe owns what training and inference must agree on: how its network is built (:meth:`Recipe.build`), one
training step (:meth:`Recipe.step`), the forward pass of a fold ensemble (``forward``) and how its outputs become a
study's eight probabilities (``aggregate``). Training (:mod:`cspine.cls.train`) and inference
(:mod:`cspine.cls.infer`) both call these methods, so they cannot drift apart. Nothing here imports training: a
recipe's training procedure is reached through :meth:`Recipe.train`, which imports it when called.

- ``sequence``: one network over a study's seven vertebrae (K slices each), trained per fold of a grouped K-fold CV.
- ``seed-baseline``: the seed's seven per-vertebra image classifiers; a vertebra's probability is the mean over
  its images, the patient's 1 - prod(1 - p_Ci).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cspine.cls.calibrate import sigmoid
from cspine.cls.config import RECIPES, CropConfig, ModelConfig
from cspine.cls.dataset import StudyArrays
from cspine.cls.models import create_model
from cspine.engine.step import StepResult
from cspine.features.linear import LucencyModel
from cspine.labels import CERVICAL, METRIC_WEIGHTS, PREDICTION_TYPES, PREVALENCE

if TYPE_CHECKING:
    from cspine.cls.config import TrainConfig
    from cspine.cls.dataset import StudyStore
    from cspine.runtime import Runtime

POS_W = torch.tensor([METRIC_WEIGHTS[t][1] for t in PREDICTION_TYPES])
NEG_W = torch.tensor([METRIC_WEIGHTS[t][0] for t in PREDICTION_TYPES])
PRIOR = np.array([PREVALENCE[v] for v in CERVICAL], dtype=np.float64)


def noisy_or(pv: np.ndarray) -> np.ndarray:
    """P(any vertebra fractured) if vertebrae were independent: 1 - prod(1 - p_Ci)."""
    return 1.0 - np.prod(1.0 - np.clip(pv, 0.0, 1.0), axis=1)


def _autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA only (the same rule as training's Runtime.amp)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@dataclass
class Fold:
    """One trained fold: its network and, for the sequence recipe's lucency path, its fitted feature model."""

    net: nn.Module
    lucency: LucencyModel | None = None


def share_networks(folds: Sequence[Fold]) -> list[Fold]:
    """The folds with one network object for folds whose weights are identical (folds that kept an ``--init``
    network with 0 epochs, as the demo's do): loaded once, and the sequence recipe encodes a batch once for them."""
    shared: list[nn.Module] = []
    out = []
    for f in folds:
        state = f.net.state_dict()
        same = next((n for n in shared if _equal_states(n.state_dict(), state)), None)
        if same is None:
            shared.append(f.net)
        out.append(Fold(same or f.net, f.lucency))
    return out


def _equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Recipe:
    """A recipe's shared parts; subclasses set ``name`` and implement step / forward / aggregate / predict_study."""

    name: ClassVar[str]

    def __init__(self, model: ModelConfig, crop: CropConfig) -> None:
        self.model = model
        self.crop = crop

    def build(self) -> nn.Module:
        """The recipe's network (cspine.cls.models registry)."""
        return create_model(self.name, self.model, self.crop)

    def load_fold(self, path: Path, device: torch.device) -> Fold:
        """A fold's network with the weights of ``path`` (fold{k}.pt), on ``device``, in eval mode."""
        from cspine.engine.model_dir import load_weights

        net = self.build()
        try:
            net.load_state_dict(load_weights(path)[0])
        except (KeyError, RuntimeError) as exc:
            raise ValueError(f"{path}: weights do not fit the model of {path.parent / 'config.json'}: {exc}") from exc
        return Fold(net.to(device).eval())

    def step(self, net: nn.Module, batch: dict[str, torch.Tensor]) -> StepResult:
        raise NotImplementedError

    def predict_study(self, folds: Sequence[Fold], st: StudyArrays, device: torch.device) -> tuple[Any, Any]:
        """Uncalibrated (8,) probabilities (PREDICTION_TYPES order) and (7, K) slice scores of one study."""
        raise NotImplementedError

    def logit_parts(self, folds: Sequence[Fold], st: StudyArrays, device: torch.device) -> dict[str, np.ndarray] | None:
        """The vertebra logits (7,) of one study split into the parts that add up to them (cspine.cls.oof.PATHS),
        NaN where the mask lacks the vertebra; None for a recipe whose logit has no parts."""
        return None

    def train(self, cfg: TrainConfig, rt: Runtime, store: StudyStore, progress: bool, timings: dict[str, float]):
        """Train this recipe into ``cfg.out`` (its training procedure is imported here, never by inference)."""
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------------------
# sequence
# ----------------------------------------------------------------------------------------------------------------------


def sequence_loss(
    out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], aux_weight: float, feature_weight: float = 0.0
) -> torch.Tensor:
    """The competition metric as a loss (per-study weighted BCE, normalised per study) + the per-slice box loss
    + the feature path's own vertebra loss (deep supervision, ``feature_weight``).

    Vertebrae the mask lacks drop out of both the numerator and the study's weight sum.
    """
    logits = torch.cat([out["patient"][:, None], out["vertebra"]], dim=1).float()
    y = batch["labels"].float()
    present = batch["present"].float()
    w = torch.where(y > 0.5, POS_W.to(y.device), NEG_W.to(y.device))
    w = torch.cat([w[:, :1], w[:, 1:] * present], dim=1)
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    main = ((w * bce).sum(dim=1) / w.sum(dim=1)).mean()
    if feature_weight > 0 and "features" in out:
        wv = w[:, 1:]
        fb = F.binary_cross_entropy_with_logits(out["features"].float(), y[:, 1:], reduction="none")
        main = main + feature_weight * ((wv * fb).sum(dim=1) / wv.sum(dim=1).clamp(min=1e-6)).mean()
    valid = batch["slice_valid"] & batch["present"][..., None].bool()
    if aux_weight > 0 and bool(valid.any()):
        target = batch["slice_labels"].float()[valid]
        # fracture slices are ~1 % of known slices: weight them up to balance the classes (capped), or the
        # box head learns "never" and its gradient stops teaching the encoder what a fracture looks like
        n_pos = target.sum()
        pos_weight = ((target.numel() - n_pos) / n_pos.clamp(min=1.0)).clamp(1.0, 50.0)
        aux = F.binary_cross_entropy_with_logits(out["slices"].float()[valid], target, pos_weight=pos_weight)
        return main + aux_weight * aux
    return main


def sequence_probs(patient: np.ndarray, vertebra: np.ndarray, present: np.ndarray, patient_from: str) -> np.ndarray:
    """(n, 8) probabilities in PREDICTION_TYPES order from logits: vertebrae by sigmoid (the RSNA prevalence for
    vertebrae the mask lacks), patient from the head or as 1 - prod(1 - p_Ci)."""
    pv = np.where(present, sigmoid(vertebra), PRIOR[None, :])
    pp = sigmoid(patient) if patient_from == "head" else noisy_or(pv)
    return np.concatenate([pp[:, None], pv], axis=1)


def _study_batch(st: StudyArrays) -> dict[str, torch.Tensor]:
    """One study's arrays as a batch of one."""
    return {k: torch.from_numpy(getattr(st, k))[None] for k in ("images", "present", "stats")}


class SequenceRecipe(Recipe):
    """Shared 2D CNN per slice -> BiGRU over K slices -> vertebra, slice and patient logits (cls.models.SequenceNet)."""

    name = "sequence"

    @property
    def fitted(self) -> bool:
        """Whether the lucency statistics go through a regression fitted outside the network (else: joint)."""
        return self.model.lucency and self.model.feature_fit == "logistic"

    def fit_lucency(self, stats: torch.Tensor, present: torch.Tensor, labels: np.ndarray) -> LucencyModel | None:
        """The fold's feature model from its training studies (None when the recipe reads no statistics)."""
        if not self.model.lucency:
            return None
        return LucencyModel.fit(stats, present, labels if self.fitted else None, self.model.feature_c)

    def feature_inputs(
        self, lucency: LucencyModel | None, stats: torch.Tensor, present: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """What SequenceNet reads of the statistics: the fitted regression's logits as ``offset``, or the
        standardised statistics as ``features`` for its joint layer (no standardisation without a model)."""
        if not self.model.lucency:
            return {}
        if self.fitted:
            return {} if lucency is None else {"offset": lucency.logits(stats, present)}
        z = (lucency or LucencyModel.identity()).standardise(stats, present)
        return {"features": z.reshape(*present.shape, -1)}

    def step(self, net: nn.Module, batch: dict[str, torch.Tensor], lucency: LucencyModel | None = None) -> StepResult:
        out = net(batch["images"], batch["present"], **self.feature_inputs(lucency, batch["stats"], batch["present"]))
        core = getattr(net, "module", net)
        joint = not self.fitted  # a fitted path is fixed: nothing to supervise or penalise
        loss = sequence_loss(out, batch, self.model.aux_weight, self.model.feature_weight if joint else 0.0)
        head = core.feature_head if joint and self.model.feature_l2 > 0 else None
        if head is not None:
            loss = loss + self.model.feature_l2 * head.weight.pow(2).sum()
        with torch.no_grad():
            logits = torch.cat([out["patient"][:, None], out["vertebra"]], dim=1)
            correct = float(((logits > 0) == (batch["labels"] > 0.5)).float().sum())
        k = batch["images"].shape[2]
        return StepResult(loss, int(batch["present"].sum()) * k, correct, int(batch["labels"].numel()))

    @torch.no_grad()
    def forward(self, folds: Sequence[Fold], batch: dict[str, torch.Tensor], device: torch.device):
        """The fold ensemble on one batch: patient (B,), vertebra (B, 7) and slices (B, 7, K) logits, averaged over
        folds and the views of ``tta`` (ModelConfig), and ``features`` (B, 7): the statistics path's share of the
        vertebra logits."""
        images, present, stats = (batch[k].to(device) for k in ("images", "present", "stats"))
        views = [images, images.flip(-1)] if self.model.tta == "flip" else [images]
        outs = []
        encoded: dict[tuple[int, int], torch.Tensor] = {}  # folds sharing one network (share_networks) encode once
        for f in folds:
            extra = self.feature_inputs(f.lucency, stats, present)
            for i, view in enumerate(views):
                with _autocast(device):
                    if (id(f.net), i) not in encoded:
                        encoded[id(f.net), i] = f.net.encode(view, present)
                    out = f.net(view, present, encoded=encoded[id(f.net), i], **extra)
                outs.append({k: v.float() for k, v in out.items()})
        keys = ("patient", "vertebra", "slices", "features")
        return {k: torch.stack([o[k] for o in outs]).mean(0).cpu().numpy() for k in keys}

    def predict(self, folds: Sequence[Fold], ds: Dataset, device: torch.device, batch_size: int):
        """Averaged logits of every study of ``ds`` (StudyDataset) + present (n, 7) and store rows (n,)."""
        for f in folds:
            f.net.eval()
        keys = ("patient", "vertebra", "slices", "features", "present", "rows")
        acc: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        for batch in DataLoader(ds, batch_size=batch_size, shuffle=False):
            for k, v in self.forward(folds, batch, device).items():
                acc[k].append(v)
            acc["present"].append(batch["present"].numpy())
            acc["rows"].append(batch["row"].numpy())
        return {k: np.concatenate(v) for k, v in acc.items()}

    def aggregate(self, pred: dict[str, np.ndarray]) -> np.ndarray:
        """(n, 8) probabilities from :meth:`predict`'s (or :meth:`forward`'s + present) logits."""
        return sequence_probs(pred["patient"], pred["vertebra"], pred["present"], self.model.patient_from)

    def load_fold(self, path: Path, device: torch.device) -> Fold:
        fold = super().load_fold(path, device)
        lucency_path = path.with_suffix(".features.json")
        if self.model.lucency:
            if not lucency_path.exists():
                from cspine.bundle import BundleError

                raise BundleError(f"{path.parent}: {lucency_path.name} is missing (a classifier from before cspine "
                                  "saved its lucency model apart; retrain it with `cspine train-cls`)")  # fmt: skip
            fold.lucency = LucencyModel.load(lucency_path)
        return fold

    def predict_study(self, folds: Sequence[Fold], st: StudyArrays, device: torch.device):
        out = self.forward(folds, _study_batch(st), device)
        probs = self.aggregate({**out, "present": st.present[None]})
        return probs[0], sigmoid(out["slices"][0])

    def logit_parts(self, folds: Sequence[Fold], st: StudyArrays, device: torch.device) -> dict[str, np.ndarray]:
        out = self.forward(folds, _study_batch(st), device)
        missing = np.where(st.present, 0.0, np.nan)
        share = out["features"][0]
        return {"network": out["vertebra"][0] - share + missing, "statistics": share + missing}

    def train(self, cfg: TrainConfig, rt: Runtime, store: StudyStore, progress: bool, timings: dict[str, float]):
        from cspine.cls.train_folds import train_folds

        return train_folds(self, cfg, rt, store, progress, timings)


# ----------------------------------------------------------------------------------------------------------------------
# seed-baseline
# ----------------------------------------------------------------------------------------------------------------------


class SeedBaselineRecipe(Recipe):
    """Seven per-vertebra image classifiers (cls.models.SeedBaseline), each trained on its vertebra's images."""

    name = "seed-baseline"

    def step(self, net: nn.Module, batch: dict[str, torch.Tensor]) -> StepResult:
        logits = net(batch["image"]).float()
        loss = F.binary_cross_entropy_with_logits(logits, batch["label"].float())
        correct = float(((logits.detach() > 0) == (batch["label"] > 0.5)).float().sum())
        return StepResult(loss, int(batch["image"].shape[0]), correct, int(batch["image"].shape[0]))

    @torch.no_grad()
    def forward(self, nets: Sequence[nn.Module], images: torch.Tensor, device: torch.device) -> np.ndarray:
        """P(fractured) of each image (N, C, S, S), averaged over ``nets`` (one vertebra's net of each fold)."""
        runs = []
        for net in nets:
            with _autocast(device):
                runs.append(torch.sigmoid(net(images.to(device)).float()))
        return torch.stack(runs).mean(0).cpu().numpy()

    def predict(self, net: nn.Module, ds: Dataset, device: torch.device, batch_size: int):
        """Probabilities of every image of ``ds`` (ImageDataset) and the image rows they belong to."""
        net.eval()
        probs, rows = [], []
        for batch in DataLoader(ds, batch_size=batch_size, shuffle=False):
            probs.append(self.forward([net], batch["image"], device))
            rows.append(batch["row"].numpy())
        if not probs:
            return np.zeros(0), np.zeros(0, np.int64)
        return np.concatenate(probs), np.concatenate(rows)

    @staticmethod
    def aggregate(image_probs: Sequence[np.ndarray | None]) -> np.ndarray:
        """(8,) study probabilities from each vertebra's image probabilities (None: the mask lacks it): a vertebra's
        is the mean over its images (the prevalence when absent), the patient's 1 - prod(1 - p_Ci)."""
        pv = PRIOR.copy()
        for i, p in enumerate(image_probs):
            if p is not None and len(p):
                pv[i] = float(np.mean(p))
        return np.concatenate([noisy_or(pv[None]), pv])

    def predict_study(self, folds: Sequence[Fold], st: StudyArrays, device: torch.device):
        images = torch.from_numpy(st.images)
        slices = np.zeros(st.slice_labels.shape, np.float64)
        per: list[np.ndarray | None] = [None] * len(CERVICAL)
        for i, v in enumerate(CERVICAL):
            if st.present[i]:
                slices[i] = self.forward([f.net.nets[v] for f in folds], images[i], device)
                per[i] = slices[i]
        return self.aggregate(per), slices

    def train(self, cfg: TrainConfig, rt: Runtime, store: StudyStore, progress: bool, timings: dict[str, float]):
        from cspine.cls.train_seed import train_seed

        return train_seed(self, cfg, rt, store, progress, timings)


#: The registry: recipe name -> class (the names and their default settings are cspine.cls.config.RECIPES).
RECIPE_CLASSES: dict[str, type[Recipe]] = {c.name: c for c in (SequenceRecipe, SeedBaselineRecipe)}
assert set(RECIPE_CLASSES) == set(RECIPES), "every recipe name needs a class and every class a name"


def get_recipe(name: str, model: ModelConfig, crop: CropConfig) -> Recipe:
    """The recipe called ``name``; an unknown name lists the valid ones."""
    if name not in RECIPE_CLASSES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {', '.join(RECIPE_CLASSES)}")
    return RECIPE_CLASSES[name](model, crop)


__all__ = ["RECIPE_CLASSES", "Fold", "Recipe", "SeedBaselineRecipe", "SequenceRecipe", "get_recipe", "noisy_or",
           "sequence_loss", "sequence_probs"]  # fmt: skip
