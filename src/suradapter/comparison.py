"""Side-by-side images of the base model and an adapter, for training runs and eval reports."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from suradapter.config import Params
from suradapter.model.adapter import SURAdapter
from suradapter.model.text_path import AdaptedTextPath
from suradapter.model.zoo import load_base_from_params

GRID_SCALE = 4


def comparison_grid(
    params: Params,
    adapter: SURAdapter,
    prompts: list[str],
    pipeline: StableDiffusionPipeline | None = None,
) -> Image.Image:
    """Rows of [base, adapter] images for `prompts`, same seed per row, upscaled for viewing.

    `pipeline` is the base model when the caller has it loaded already.
    """
    pipeline = pipeline or load_base_from_params(params.base_model)
    path = AdaptedTextPath.from_pipeline(pipeline, adapter.eval())
    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    common = dict(
        num_inference_steps=params.sampling.steps,
        guidance_scale=params.sampling.guidance,
        height=size,
        width=size,
        output_type="pil",
    )
    rows = []
    for index, prompt in enumerate(prompts):
        seed = params.sampling.seed + index
        base = pipeline(prompt=prompt, generator=torch.Generator().manual_seed(seed), **common)
        adapted = pipeline(
            **path.pipeline_embeds([prompt]),
            generator=torch.Generator().manual_seed(seed),
            **common,
        )
        rows.append((base.images[0], adapted.images[0]))
    cell = size * GRID_SCALE
    grid = Image.new("RGB", (2 * cell, len(rows) * cell), "white")
    for row, images in enumerate(rows):
        for column, image in enumerate(images):
            grid.paste(
                image.resize((cell, cell), Image.Resampling.NEAREST), (column * cell, row * cell)
            )
    return grid
