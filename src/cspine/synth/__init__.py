"""The synthetic CT generator: anatomy, fracture and label sampling, appearance, and the RSNA-layout writer.

Modules, in the order a study passes through them: :mod:`~cspine.synth.sampling` (labels, fracture plan, random
streams), :mod:`~cspine.synth.anatomy` (one patient, built from :mod:`~cspine.synth.shapes`,
:mod:`~cspine.synth.vertebrae` and :mod:`~cspine.synth.fractures`), :mod:`~cspine.synth.render` (HU, mask, tissue on
a grid), :mod:`~cspine.synth.study` (one study in memory), :mod:`~cspine.synth.writer` (DICOM, NIfTI, CSV encodings)
and :mod:`~cspine.synth.dataset` (the dataset on disk, ``cspine synth``).
"""

from cspine.synth.config import SIZES, SynthConfig
from cspine.synth.dataset import SynthSummary, generate_dataset, segmented_indices
from cspine.synth.sampling import fracture_plan, label_distribution, sample_labels
from cspine.synth.study import SynthStudy, generate_study, study_uid

__all__ = [
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
