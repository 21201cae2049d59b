"""Held-out denoising loss: the image-quality guard in the model's own objective.

The same held-out rows, noise and timesteps for every conditioning, so the only thing that
differs between the base and the adapter figure is the prompt embedding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline

from suradapter.data.pairs import AdapterTrainingData
from suradapter.model.losses import denoising_target

ConditionFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PROMPT_FIELDS = ("keyword", "narrative")


@torch.inference_mode()
def heldout_denoise_loss(
    pipeline: StableDiffusionPipeline,
    data: AdapterTrainingData,
    conditions: dict[str, ConditionFn],
    batches: int,
    batch_size: int,
    seed: int,
) -> dict[str, dict[str, float]]:
    """Mean epsilon/v MSE per prompt field and conditioning over fixed held-out batches.

    `conditions[name](ids, mask)` turns token ids into prompt embeddings [B, T, D]; each
    batch is encoded once and scored with its keyword and with its narrative prompts.
    Returns `{"keyword": {name: loss}, "narrative": {name: loss}}`.
    """
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    generator = torch.Generator().manual_seed(seed)  # on the CPU: same draws on every device
    device, vae = pipeline.unet.device, pipeline.vae
    totals = {field: dict.fromkeys(conditions, 0.0) for field in PROMPT_FIELDS}
    count = min(batches, max(1, len(data) // batch_size))
    for _ in range(count):
        rows = torch.randint(len(data), (batch_size,), generator=generator)
        batch = data.batch(rows, torch.zeros(batch_size, dtype=torch.bool))
        pixels = batch.pixels.to(device, vae.dtype)
        latents = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
        steps = scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (batch_size,), generator=generator).to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = denoising_target(scheduler, latents, noise, timesteps)
        tokens = {
            "keyword": (batch.keyword_ids, data.keyword_mask[rows]),
            "narrative": (batch.narrative_ids, batch.narrative_mask),
        }
        for field, (ids, mask) in tokens.items():
            for name, condition in conditions.items():
                embeds = condition(ids, mask).to(pipeline.unet.dtype)
                prediction = pipeline.unet(noisy, timesteps, encoder_hidden_states=embeds).sample
                loss = float((prediction.float() - target.float()).pow(2).mean())
                totals[field][name] += loss
    return {
        field: {name: total / count for name, total in losses.items()}
        for field, losses in totals.items()
    }
