"""Configuration of the segmentation stage: frozen dataclasses, saved with every model and output.

Why one place: the model directory must be enough to predict (style guide: config is data). The resolved
:class:`TrainSegConfig` is written to ``MODEL_DIR/config.json``; inference reads the model name, the class list
and the :class:`PreprocessConfig` back from there, so a model can never be fed an image prepared differently from
the ones it was trained on. Nothing here imports torch.

Classes of the network (index -> meaning) are fixed: 0 background, 1..7 C1..C7, 8 "other vertebra" (T1 and below,
or any vertebra a mask labels outside C1..C7). In written masks C1..C7 keep the project values 1..7 and "other" is
written as :data:`OTHER_VALUE` (not 8, which would claim it is T1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cspine.engine.formats import check_format
from cspine.errors import ConfigError
from cspine.labels import CERVICAL, CERVICAL_VALUES

#: Network output classes, index = class id.
CLASSES: tuple[str, ...] = ("background", *CERVICAL, "other")
OTHER_CLASS = len(CLASSES) - 1
#: Classes of the refinement stage: any vertebra (C1..C7 or other) against everything else.
REFINE_CLASSES: tuple[str, ...] = ("background", "vertebra")
#: Training stages (``TrainSegConfig.stage``) and the classes each network predicts.
STAGE_CLASSES: dict[str, tuple[str, ...]] = {"coarse": CLASSES, "refine": REFINE_CLASSES}
#: Sub-directory of a (coarse) model directory holding its refinement model.
REFINE_DIR = "refine"
#: Mask value written for "other vertebra" (outside the project's named values 1..28, so it is not mistaken for T1).
OTHER_VALUE = 255
#: Class id -> value in written masks.
CLASS_TO_VALUE: tuple[int, ...] = (0, *CERVICAL_VALUES, OTHER_VALUE)
#: major.minor of MODEL_DIR/config.json (cspine.engine.formats); 1.1 adds the network's ``arch_args``; 1.2 the
#: files of the schema shared with the classifier (cspine.engine.model_dir: model.pt, model.history.json,
#: work/model.state.pt instead of best.pt, last.pt, log.json). 1.0 and 1.1 directories are still read.
CONFIG_FORMAT = "1.2"
#: The run name of a segmentation stage in its model directory (its weights are MODEL_DIR/model.pt).
RUN_NAME = "model"


@dataclass(frozen=True)
class PreprocessConfig:
    """How a CT becomes network input; identical in training and inference.

    Attributes:
        spacing: (dz, dy, dx) mm of the model grid in canonical orientation (axis 0 inferior->superior,
            1 anterior->posterior, 2 right->left). 2 mm by default: a whole small study (or the neck of a
            full one) is ~90x100x100 voxels, so CPU training gets thousands of steps in minutes. The rim, which
            a 2 mm grid cannot place, is left to the refinement stage (1.25 mm, :data:`REFINE_RECIPE`).
        window_level, window_width: HU window mapped to [0, 1] (default: bone window).
        antialias: average over the source voxels a model voxel covers when downsampling (thin-slice 0.3 mm
            studies would otherwise alias their noise into the 2 mm grid).
        divisor: network input sides are padded to a multiple of this (2 ** number of downsamplings).
    """

    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    window_level: float = 400.0
    window_width: float = 1800.0
    antialias: bool = True
    divisor: int = 16

    def __post_init__(self) -> None:
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ConfigError(f"spacing must be three positive mm values, got {self.spacing}")
        if self.window_width <= 0:
            raise ConfigError(f"window_width must be positive, got {self.window_width}")
        if self.divisor < 1:
            raise ConfigError(f"divisor must be >= 1, got {self.divisor}")


@dataclass(frozen=True)
class AugmentConfig:
    """Random augmentation of training patches (seeded; no flips: a mirrored spine would swap identities)."""

    p_affine: float = 0.8
    rotate_deg: tuple[float, float, float] = (15.0, 10.0, 10.0)  # about the S-I, A-P, L-R axes
    scale: tuple[float, float] = (0.85, 1.15)
    scale_jitter: float = 0.05  # extra independent scale per axis, 1 +- jitter
    p_intensity: float = 0.8
    contrast: float = 0.15  # multiply by 1 +- contrast
    brightness: float = 0.05  # add +- brightness
    gamma: tuple[float, float] = (0.8, 1.25)
    noise_std: float = 0.03  # Gaussian noise, std drawn from [0, noise_std]
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.4, 1.0)  # voxels


@dataclass(frozen=True)
class RandomizeConfig:
    """Probabilities and ranges of each transform (each is applied with its probability, in the order listed)."""

    p_crop: float = 0.3
    crop_keep: tuple[float, float] = (0.5, 1.0)  # fraction of each axis kept
    p_intensity: float = 0.8
    intensity_scale: tuple[float, float] = (0.7, 1.3)  # per knot, multiplies the knot's HU distance from water
    intensity_shift_hu: float = 60.0  # per knot, sd of an added shift
    p_bias: float = 0.3
    bias_coeff: float = 0.3  # Legendre coefficients of log-field drawn in [-c, c]
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    p_blur: float = 0.3
    blur_mm: tuple[float, float] = (0.3, 1.5)
    p_resolution: float = 0.3
    resolution_mm: tuple[float, float] = (1.0, 5.0)  # simulated voxel size per axis (never finer than the input)
    p_noise: float = 0.5
    noise_hu: tuple[float, float] = (2.0, 60.0)
    pad_hu: tuple[float, ...] = (-1024.0, -2048.0, 0.0)  # what lies beyond a cut field of view (training patches)


@dataclass(frozen=True)
class PostprocessConfig:
    """Clean-up of predicted label maps.

    Attributes:
        min_volume_mm3: a vertebra with less than this is reported absent (and removed).
        keep_largest: keep the largest connected component per C1..C7 label; other pieces go to the
            neighbouring vertebra they touch most, else to background.
        fix_order: relabel C1..C7 so that their centroids run from superior to inferior.
        keep_other: keep the "other vertebra" class in the output mask (as :data:`OTHER_VALUE`).
    """

    min_volume_mm3: float = 100.0
    keep_largest: bool = True
    fix_order: bool = True
    keep_other: bool = True


@dataclass(frozen=True)
class TrainSegConfig:
    """Everything ``cspine train-seg`` does; the resolved copy is saved as MODEL_DIR/config.json.

    Attributes:
        data: prepared cache (``cspine prepare``) or RSNA-layout folder; None when studies are passed in memory.
        out: MODEL_DIR (a refinement stage goes to MODEL_DIR/refine of the coarse model it refines).
        stage: "coarse": C1..C7 + other on a coarse grid (identities need context: the whole neck in one field of
            view). "refine": vertebra vs background on a finer grid, on patches; at inference it decides which
            voxels are bone and the coarse stage only says which vertebra (93 % of the coarse stage's errors are
            on the one-voxel rim, which a 2 mm grid cannot place).
        arch: model name from :data:`cspine.seg.models.MODELS`.
        split: split holding the masks.
        fold, folds: validation fold of a split grouped by study (fold -1: train on all, no validation;
            the last checkpoint is then also the best).
        epochs: training epochs (rerun with more to continue).
        iters_per_epoch: optimiser steps per epoch (per process).
        batch_size: patches per step and process.
        patch: training patch (z, y, x) in model-grid voxels.
        lr, weight_decay, warmup_iters, lr_floor: AdamW's peak learning rate and weight decay; linear warm-up
            steps, then cosine decay to ``lr_floor`` x the peak.
        val_every: validate every this many epochs (and after the last).
        patience: stop after this many validated epochs without a better validation Dice (0: never).
        fg_fraction: share of patches centred on a vertebra voxel (class-balanced) rather than anywhere.
        soft_labels: train on class shares (partial-volume fractions on the model grid) instead of hard labels.
            Their round trip caps Dice higher than hard 2 mm labels, but in a short CPU run the network, not the
            targets, limits Dice (docs/segmentation.md, Measured), so hard labels stay the default.
        threads: torch CPU threads per process (None: torch's default). On a shared machine 1 can be faster than
            2: OpenMP threads spin while waiting for a core another job holds.
        max_studies: use at most this many studies with masks (smoke runs).
        cervical_box_mm: train on the box around C1..C7 plus this margin (mm) only, skipping studies without
            them (None: whole studies). For the refinement stage, which at inference only sees the box around the
            coarse C1..C7: whole chest and abdomen fields of view on its fine grid cost minutes and gigabytes.
        randomize: domain-randomise every training patch (tissue intensities, bias field, gamma, blur,
            resolution, noise, field-of-view edges; ranges in ``randomization``), so that real scanners are one
            more variation of the generated studies.
        seed: seed of folds, initialisation and patch sampling.
        device: auto, cpu, cuda or cuda:N (DDP under torchrun).
        init: start from this segmenter's weights instead of a random initialisation (a model directory of the
            same stage and network, e.g. the shipped one; its refine/ for the refinement stage), to fine-tune it
            on other data with this run's schedule; a resumed run continues from its own state.
        lucent_weight: weight of an extra cross-entropy term on the voxels darker than ``lucent_hu`` inside a
            vertebra (not on its rim): fracture lines and gaps. They are a fraction of a percent of a vertebra,
            so Dice and plain cross-entropy let a segmenter leave them out, and a mask without them hides the
            fracture from the classifier's statistics (benchmarks/cls_results.md). The dark voxels against a
            vertebra (soft tissue) get the same weight as background, or the masks grow into them. 0: off.
        lucent_fraction: share of patch centres drawn on a study's lucent voxels, where it has any.
        lucent_hu: the HU below which a vertebra voxel is lucent (intact generated bone stays above it on the
            model grid).
    """

    data: Path | None = None
    out: Path = Path("seg_model")
    stage: str = "coarse"
    arch: str = "unet"
    split: str = "train"
    fold: int = 0
    folds: int = 5
    epochs: int = 24
    iters_per_epoch: int = 100
    batch_size: int = 2
    patch: tuple[int, int, int] = (80, 64, 64)
    lr: float = 1e-2
    weight_decay: float = 1e-4
    warmup_iters: int = 50
    lr_floor: float = 0.01
    fg_fraction: float = 0.8
    soft_labels: bool = False
    val_every: int = 1
    patience: int = 20
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    max_studies: int | None = None
    cervical_box_mm: float | None = None
    randomize: bool = False
    init: Path | None = None
    lucent_weight: float = 0.0
    lucent_fraction: float = 0.0
    lucent_hu: float = 150.0
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    randomization: RandomizeConfig = field(default_factory=RandomizeConfig)

    def __post_init__(self) -> None:
        if self.stage not in STAGE_CLASSES:
            raise ConfigError(f"stage must be one of {', '.join(STAGE_CLASSES)}, got {self.stage!r}")
        if self.folds < 2 and self.fold >= 0:
            raise ConfigError(f"--folds must be >= 2 to hold out a fold (got {self.folds}); use --fold -1 for none")
        if self.fold >= self.folds:
            raise ConfigError(f"--fold {self.fold} out of range for --folds {self.folds} (0..{self.folds - 1}, or -1)")
        if self.fold < -1:
            raise ConfigError(f"--fold must be -1 (no validation) or 0..{self.folds - 1}, got {self.fold}")
        for name in ("epochs", "iters_per_epoch", "batch_size", "val_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if any(p < 8 for p in self.patch) or len(self.patch) != 3:
            raise ConfigError(f"patch must be three sides >= 8 voxels, got {self.patch}")
        if any(p % self.preprocess.divisor for p in self.patch):
            raise ConfigError(f"patch sides {self.patch} must be multiples of {self.preprocess.divisor}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        for name in ("fg_fraction", "lucent_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.lucent_weight < 0:
            raise ConfigError(f"lucent_weight must be >= 0, got {self.lucent_weight}")


#: What ``stage="refine"`` changes from the coarse defaults (the measured recipe, docs/segmentation.md): a slim
#: full-resolution network on 48^3 patches of a 1.25 mm grid (60 mm of context, ~0.2 s per CPU step), 6,000 steps
#: (3,000 steps with centres not balanced over vertebrae scored 0.007-0.009 lower on the val studies).
REFINE_RECIPE: dict[str, Any] = {
    "arch": "unet-fine",
    "patch": (48, 48, 48),
    "epochs": 60,
    "preprocess": {"spacing": (1.25, 1.25, 1.25)},
}

#: Fields that may change when a run is resumed (they do not change what the saved checkpoint means).
RESUMABLE_FIELDS = ("data", "out", "epochs", "patience", "device", "threads", "val_every")


def load_model_config(model_dir: Path) -> dict[str, Any]:
    """Read MODEL_DIR/config.json (the resolved training config plus model facts)."""
    path = model_dir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{model_dir}: not a segmentation model directory (no config.json)")
    data = json.loads(path.read_text())
    check_format(data.get("format"), CONFIG_FORMAT, f"{path}: segmentation model", "retrain it with `cspine train-seg`")
    if "train" not in data:
        raise ConfigError(f"{path}: unsupported model config (no training config)")
    return data
