"""One split of a dataset's studies into folds, written once (``DATA/splits.json``) and read by both learning stages.

Why one file: the segmenter and the classifier must agree on which studies a fold holds out, or the classifier is
trained and evaluated on masks from a segmenter that trained on the same studies. A study is in exactly one fold;
folds are label-stratified over the split's studies (cspine.cls.folds: studies without labels count as negative)
and fixed by (split, folds, seed). The first stage to ask writes the assignment; every later run reads it, so
adding studies to the data never moves the ones already assigned (a study the file lacks is an error that says so).

Example::

    from cspine.data.splits import study_folds
    folds = study_folds(Path("cache"), "train", folds=5, seed=0)     # {uid: fold}
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cspine.errors import ConfigError
from cspine.labels import PREDICTION_TYPES

SPLITS_FILE = "splits.json"


def _labelled_studies(data: Path, split: str) -> tuple[list[str], np.ndarray]:
    """Sorted UIDs of a split (prepared cache or RSNA folder) and their (n, 8) labels (zeros when unknown)."""
    from cspine.data.cache import load_prepared, prepared_studies

    dirs = prepared_studies(data, split)
    if dirs:
        labels = {d.name: load_prepared(d, with_volume=False).labels or {} for d in dirs}
    else:
        from cspine.data.rsna import RsnaDataset

        ds = RsnaDataset(data)
        known = ds.train_labels() if split == "train" and (data / "train.csv").exists() else {}
        labels = {u: known.get(u, {}) for u in ds.study_uids(split)}
    uids = sorted(labels)
    y = np.array([[float(labels[u].get(t, 0)) for t in PREDICTION_TYPES] for u in uids], np.float32)
    return uids, y.reshape(len(uids), len(PREDICTION_TYPES))


def study_folds(data: Path, split: str, folds: int, seed: int) -> dict[str, int]:
    """Study -> fold of ``data``'s ``split``: read from ``data/splits.json``, computed and written on first use."""
    from cspine.cls.folds import make_folds
    from cspine.runtime import write_json

    path = Path(data) / SPLITS_FILE
    key = f"{split}/{folds}-folds/seed-{seed}"
    saved = json.loads(path.read_text()) if path.exists() else {}
    if key not in saved:
        uids, y = _labelled_studies(Path(data), split)
        if len(uids) < folds:
            raise ConfigError(f"{data}: {len(uids)} {split} studies cannot fill {folds} folds")
        saved[key] = {u: int(f) for u, f in zip(uids, make_folds(y, folds, seed), strict=True)}
        write_json(path, saved)  # atomic; ranks that race write the same content
    return dict(saved[key])


def fold_members(data: Path, split: str, folds: int, seed: int, uids: list[str]) -> dict[str, int]:
    """:func:`study_folds` for ``uids`` only; a study the split file lacks is an error naming the file."""
    mapping = study_folds(data, split, folds, seed)
    missing = [u for u in uids if u not in mapping]
    if missing:
        raise ConfigError(
            f"{Path(data) / SPLITS_FILE}: {len(missing)} studies are not in its {folds}-fold split "
            f"(e.g. {missing[0]}); they were added after the split was written: delete the file to re-split "
            "(earlier models then no longer match its folds)"
        )
    return {u: mapping[u] for u in uids}


__all__ = ["SPLITS_FILE", "fold_members", "study_folds"]
