"""The adapted text path: tokenizer -> frozen CLIP text encoder -> SUR-adapter -> prompt_embeds.

This is the unit we export, register and serve. It feeds the standard diffusers
`StableDiffusionPipeline` through `prompt_embeds=` / `negative_prompt_embeds=`, so the
pipeline is never forked. Classifier-free guidance: the adapter is applied to both the
conditional and the unconditional (negative) branch, each encoded on its own, exactly as the
pipeline encodes them; training uses caption dropout so the empty prompt is learned too.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline
from torch import nn
from transformers import BatchEncoding, CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerBase

from suradapter.model.adapter import SURAdapter


def sd_tokenize(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    return_tensors: str = "pt",
    max_length: int | None = None,
) -> BatchEncoding:
    """Tokenize as the SD pipeline does: pad to `max_length` (default: the tokenizer's
    model_max_length) and truncate there."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors=return_tensors,
    )


def token_embeddings(text_encoder: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The text encoder's input token embeddings [B, T, W] (a table lookup, before positions
    are added): what the adapter's token mixer reads."""
    table = text_encoder.get_input_embeddings()
    return table(ids.to(table.weight.device))


class AdaptedTextPath(nn.Module):
    """Frozen text encoder plus adapter. `forward(input_ids, attention_mask)` is exportable."""

    def __init__(
        self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, adapter: SURAdapter
    ) -> None:
        super().__init__()
        width = text_encoder.config.hidden_size
        if adapter.config.width != width:
            raise ValueError(
                f"adapter width {adapter.config.width} does not match the text encoder's "
                f"hidden size {width}"
            )
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.adapter = adapter

    @classmethod
    def from_pipeline(
        cls, pipeline: StableDiffusionPipeline, adapter: SURAdapter
    ) -> AdaptedTextPath:
        """Build the path from a pipeline's tokenizer and text encoder."""
        return cls(pipeline.tokenizer, pipeline.text_encoder, adapter)

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def tokenize(self, prompts: list[str]) -> BatchEncoding:
        """Tokenize as the SD pipeline does (`sd_tokenize`)."""
        return sd_tokenize(self.tokenizer, prompts)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Frozen CLIP states [B, T, D], computed exactly as `StableDiffusionPipeline` does."""
        device = self.text_encoder.device
        use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
        mask = attention_mask.to(device) if use_mask and attention_mask is not None else None
        states = self.text_encoder(input_ids.to(device), attention_mask=mask)[0]
        return states.to(dtype=self.text_encoder.dtype)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return adapted prompt embeddings [B, T, D] for token ids [B, T]."""
        states = self.encode_text(input_ids, attention_mask)
        adapter_dtype = next(self.adapter.parameters()).dtype
        mask = attention_mask.to(states.device) if attention_mask is not None else None
        tokens = None
        if self.adapter.has_token_mixer:
            tokens = token_embeddings(self.text_encoder, input_ids).to(adapter_dtype)
        adapted = self.adapter(states.to(adapter_dtype), mask, tokens).adapted
        return adapted.to(states.dtype)

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Adapted prompt embeddings for a list of prompts, in eval mode."""
        was_training = self.adapter.training
        self.adapter.eval()
        try:
            tokens = self.tokenize(prompts)
            return self(tokens.input_ids, tokens.attention_mask)
        finally:
            self.adapter.train(was_training)

    def pipeline_embeds(
        self, prompts: list[str], negative_prompts: list[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Keyword arguments for `StableDiffusionPipeline(...)`: both branches adapted."""
        negatives = negative_prompts if negative_prompts is not None else [""] * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        return {
            "prompt_embeds": self.encode(prompts),
            "negative_prompt_embeds": self.encode(negatives),
        }
