"""The adapted text path feeds the standard StableDiffusionPipeline through prompt_embeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from suradapter.model.adapter import SURAdapter
from suradapter.model.text_path import AdaptedTextPath

PROMPT = "a trio of fire-truck coloured coins lying in the snow"


def _generate(pipeline, **kwargs) -> np.ndarray:
    return pipeline(
        num_inference_steps=3,
        height=32,
        width=32,
        guidance_scale=3.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images


def _adapter(eta: float) -> SURAdapter:
    adapter = SURAdapter(width=32, num_heads=4, ff_dim=64, adapter_weight=eta)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in adapter.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return adapter


def test_eta_zero_reproduces_the_base_pipeline_bit_for_bit(tiny_pipeline):
    path = AdaptedTextPath.from_pipeline(tiny_pipeline, _adapter(0.0))
    base = _generate(tiny_pipeline, prompt=[PROMPT], negative_prompt=["blurry"])
    adapted = _generate(tiny_pipeline, **path.pipeline_embeds([PROMPT], ["blurry"]))
    assert np.array_equal(base, adapted)


def test_a_trained_looking_adapter_changes_the_image(tiny_pipeline):
    path = AdaptedTextPath.from_pipeline(tiny_pipeline, _adapter(0.5))
    base = _generate(tiny_pipeline, prompt=[PROMPT])
    adapted = _generate(tiny_pipeline, **path.pipeline_embeds([PROMPT]))
    assert np.abs(base - adapted).max() > 1e-3


def test_embeddings_have_the_pipeline_shape_and_use_eval_mode(tiny_pipeline):
    adapter = _adapter(0.5).train()
    path = AdaptedTextPath.from_pipeline(tiny_pipeline, adapter)
    first = path.encode([PROMPT, "one green triangle"])
    assert first.shape == (2, tiny_pipeline.tokenizer.model_max_length, 32)
    assert torch.equal(first, path.encode([PROMPT, "one green triangle"]))
    assert adapter.training  # restored after encoding


def test_forward_is_differentiable_for_training(tiny_pipeline):
    adapter = _adapter(0.5)
    path = AdaptedTextPath.from_pipeline(tiny_pipeline, adapter)
    tokens = path.tokenize([PROMPT])
    path(tokens.input_ids, tokens.attention_mask).sum().backward()
    assert adapter.fc.weight.grad is not None
    assert all(p.grad is None for p in tiny_pipeline.text_encoder.parameters())


def test_width_mismatch_and_negative_count_are_clear_errors(tiny_pipeline):
    with pytest.raises(ValueError, match="does not match"):
        AdaptedTextPath.from_pipeline(tiny_pipeline, SURAdapter(width=64, num_heads=4, ff_dim=32))
    path = AdaptedTextPath.from_pipeline(tiny_pipeline, _adapter(0.1))
    with pytest.raises(ValueError, match="negative prompts"):
        path.pipeline_embeds(["a", "b"], ["c"])
