"""Training data for the adapter: prepared rows, their tokens, images and teacher features,
served to the training loop by a `torch.utils.data.DataLoader`.

Token ids and teacher features are looked up once. Per row the loader yields either the
image's pixels (decoded from the prepared folder: train.cache off) or, from the frozen-output
cache, the image's latent distribution and the frozen text states of both prompts. Which
rows form micro-batch (step, micro) is drawn from a seed of (seed, step, micro, rank) alone,
so a resumed run reads exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import CLIPTokenizer

from suradapter.config import TrainParams
from suradapter.frozen.cache import LATENTS, LOGVAR, MEAN, STATES, TEXTS, FrozenCache
from suradapter.model.text_path import sd_tokenize
from suradapter.teacher.cache import TeacherCache, text_key


@dataclass
class AdapterBatch:
    """One training batch: tokens, teacher features, and pixels in [-1, 1] or cached states."""

    narrative_ids: torch.Tensor  # [B, T]
    narrative_mask: torch.Tensor  # [B, T]
    keyword_ids: torch.Tensor  # [B, T]
    keyword_mask: torch.Tensor  # [B, T]
    teacher: torch.Tensor  # [B, D]
    dropped: torch.Tensor  # [B] bool: caption dropout (both prompts are "")
    pixels: torch.Tensor | None = None  # [B, 3, H, W] (train.cache off)
    latent_mean: torch.Tensor | None = None  # [B, C, h, w] (cached)
    latent_logvar: torch.Tensor | None = None  # [B, C, h, w] (cached)
    narrative_states: torch.Tensor | None = None  # [B, T, W] (cached)
    keyword_states: torch.Tensor | None = None  # [B, T, W] (cached)

    def to(self, device: torch.device) -> AdapterBatch:
        return self._map(lambda tensor: tensor.to(device, non_blocking=True))

    def pin_memory(self) -> AdapterBatch:  # called by DataLoader(pin_memory=True)
        return self._map(torch.Tensor.pin_memory)

    def _map(self, function) -> AdapterBatch:
        values = {field.name: getattr(self, field.name) for field in fields(self)}
        return AdapterBatch(**{k: None if v is None else function(v) for k, v in values.items()})


class AdapterTrainingData:
    """The `split` rows of a prepared dataset, ready to batch."""

    def __init__(
        self,
        manifest: Path,
        tokenizer: CLIPTokenizer,
        teacher_cache: TeacherCache | None,
        split: str = "train",
    ) -> None:
        columns = ["sample_id", "text", "prompt", "image_path", "split"]
        table = pq.read_table(manifest, columns=columns)
        rows = [row for row in table.to_pylist() if row["split"] == split]
        if not rows:
            raise ValueError(f"{manifest}: no rows in split '{split}'")
        self.root = manifest.parent
        self.image_paths = [row["image_path"] for row in rows]
        self.image_keys = [row["sample_id"] for row in rows]  # sha256 of texts + source image
        self.texts = [row["text"] for row in rows]
        self.prompts = [row["prompt"] for row in rows]
        narrative = sd_tokenize(tokenizer, [*self.texts, ""])
        self.narrative_ids, self.narrative_mask = narrative.input_ids, narrative.attention_mask
        keyword = sd_tokenize(tokenizer, [*self.prompts, ""])
        self.keyword_ids, self.keyword_mask = keyword.input_ids, keyword.attention_mask
        self.narrative_keys = [text_key(text) for text in [*self.texts, ""]]
        self.keyword_keys = [text_key(text) for text in [*self.prompts, ""]]
        if teacher_cache is None:  # evaluation needs no teacher features
            teacher = torch.zeros(len(rows), 1)
        else:
            teacher = teacher_cache.get([text_key(text) for text in self.texts])
        self.teacher = torch.cat([teacher, torch.zeros(1, teacher.shape[1])])
        self.empty = len(rows)  # index of the "" prompt row (caption dropout)

    def __len__(self) -> int:
        return len(self.texts)

    def ids_by_text_key(self) -> dict[str, torch.Tensor]:
        """Token ids of every distinct text (narrative, keyword, ""), by text key."""
        ids = dict(zip(self.narrative_keys, self.narrative_ids, strict=True))
        ids.update(zip(self.keyword_keys, self.keyword_ids, strict=True))
        return ids

    def batch(self, indices: torch.Tensor, dropped: torch.Tensor) -> AdapterBatch:
        """Gather rows `indices` with their pixels; `dropped` rows get the empty prompt."""
        rows = TrainingRows(self, None)
        return collate([rows[(int(i), bool(d))] for i, d in zip(indices, dropped, strict=True)])

    def pixels(self, index: int) -> torch.Tensor:
        """Row `index`'s prepared image as [3, H, W] in [-1, 1]."""
        with Image.open(self.root / self.image_paths[index]) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32)
        return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


class TrainingRows(Dataset):
    """Item (row, dropped) of the training data: what the training step needs of one sample."""

    def __init__(self, data: AdapterTrainingData, cache: FrozenCache | None) -> None:
        self.data, self.cache = data, cache

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item: tuple[int, bool]) -> dict[str, torch.Tensor]:
        row, dropped = item
        data = self.data
        text_row = data.empty if dropped else row
        sample = {
            "narrative_ids": data.narrative_ids[text_row],
            "narrative_mask": data.narrative_mask[text_row],
            "keyword_ids": data.keyword_ids[text_row],
            "keyword_mask": data.keyword_mask[text_row],
            "teacher": data.teacher[text_row],
            "dropped": torch.tensor(dropped),
        }
        if self.cache is None:
            sample["pixels"] = data.pixels(row)
            return sample
        cache, image = self.cache, data.image_keys[row]
        mean = cache.read(LATENTS, image, MEAN)
        logvar = cache.read(LATENTS, image, LOGVAR)
        sample["latent_mean"] = mean
        sample["latent_logvar"] = torch.full_like(mean, -torch.inf) if logvar is None else logvar
        sample["narrative_states"] = cache.read(TEXTS, data.narrative_keys[text_row], STATES)
        sample["keyword_states"] = cache.read(TEXTS, data.keyword_keys[text_row], STATES)
        return sample


def collate(samples: list[dict[str, torch.Tensor]]) -> AdapterBatch:
    return AdapterBatch(**{name: torch.stack([s[name] for s in samples]) for name in samples[0]})


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
    """Batches of micro-steps start.. in order: workers, prefetch, pinned memory on CUDA."""
    workers = train.loader_workers
    return DataLoader(
        TrainingRows(data, cache),
        batch_sampler=StepBatches(train, len(data), start, rank),
        collate_fn=collate,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
