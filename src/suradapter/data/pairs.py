"""The prepared (narrative, keyword, image) pairs of one split, with their tokens, teacher
features and images, as training and evaluation read them.

`AdapterTrainingData` tokenizes every row once and looks up its teacher features; per row,
`TrainingRows` yields either the image's pixels (decoded from the prepared folder) or, from
the frozen-output cache, the image's latent distribution and the frozen text states of both
prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from transformers import CLIPTokenizer

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
    """Rows of `TrainingRows` stacked into one batch."""
    return AdapterBatch(**default_collate(samples))
