"""What one training batch reports to the loop (kept apart from the loop so inference code can name it without
importing training)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepResult:
    """The loss to backpropagate and counts for the epoch's averages (images seen, correct and total targets)."""

    loss: torch.Tensor
    images: int
    correct: float
    targets: int
