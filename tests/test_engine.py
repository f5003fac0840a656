"""The shared training loop's batches (cspine.engine.loop)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from cspine.engine.loop import dataset_batches
from cspine.runtime import init_runtime


class _EpochEcho(Dataset):
    """Each item is the epoch the dataset was told last: what seeded augmentation keys its draws on."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(self.epoch)


def test_dataloader_workers_see_each_epoch_so_augmentation_is_drawn_anew() -> None:
    """With workers, every item of epoch e must be drawn for epoch e (persistent workers kept epoch 0's dataset:
    the fixed classifier benchmark on a GPU, 8 workers, overfit where the same run on CPU did not; session 26)."""
    batches, steps = dataset_batches(_EpochEcho(8), batch_size=2, workers=2, seed=0, rt=init_runtime("cpu"))
    assert steps == 4
    for epoch in range(3):
        seen = torch.cat(list(batches(epoch)))
        assert seen.tolist() == [epoch] * 8
