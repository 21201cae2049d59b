"""Training data for the adapter: prepared rows, their tokens, images and teacher features.

Token ids and teacher features are looked up once; images are decoded per batch from the
prepared folder, so the same code serves the 32 px shapes world and 512 px SURD.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from transformers import CLIPTokenizer

from suradapter.teacher.cache import TeacherCache, text_key


@dataclass
class AdapterBatch:
    """One training batch: narrative/keyword tokens, pixels in [-1, 1], teacher features."""

    narrative_ids: torch.Tensor  # [B, T]
    narrative_mask: torch.Tensor  # [B, T]
    keyword_ids: torch.Tensor  # [B, T]
    keyword_mask: torch.Tensor  # [B, T]
    pixels: torch.Tensor  # [B, 3, H, W]
    teacher: torch.Tensor  # [B, D]


class AdapterTrainingData:
    """The `split` rows of a prepared dataset, ready to batch."""

    def __init__(
        self,
        manifest: Path,
        tokenizer: CLIPTokenizer,
        teacher_cache: TeacherCache | None,
        split: str = "train",
    ) -> None:
        table = pq.read_table(manifest, columns=["text", "prompt", "image_path", "split"])
        rows = [row for row in table.to_pylist() if row["split"] == split]
        if not rows:
            raise ValueError(f"{manifest}: no rows in split '{split}'")
        self.root = manifest.parent
        self.image_paths = [row["image_path"] for row in rows]
        self.texts = [row["text"] for row in rows]
        self.prompts = [row["prompt"] for row in rows]
        narrative = _tokenize(tokenizer, [*self.texts, ""])
        self.narrative_ids, self.narrative_mask = narrative.input_ids, narrative.attention_mask
        keyword = _tokenize(tokenizer, [*self.prompts, ""])
        self.keyword_ids, self.keyword_mask = keyword.input_ids, keyword.attention_mask
        if teacher_cache is None:  # evaluation needs no teacher features
            teacher = torch.zeros(len(rows), 1)
        else:
            teacher = teacher_cache.get([text_key(text) for text in self.texts])
        self.teacher = torch.cat([teacher, torch.zeros(1, teacher.shape[1])])
        self.empty = len(rows)  # index of the "" prompt row (caption dropout)

    def __len__(self) -> int:
        return len(self.texts)

    def batch(self, indices: torch.Tensor, dropped: torch.Tensor) -> AdapterBatch:
        """Gather rows `indices`; rows with `dropped` True get the empty prompt on both sides."""
        text_rows = torch.where(dropped, torch.full_like(indices, self.empty), indices)
        return AdapterBatch(
            narrative_ids=self.narrative_ids[text_rows],
            narrative_mask=self.narrative_mask[text_rows],
            keyword_ids=self.keyword_ids[text_rows],
            keyword_mask=self.keyword_mask[text_rows],
            pixels=torch.stack([self._pixels(int(i)) for i in indices]),
            teacher=self.teacher[text_rows],
        )

    def _pixels(self, index: int) -> torch.Tensor:
        with Image.open(self.root / self.image_paths[index]) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32)
        return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def _tokenize(tokenizer: CLIPTokenizer, texts: list[str]):
    return tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
