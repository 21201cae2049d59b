"""The adapter's training batches: the prepared pairs (`data.pairs`) served to the training
loop by a `torch.utils.data.DataLoader`.

Which rows form micro-batch (step, micro) is drawn from a seed of (seed, step, micro, rank)
alone, so a resumed run reads exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler

from suradapter.config import TrainParams
from suradapter.data.pairs import AdapterTrainingData, TrainingRows
from suradapter.frozen.cache import FrozenCache


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The CPU generator of micro-batch (step, micro) on `rank`: rows, dropout, noise, timesteps."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 64 + micro) * 1024 + rank)


def draw_rows(
    generator: torch.Generator, rows: int, train: TrainParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row indices, caption-dropout mask) of one micro-batch, drawn from `generator`."""
    indices = torch.randint(rows, (train.batch_size,), generator=generator)
    dropped = torch.rand(train.batch_size, generator=generator) < train.caption_dropout
    return indices, dropped


class StepBatches(Sampler[list[tuple[int, bool]]]):
    """The (row, dropped) items of every micro-batch from step `start` to train.max_steps."""

    def __init__(self, train: TrainParams, rows: int, start: int, rank: int) -> None:
        self.train, self.rows, self.start, self.rank = train, rows, start, rank

    def __len__(self) -> int:
        return (self.train.max_steps - self.start) * self.train.gradient_accumulation_steps

    def __iter__(self):
        for step in range(self.start, self.train.max_steps):
            for micro in range(self.train.gradient_accumulation_steps):
                generator = step_generator(self.train.seed, step, micro, self.rank)
                indices, dropped = draw_rows(generator, self.rows, self.train)
                yield list(zip(indices.tolist(), dropped.tolist(), strict=True))


def training_loader(
    data: AdapterTrainingData,
    cache: FrozenCache | None,
    train: TrainParams,
    start: int,
    rank: int,
    device: torch.device,
) -> DataLoader:
    """Batches of micro-steps start.. in order: workers, prefetch, pinned memory on CUDA.

    Each batch is a dict of stacked tensors (torch's default collation, which pinning
    understands); `AdapterBatch(**batch)` after `send_to_device`."""
    workers = train.loader_workers
    return DataLoader(
        TrainingRows(data, cache),
        batch_sampler=StepBatches(train, len(data), start, rank),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
