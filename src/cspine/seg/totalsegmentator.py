"""C1..C7 from TotalSegmentator, where it and its weights are installed (``cspine segment --engine totalsegmentator``).

Why: TotalSegmentator was trained on 1,200+ real CTs; where a user already has it, its vertebrae are a stronger
starting point on real scans than a segmenter trained on generated data. It is an optional extra (it brings its
own dependencies and downloads weights on first use), so nothing here is imported unless the engine is chosen.
The CT goes to it as a NIfTI on the study's grid and the label map comes back through the same affine-based
alignment every mask uses; its values are mapped by the ``totalsegmentator`` convention of :mod:`cspine.labels`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from cspine.errors import UsageError
from cspine.io.volume import Volume
from cspine.labels import CERVICAL, to_project_labels

#: Segmentation engines of ``cspine segment --engine``: cspine's own network, or TotalSegmentator where installed.
ENGINES: tuple[str, ...] = ("cspine", "totalsegmentator")
#: TotalSegmentator's class names for the cervical vertebrae (its "total" task).
ROI_SUBSET: tuple[str, ...] = tuple(f"vertebrae_{name}" for name in CERVICAL)
INSTALL_HINT = (
    "--engine totalsegmentator needs TotalSegmentator and its weights (pip install TotalSegmentator, then run it "
    "once online or point TOTALSEG_HOME_DIR at downloaded weights); without it use the default engine"
)


def totalsegmentator_available() -> bool:
    """True when TotalSegmentator's Python API can be imported."""
    try:
        import totalsegmentator.python_api  # noqa: F401
    except ImportError:
        return False
    return True


def segment_with_totalsegmentator(vol: Volume, fast: bool = False, device: str = "cpu") -> np.ndarray:
    """Run TotalSegmentator's "total" task on the cervical vertebrae; return C1..C7 (1..7) as uint8 on vol's grid."""
    try:
        from totalsegmentator.python_api import totalsegmentator
    except ImportError as exc:
        raise UsageError(INSTALL_HINT) from exc
    from cspine.io.nifti import load_segmentation, save_nifti

    with tempfile.TemporaryDirectory(prefix="cspine-totalseg-") as tmp:
        ct, seg = Path(tmp) / "ct.nii.gz", Path(tmp) / "seg.nii.gz"
        save_nifti(vol.array, vol, ct)
        totalsegmentator(str(ct), str(seg), ml=True, fast=fast, roi_subset=list(ROI_SUBSET), device=device, quiet=True)
        labels = to_project_labels(load_segmentation(seg, vol), "totalsegmentator")
    return np.where(labels <= len(CERVICAL), labels, 0).astype(np.uint8)
