"""Configuration of the fracture classification stage: crops, models, recipes, training. Torch-free.

Why one module: every name the stage knows (recipes, encoders, split modes) is defined here once, so CLI
``choices=``, error messages and the saved ``config.json`` of a model directory can never disagree. The resolved
config travels with every model directory, so the directory alone is enough to rebuild crops and models.

Example::

    from pathlib import Path
    from cspine.cls.config import resolve_train_config
    cfg = resolve_train_config("sequence", data=Path("cache"), out=Path("model"), overrides={"epochs": 3})
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cspine.engine.config import from_dict, to_dict
from cspine.engine.formats import check_format
from cspine.errors import ConfigError

#: Bump when the crop arrays change meaning; old caches are then rebuilt instead of misread.
CROP_FORMAT = 2
#: major.minor of the model directory (cspine.engine.formats): 4.0 saves the lucency model apart
#: (fold{k}.features.json); older directories keep it inside the network's weights and are refused. 4.1: the
#: files of the schema shared with the segmenter (cspine.engine.model_dir: weights under "model", not
#: "state_dict"; config.json with the network and the config under "train"; both layouts are read).
MODEL_DIR_FORMAT = "4.1"


@dataclass(frozen=True)
class CropConfig:
    """How one vertebra becomes a stack of 2.5D images (K slices x C channels x S x S).

    Attributes:
        slices: K, slices sampled evenly across the vertebra's z-extent in the mask.
        size: S, in-plane side of each crop after resampling (pixels).
        margin: added on every side of the vertebra's in-plane box, as a fraction of the box's longer side.
        context: neighbouring slices on each side used as extra image channels (1 -> slices i-1, i, i+1).
        context_stride: step between those neighbours in slices (use 2-3 on sub-millimetre real CT).
        window: HU window name (cspine.io.volume.WINDOWS).
        mask_channel: append the vertebra's own mask as a last channel (tells the model which bone to judge).
        stats_region: where the lucency statistics are counted: "mask" (the vertebra's mask: right for ground
            truth and a good segmenter) or "bone" (bone read from the image, labelled by the nearest vertebra of
            the mask: cspine.features.bone_region; for a coarse segmenter's masks).
    """

    slices: int = 10
    size: int = 48
    margin: float = 0.1
    context: int = 1
    context_stride: int = 1
    window: str = "bone"
    mask_channel: bool = True
    stats_region: str = "mask"

    def __post_init__(self) -> None:
        if self.stats_region not in STATS_REGIONS:
            raise ConfigError(f"stats_region must be one of {', '.join(STATS_REGIONS)}, got {self.stats_region!r}")
        if self.slices < 1 or self.size < 8:
            raise ConfigError(f"crop slices must be >= 1 and size >= 8, got {self.slices} and {self.size}")
        if self.context < 0 or self.context_stride < 1 or self.margin < 0:
            raise ConfigError("crop context >= 0, context_stride >= 1 and margin >= 0 are required")

    @property
    def channels(self) -> int:
        """Image channels per slice: 2 * context + 1 windowed slices, plus the mask."""
        return 2 * self.context + 1 + int(self.mask_channel)

    def key(self, mask_source: str = "gt") -> str:
        """Short content key of the crop settings and the mask source; names the crop cache folder."""
        from cspine.features.config import FEATURES_VERSION  # the crops carry the lucency statistics

        text = json.dumps(
            {"format": CROP_FORMAT, "features": FEATURES_VERSION, "mask": mask_source, **asdict(self)}, sort_keys=True
        )
        return f"k{self.slices}-s{self.size}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


#: 2D encoders a recipe can use (built by cspine.cls.models.build_encoder).
ENCODERS: tuple[str, ...] = (
    "resnet10",
    "resnet18",
    "resnet34",
    "resnet50",
    "efficientnet-lite0",
    "efficientnet-b0",
    "efficientnet-b1",
    "efficientnet-b2",
    "efficientnet-b3",
)


@dataclass(frozen=True)
class ModelConfig:
    """The network. Sizes are config so the same recipe runs tiny on CPU and at winners' sizes on GPU.

    Attributes:
        encoder: 2D CNN per slice (one of ENCODERS).
        width: ResNet width multiplier (MONAI ``widen_factor``); 0.5 halves channels for CPU runs.
        stem_stride: stride of the first convolution (2 as on ImageNet; 1 keeps full resolution, 4x the cost).
        hidden: GRU hidden size (per direction) of the sequence model.
        embed: size of the vertebra identity embedding.
        dropout: before the heads.
        pretrained: a local file with ImageNet weights for the encoder (never downloaded).
        aux_weight: weight of the per-slice (bounding box) loss next to the metric-weighted loss.
        patient_from: final patient_overall: "head" (learned over the 7 vertebra features) or "noisy-or"
            (1 - prod(1 - p_Ci)); both are always reported.
        dense: hidden units of the seed baseline's Dense layer.
        pool: global pooling of the sequence encoder's feature map: "avg", "max" or "avgmax" (both, concatenated).
            A fracture is a few voxels of a vertebra, so "is it anywhere" (max) keeps a signal that a mean dilutes.
        density_bins: bins of the density histogram inside the vertebra mask, per slice and per vertebra, fed to the
            sequence model beside the CNN features (0 = off). A fracture is lucent bone: blood and soft tissue where
            the mask says bone (what it scores alone: benchmarks/cls_results.md).
        density_hu: HU range the histogram covers (below and above are clipped into the end bins).
        lucency: feed each vertebra's lucency statistics (cspine.features.lucency: dark voxels inside the mask, lines
            against the local median, volume, height), as they are and relative to the study's other vertebrae,
            into the linear feature path beside the density histogram.
        feature_fit: how the linear feature path is fitted. "logistic" (with lucency): the statistics only,
            through an L2 logistic regression (scikit-learn, C = feature_c) fitted on the training fold before the
            network trains, outside it (cspine.features.linear), its logits added to the network's; "joint":
            histogram and statistics through a linear layer trained with the network (feature_weight, feature_l2).
        feature_c: inverse L2 strength of the "logistic" fit.
        feature_weight: "joint" only: weight of the feature path's own metric-weighted loss (deep supervision),
            which keeps it fitted after the CNN has memorised the training positives.
        feature_l2: "joint" only: L2 penalty on the feature path's weights (sum of squares times this).
        tta: test-time augmentation of the network path where a trained fold predicts (out of fold and at
            inference; not the validation that picks its epoch, so it never changes the weights): "flip" averages
            its logits over the crops and their left-right mirror images (training flips crops too, so both are
            views it learned; twice the network's inference time), "none" reads the crops once.
    """

    encoder: str = "resnet18"
    width: float = 1.0
    stem_stride: int = 2
    hidden: int = 128
    embed: int = 16
    dropout: float = 0.2
    pretrained: str | None = None
    aux_weight: float = 0.3
    patient_from: str = "head"
    dense: int = 256
    pool: str = "avgmax"
    density_bins: int = 16
    density_hu: tuple[float, float] = (-100.0, 500.0)
    lucency: bool = True
    feature_fit: str = "logistic"
    feature_c: float = 0.3
    feature_weight: float = 3.0
    feature_l2: float = 0.0
    tta: str = "none"

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ConfigError(f"unknown encoder {self.encoder!r}; expected one of {', '.join(ENCODERS)}")
        if self.patient_from not in PATIENT_SOURCES:
            raise ConfigError(f"patient_from must be one of {', '.join(PATIENT_SOURCES)}, got {self.patient_from!r}")
        if self.pool not in POOLS:
            raise ConfigError(f"pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.density_bins < 0 or self.density_hu[0] >= self.density_hu[1]:
            raise ConfigError("density_bins must be >= 0 and density_hu an increasing (low, high) pair")
        if self.feature_fit not in FEATURE_FITS or self.feature_c <= 0:
            raise ConfigError(f"feature_fit must be one of {', '.join(FEATURE_FITS)} and feature_c > 0")
        if self.width <= 0 or self.stem_stride not in (1, 2):
            raise ConfigError("width must be > 0 and stem_stride 1 or 2")
        if self.tta not in TTA_MODES:
            raise ConfigError(f"tta must be one of {', '.join(TTA_MODES)}, got {self.tta!r}")


PATIENT_SOURCES: tuple[str, ...] = ("head", "noisy-or")
POOLS: tuple[str, ...] = ("avg", "max", "avgmax")
FEATURE_FITS: tuple[str, ...] = ("logistic", "joint")
STATS_REGIONS: tuple[str, ...] = ("mask", "bone")
TTA_MODES: tuple[str, ...] = ("none", "flip")
OPTIMIZERS: tuple[str, ...] = ("adam", "adamw")
SCHEDULES: tuple[str, ...] = ("cosine", "constant")

#: How studies are divided. "folds": study-grouped, label-stratified K-fold CV (out-of-fold predictions);
#: "study": one held-out fraction of studies; "image": the seed's random split over images (leaky, for comparison).
SPLITS: tuple[str, ...] = ("folds", "study", "image")


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``cspine train-cls`` does, saved as ``config.json`` in the model directory.

    Attributes:
        data: prepared cache folder with masks (cspine prepare --out).
        out: model directory (rerun the same command to resume).
        recipe: one of RECIPES; its defaults apply before the user's settings.
        crops_dir: crop cache root (default: DATA/crops).
        masks: folder of predicted masks <uid>.nii[.gz] for studies the cache has no mask for.
        masks_first: use the masks folder's mask even where the cache has a ground-truth one (train on the
            segmenter's masks, as predict will see them).
        split: folds (CV), study (hold-out) or image (the seed's leaky split).
        folds: number of study-grouped folds (split folds).
        fold: train only this fold (parallel runs).
        holdout: held-out fraction for split study/image.
        val_fraction: validation fraction of the training part (early stopping of the hold-out splits).
        init: a classifier model directory (``train-cls --out``; ``shipped`` at the CLI: the package's,
            cspine.cls.shipped) whose first fold's network every fold starts from instead of a new one; its network
            and crop settings must be this run's. With ``epochs`` 0 that network is used as it is, and only the
            lucency statistics' regression and the calibration are fitted (on the masks of this run).
        init_statistics: keep the ``init`` classifier's lucency regression too (its first fold's, fitted on its
            own training studies) instead of fitting one per fold on this run's studies: its network was trained
            on top of that regression, and one fitted on more studies ranks new studies better
            (benchmarks/cls_results.md, session 16). Only the calibration (and the network, with epochs) is
            fitted here then.
        epochs: training epochs per model.
        batch_size: studies (sequence) or images (seed-baseline) per step.
        lr: peak learning rate.
        weight_decay: optimiser weight decay.
        optimizer: adam or adamw.
        schedule: cosine (warm-up, then cosine to ``lr_floor``) or constant.
        lr_floor: where the cosine schedule ends, as a fraction of ``lr``.
        patience: early stopping patience (epochs).
        augment: seeded flips, shifts and contrast jitter of the crops.
        seed: seed of folds, initialisation and augmentation.
        device: auto, cpu, cuda or cuda:N (DDP under torchrun).
        workers: DataLoader workers.
        threads: torch CPU threads (0 = torch default).
        limit: at most this many studies (0 = all; quick runs).
        operating_sensitivity: sensitivity of the reported operating point.
    """

    data: Path
    out: Path
    recipe: str = "sequence"
    crop: CropConfig = field(default_factory=CropConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    crops_dir: Path | None = None
    masks: Path | None = None
    masks_first: bool = False
    split: str = "folds"
    folds: int = 5
    fold: int | None = None
    holdout: float = 0.33
    val_fraction: float = 0.15
    init: Path | None = None
    init_statistics: bool = False
    epochs: int = 12
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    schedule: str = "cosine"
    lr_floor: float = 0.02
    patience: int = 4
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    threads: int = 0
    limit: int = 0
    operating_sensitivity: float = 0.9

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {self.recipe!r}; expected one of {', '.join(RECIPES)}")
        if self.split not in SPLITS:
            raise ConfigError(f"unknown split {self.split!r}; expected one of {', '.join(SPLITS)}")
        if self.split == "image" and self.recipe != "seed-baseline":
            raise ConfigError("split 'image' (the seed's leaky split over images) exists only for seed-baseline")
        if self.split == "folds" and self.folds < 2:
            raise ConfigError(f"folds must be >= 2, got {self.folds}")
        if self.fold is not None and not (self.split == "folds" and 0 <= self.fold < self.folds):
            raise ConfigError(f"fold {self.fold} needs split 'folds' and 0 <= fold < {self.folds}")
        if not 0.05 <= self.holdout <= 0.8 or not 0.0 < self.val_fraction < 0.5:
            raise ConfigError("holdout must be in [0.05, 0.8] and val_fraction in (0, 0.5)")
        if self.epochs < (0 if self.init else 1) or self.batch_size < 1 or self.lr <= 0 or self.patience < 1:
            raise ConfigError("epochs (>= 0 with init), batch_size and patience must be >= 1 and lr > 0")
        if self.init is not None and (self.recipe != "sequence" or self.split != "folds"):
            raise ConfigError("init needs the sequence recipe with split 'folds'")
        fitted = self.model.lucency and self.model.feature_fit == "logistic"
        if self.init_statistics and (self.init is None or not fitted):
            raise ConfigError("init_statistics needs init and the lucency statistics' fitted regression")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0.0 < self.operating_sensitivity < 1.0:
            raise ConfigError("operating_sensitivity must be in (0, 1)")


@dataclass(frozen=True)
class Recipe:
    """A named training recipe: what it is for, and the settings it changes from the TrainConfig defaults."""

    name: str
    description: str
    defaults: dict[str, Any]


#: The registry of recipes. ``sequence`` is the default; ``seed-baseline`` reproduces the seed faithfully.
RECIPES: dict[str, Recipe] = {
    "sequence": Recipe(
        "sequence",
        "shared 2D CNN per slice -> BiGRU over K slices -> vertebra logit, per-slice box head, vertebra identity "
        "input, patient head over the 7 vertebrae; loss weighted as the competition metric; grouped K-fold CV",
        {
            "split": "folds",
            "optimizer": "adamw",
            "lr": 1e-3,
            "batch_size": 4,
            "epochs": 12,
            "patience": 4,
            # full-resolution stem and a strong box loss: the only setting that learned the fracture signal on
            # generated studies (benchmarks/cls_results.md)
            "model": {"stem_stride": 1, "aux_weight": 1.0},
        },
    ),
    "seed-baseline": Recipe(
        "seed-baseline",
        "the seed's recipe: per vertebra C1..C7 a separate ResNet50 -> Flatten -> Dense 256 ReLU -> Dense 1 sigmoid "
        "on single crop images; BCE; Adam 5e-4; early stopping on validation loss; 33 % held-out test split",
        {
            "split": "study",
            "optimizer": "adam",
            "schedule": "constant",
            "lr": 5e-4,
            "weight_decay": 0.0,
            "batch_size": 32,
            "epochs": 10,
            "patience": 3,
            "augment": False,
            "model": {"encoder": "resnet50"},
        },
    ),
}


def resolve_train_config(recipe: str, data: Path, out: Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Recipe defaults, then the user's overrides (type-checked; nested ``crop``/``model`` dicts allowed).

    Unknown keys are an error that lists the valid ones (a typo must not be silently ignored). With ``init``, the
    network and crop settings of that classifier come between the two (its weights need them).
    """
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; expected one of {', '.join(RECIPES)}")
    merged: dict[str, Any] = {}
    _deep_update(merged, RECIPES[recipe].defaults)
    if (overrides or {}).get("init"):  # the starting network's settings, unless the user sets them otherwise
        from cspine.cls.model_dir import load_config

        init = load_config(Path(overrides["init"]))  # type: ignore[index]
        _deep_update(merged, {"crop": asdict(init.crop), "model": {**asdict(init.model), "pretrained": None}})
    _deep_update(merged, overrides or {})
    crop = from_dict(CropConfig, merged.pop("crop", {}))
    model = from_dict(ModelConfig, merged.pop("model", {}))
    return from_dict(TrainConfig, {**merged, "data": data, "out": out, "recipe": recipe, "crop": crop, "model": model})


def _deep_update(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = dict(v) if isinstance(v, dict) else v


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """MODEL_DIR/config.json in the schema both stages share (cspine.engine.model_dir): format version, the
    network (recipe name; its model and crop settings) and the resolved config (paths as strings)."""
    from cspine.engine.model_dir import model_config

    arch_args = {"model": to_dict(cfg.model), "crop": to_dict(cfg.crop)}
    return model_config(MODEL_DIR_FORMAT, "cspine-cls", cfg.recipe, arch_args, to_dict(cfg))


def config_from_dict(d: dict[str, Any], where: str = "classifier model directory") -> TrainConfig:
    """Inverse of :func:`config_to_dict`, its format checked (4.0 directories kept the config at the top level)."""
    from cspine.engine.model_dir import training_config

    hint = "retrain it with `cspine train-cls`"
    check_format(d.get("format", MODEL_DIR_FORMAT), MODEL_DIR_FORMAT, where, hint)
    return from_dict(TrainConfig, training_config(d))


def with_overrides(cfg: TrainConfig, **kw: Any) -> TrainConfig:
    """A copy with some top-level fields replaced (validated again by __post_init__)."""
    return replace(cfg, **kw)
