"""Score generated images with the shapes-world oracle: per-attribute accuracy."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline

from suradapter.data.shapes import Combination, read_scene

ATTRIBUTES = ("count", "colour", "shape")
ALL_THREE = "all"  # an image with every attribute right
EmbedFn = Callable[[list[str]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class OracleScore:
    """Accuracy per attribute and for all three at once, over `n` images."""

    count: float
    colour: float
    shape: float
    all: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return {"count": self.count, "colour": self.colour, "shape": self.shape, "all": self.all}


def score_readings(readings: Sequence[Combination], targets: Sequence[Combination]) -> OracleScore:
    """Compare oracle readings with the intended (count, colour, shape) of each image."""
    if len(readings) != len(targets) or not targets:
        raise ValueError(f"{len(readings)} readings for {len(targets)} targets")
    hits = [[r[i] == t[i] for i in range(3)] for r, t in zip(readings, targets, strict=True)]
    n = len(hits)
    per = [sum(h[i] for h in hits) / n for i in range(3)]
    return OracleScore(*per, all=sum(all(h) for h in hits) / n, n=n)


@torch.inference_mode()
def generate_and_score(
    pipeline: StableDiffusionPipeline,
    prompts: Sequence[str],
    targets: Sequence[Combination],
    *,
    guidance: float,
    steps: int,
    images_per_prompt: int,
    seed: int,
    embed: EmbedFn | None = None,
    chunk: int = 16,
) -> OracleScore:
    """Generate `images_per_prompt` images per prompt and score them with the oracle.

    With `embed`, prompts go through it (an adapted text path) as `prompt_embeds`; otherwise
    the pipeline encodes them itself. Same seed, same images.
    """
    readings: list[Combination] = []
    expected: list[Combination] = []
    for start in range(0, len(prompts), chunk):
        batch = list(prompts[start : start + chunk])
        generator = torch.Generator().manual_seed(seed + start)
        inputs = embed(batch) if embed is not None else {"prompt": batch}
        images = pipeline(
            **inputs,
            num_images_per_prompt=images_per_prompt,
            guidance_scale=guidance,
            num_inference_steps=steps,
            generator=generator,
            output_type="pil",
        ).images
        readings.extend(read_scene(image) for image in images)
        for target in targets[start : start + chunk]:
            expected.extend([tuple(target)] * images_per_prompt)
    return score_readings(readings, expected)
