"""What ``cspine synth`` writes, as data: :class:`SynthConfig` (saved beside the data in ``synth.json``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cspine.errors import ConfigError

Size = Literal["small", "full"]
SIZES: tuple[str, ...] = ("small", "full")
#: ``default``: the tight cervical-spine scans every figure so far was measured on (its bytes are fixed);
#: ``wide``: fields of view from head to abdomen, 0.3-5 mm voxels, scanner artefacts (:mod:`cspine.synth.appearance`).
Profile = Literal["default", "wide"]
PROFILES: tuple[str, ...] = ("default", "wide")


@dataclass(frozen=True)
class SynthConfig:
    """What ``cspine synth`` writes. Saved beside the data as ``synth.json``."""

    out: Path
    studies: int = 20
    seed: int = 0
    size: Size = "small"
    segmented: float = 0.5
    test_studies: int = 5
    workers: int = 1
    profile: Profile = "default"

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ConfigError(f"size must be one of {', '.join(SIZES)}, got {self.size!r}")
        if self.studies < 0 or self.test_studies < 0:
            raise ConfigError("studies and test_studies must be >= 0")
        if not 0.0 <= self.segmented <= 1.0:
            raise ConfigError(f"segmented is a fraction in [0, 1], got {self.segmented}")
        if self.profile not in PROFILES:
            raise ConfigError(f"profile must be one of {', '.join(PROFILES)}, got {self.profile!r}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
