"""CLIP score (real profile): how well generated images match their narrative prompts.

Needs a local CLIP model folder (`evaluate.clip_model`: weights plus processor). For each
prompt one image per model is generated with the same seed; the score is
`100 * max(cos(image, text), 0)` averaged over prompts, as in Hessel et al. (2021).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPModel, CLIPProcessor

from suradapter.config import SamplingParams
from suradapter.evaluate.oracle import EmbedFn


def load_clip(path: str | Path) -> tuple[CLIPModel, CLIPProcessor]:
    """Load a local CLIP model and processor; raises FileNotFoundError naming the path."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"evaluate.clip_model: {folder} is not a local CLIP model folder")
    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    return model, CLIPProcessor.from_pretrained(folder, local_files_only=True)


@torch.inference_mode()
def clip_scores(
    clip: tuple[CLIPModel, CLIPProcessor],
    pipeline: StableDiffusionPipeline,
    prompts: Sequence[str],
    models: dict[str, EmbedFn | None],
    sampling: SamplingParams,
    chunk: int = 8,
) -> dict[str, float]:
    """Mean CLIP score per model (`None`: the base pipeline's own text encoding)."""
    model, processor = clip
    scores: dict[str, float] = {}
    for name, embed in models.items():
        total = 0.0
        for start in range(0, len(prompts), chunk):
            batch = list(prompts[start : start + chunk])
            inputs = embed(batch) if embed is not None else {"prompt": batch}
            images = pipeline(
                **inputs,
                guidance_scale=sampling.guidance,
                num_inference_steps=sampling.steps,
                generator=torch.Generator().manual_seed(sampling.seed + 1 + start),
                output_type="pil",
            ).images
            features = processor(
                text=batch, images=images, return_tensors="pt", padding=True, truncation=True
            )
            out = model(**features)
            cosine = torch.nn.functional.cosine_similarity(out.text_embeds, out.image_embeds)
            total += float((100 * cosine.clamp(min=0)).sum())
        scores[name] = total / len(prompts)
    return scores
