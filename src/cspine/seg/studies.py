"""Where segmentation studies come from: a prepared cache or an RSNA-layout folder (for training and evaluation),
or any study path for inference. Nothing is read until a study is loaded.

Apart from the model grid (:mod:`cspine.seg.grid`) and training patches (:mod:`cspine.seg.patches`) because it
is about files, not arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cspine.io.volume import Volume


@dataclass(frozen=True)
class StudyRef:
    """A study in a prepared cache or an RSNA-layout folder; nothing is read until :meth:`load`."""

    uid: str
    split: str
    path: Path
    kind: str  # "cache" | "rsna"
    mask_path: Path | None = None

    @property
    def has_mask(self) -> bool:
        return self.mask_path is not None

    def load(self, with_mask: bool = True) -> tuple[Volume, np.ndarray | None]:
        """(volume, mask on the volume's grid or None); a mask that does not line up is an error naming both."""
        from cspine.data.cache import load_prepared
        from cspine.io import load_segmentation, load_series

        if self.kind == "cache":
            st = load_prepared(self.path)
            vol, mask = st.volume, (st.mask if with_mask else None)
        else:
            vol = load_series(self.path)
            mask = load_segmentation(self.mask_path, vol) if with_mask and self.mask_path else None
        if mask is not None and mask.shape != vol.shape:
            raise ValueError(
                f"{self.path}: mask shape {mask.shape} differs from volume shape {vol.shape}; "
                f"re-run cspine prepare or check {self.mask_path}"
            )
        return vol, mask


def discover_studies(data: Path, split: str = "train") -> list[StudyRef]:
    """Studies of a split in a prepared cache (``cspine prepare``) or an RSNA-layout folder, sorted by UID."""
    from cspine.data.cache import MASK_FILE, META_FILE, prepared_studies

    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"{data}: no such file or folder")
    if (data / META_FILE).exists():  # one prepared study
        return [StudyRef(data.name, split, data, "cache", data / MASK_FILE if (data / MASK_FILE).exists() else None)]
    dirs = prepared_studies(data, split)
    if dirs:
        return [StudyRef(d.name, split, d, "cache", d / MASK_FILE if (d / MASK_FILE).exists() else None) for d in dirs]
    if (data / f"{split}_images").is_dir():
        from cspine.data.rsna import RsnaDataset

        ds = RsnaDataset(data)
        return [
            StudyRef(
                uid, split, ds.study_dir(split, uid), "rsna", ds.segmentation_path(uid) if split == "train" else None
            )
            for uid in ds.study_uids(split)
        ]
    raise ValueError(
        f"{data}: no {split!r} studies found; expected a prepared cache ({split}/<uid>/meta.json, see cspine prepare) "
        f"or an RSNA-layout folder ({split}_images/<uid>/)"
    )


def load_study_volume(path: Path) -> Volume:
    """A study for inference: DICOM folder / zip / file, NIfTI volume, or prepared study folder."""
    from cspine.data.cache import META_FILE, load_prepared
    from cspine.io import load_study

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir() and (path / META_FILE).exists():
        return load_prepared(path).volume
    return load_study(path)
