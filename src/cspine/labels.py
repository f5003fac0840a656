"""Vertebra labels, mask values and RSNA prediction types, defined once.

Every other module (CLI choices, CSV columns, mask decoding, error messages) reads
these names from here so that C1..C7 can never drift between stages.
"""

from __future__ import annotations

import numpy as np

from cspine.errors import ConfigError, CspineInputError

CERVICAL: tuple[str, ...] = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
THORACIC: tuple[str, ...] = tuple(f"T{i}" for i in range(1, 13))

#: Mask value -> vertebra name (RSNA / VerSe / project convention: 1..7 = C1..C7, 8..19 = T1..T12).
LABEL_NAMES: dict[int, str] = {i + 1: name for i, name in enumerate(CERVICAL + THORACIC)}
#: Vertebra name -> mask value.
LABEL_VALUES: dict[str, int] = {name: value for value, name in LABEL_NAMES.items()}

#: Mask values of the cervical vertebrae, in cranio-caudal order.
CERVICAL_VALUES: tuple[int, ...] = tuple(LABEL_VALUES[name] for name in CERVICAL)

PATIENT = "patient_overall"
#: The RSNA 2022 targets, in train.csv column order.
PREDICTION_TYPES: tuple[str, ...] = (PATIENT, *CERVICAL)

#: RSNA 2022 training-label prevalence (train.csv, 2,019 studies); the fallback prediction.
PREVALENCE: dict[str, float] = {
    PATIENT: 0.476,
    "C1": 0.072,
    "C2": 0.141,
    "C3": 0.036,
    "C4": 0.053,
    "C5": 0.080,
    "C6": 0.137,
    "C7": 0.195,
}

#: Competition metric weights (negative, positive) per target.
METRIC_WEIGHTS: dict[str, tuple[float, float]] = {
    PATIENT: (7.0, 14.0),
    **{name: (1.0, 2.0) for name in CERVICAL},
}


def row_id(study_uid: str, prediction_type: str) -> str:
    """The Kaggle submission row id, e.g. ``1.2.3_C5``."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")
    return f"{study_uid}_{prediction_type}"


def split_row_id(rid: str) -> tuple[str, str]:
    """Inverse of :func:`row_id`: ``"1.2.3_patient_overall"`` -> ``("1.2.3", "patient_overall")``."""
    for ptype in PREDICTION_TYPES:
        suffix = "_" + ptype
        if rid.endswith(suffix):
            return rid[: -len(suffix)], ptype
    raise ValueError(f"row_id {rid!r} does not end in _<prediction_type> ({', '.join(PREDICTION_TYPES)})")


def label_name(value: int) -> str:
    """Name of a mask value; unknown values are reported as ``label<N>``."""
    return LABEL_NAMES.get(int(value), f"label{int(value)}")


def _totalsegmentator_lut() -> np.ndarray:
    """TotalSegmentator v2 "total" task -> project values (50..32 = C1..T12 -> 1..19; 31..27 = L1..L5 -> 20..24;
    26 = S1 and 25 = sacrum -> 26 sacrum; everything else, organs included -> 0)."""
    lut = np.zeros(256, dtype=np.uint8)
    for ts in range(32, 51):
        lut[ts] = 51 - ts
    for ts in range(27, 32):
        lut[ts] = 20 + (31 - ts)
    lut[25] = lut[26] = 26
    return lut


#: Label conventions a user's vertebra mask may come in -> uint8 lookup table onto project values. RSNA's
#: segmentations and VerSe / TPTBox masks already use the project's values (1..7 = C1..C7, 8..19 = T1..T12,
#: 20..25 = L1..L6, 26 = sacrum, 28 = T13).
MASK_CONVENTIONS: dict[str, np.ndarray] = {
    "rsna": np.arange(256, dtype=np.uint8),
    "verse": np.arange(256, dtype=np.uint8),
    "totalsegmentator": _totalsegmentator_lut(),
}
#: Older names kept for ``eval-seg --pred-labels/--truth-labels``.
MASK_CONVENTION_ALIASES: dict[str, str] = {"project": "rsna", "totalseg": "totalsegmentator"}


def to_project_labels(mask: np.ndarray, convention: str) -> np.ndarray:
    """Map a label mask of a named convention (:data:`MASK_CONVENTIONS` or an alias) onto project values."""
    name = MASK_CONVENTION_ALIASES.get(convention, convention)
    if name not in MASK_CONVENTIONS:
        valid = ", ".join([*MASK_CONVENTIONS, *MASK_CONVENTION_ALIASES])
        raise ConfigError(f"unknown label convention {convention!r}; valid: {valid}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise CspineInputError(f"label values {mask.min()}..{mask.max()} do not fit 0..255")
    return MASK_CONVENTIONS[name][mask.astype(np.uint8, copy=False)]
