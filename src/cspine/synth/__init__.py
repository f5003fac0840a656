"""The synthetic CT generator: anatomy, fracture and label sampling, appearance, and the RSNA-layout writer.

Modules, in the order a study passes through them: :mod:`~cspine.synth.sampling` (labels, fracture plan, random
streams), :mod:`~cspine.synth.anatomy` (one patient, built from :mod:`~cspine.synth.shapes`,
:mod:`~cspine.synth.vertebrae` and :mod:`~cspine.synth.fractures`), :mod:`~cspine.synth.render` (HU, mask, tissue on
a grid), :mod:`~cspine.synth.study` (one study in memory), :mod:`~cspine.synth.writer` (DICOM, NIfTI, CSV encodings)
and :mod:`~cspine.synth.dataset` (the dataset on disk, ``cspine synth``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names, for type checkers; at run time they load on first use (below)
    from cspine.synth.config import PROFILES, SIZES, SynthConfig
    from cspine.synth.dataset import SynthSummary, generate_dataset, segmented_indices
    from cspine.synth.sampling import fracture_plan, label_distribution, sample_labels
    from cspine.synth.study import SynthStudy, generate_study, study_uid

# Exported names -> module. Loaded on first use, so ``cspine.synth.config`` (what the CLI parser needs) does not
# pull in numpy, scipy and pydicom.
_EXPORTS = {
    "SIZES": "config",
    "PROFILES": "config",
    "SynthConfig": "config",
    "SynthSummary": "dataset",
    "generate_dataset": "dataset",
    "segmented_indices": "dataset",
    "fracture_plan": "sampling",
    "label_distribution": "sampling",
    "sample_labels": "sampling",
    "SynthStudy": "study",
    "generate_study": "study",
    "study_uid": "study",
}
__all__ = [
    "PROFILES",
    "SIZES",
    "SynthConfig",
    "SynthStudy",
    "SynthSummary",
    "fracture_plan",
    "generate_dataset",
    "generate_study",
    "label_distribution",
    "sample_labels",
    "segmented_indices",
    "study_uid",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cspine.synth' has no attribute {name!r}")
    return getattr(importlib.import_module(f"cspine.synth.{_EXPORTS[name]}"), name)
