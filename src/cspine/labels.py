"""Vertebra labels, mask values and RSNA prediction types, defined once.

Every other module (CLI choices, CSV columns, mask decoding, error messages) reads
these names from here so that C1..C7 can never drift between stages.
"""

from __future__ import annotations

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
