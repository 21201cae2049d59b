"""Measure a shapes-world model with the oracle: keyword vs narrative prompts, seen vs held out.

Guidance is tuned on the validation set (keyword prompts of the combinations seen in
training, validation seed) and only then used on the test sets (held-out combinations,
test seed), so the reported figures are not tuned on what they report.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from diffusers import StableDiffusionPipeline

from suradapter.config import SamplingParams, ShapesParams
from suradapter.data.lexicon import TEMPLATES
from suradapter.data.shapes import (
    Combination,
    all_combinations,
    held_out_combinations,
    keyword_prompt,
    narrative_prompt,
)
from suradapter.evaluate.oracle import EmbedFn, OracleScore, generate_and_score

NARRATIVE_PROMPTS_PER_COMBINATION = 4


def split_combinations(shapes: ShapesParams) -> tuple[list[Combination], list[Combination]]:
    """Return (seen in training, held out) attribute combinations."""
    held = held_out_combinations(shapes)
    return [c for c in all_combinations(shapes) if c not in held], held


def keyword_set(combos: Sequence[Combination]) -> tuple[list[str], list[Combination]]:
    return [keyword_prompt(*combo) for combo in combos], list(combos)


def narrative_set(combos: Sequence[Combination], seed: int) -> tuple[list[str], list[Combination]]:
    """Several narrative phrasings per combination (random templates, seeded)."""
    rng = random.Random(f"narrative-eval:{seed}")
    prompts, targets = [], []
    for combo in combos:
        for _ in range(NARRATIVE_PROMPTS_PER_COMBINATION):
            template = rng.randrange(len(TEMPLATES))
            prompts.append(narrative_prompt(*combo, template, rng))
            targets.append(combo)
    return prompts, targets


def tune_guidance(
    pipeline: StableDiffusionPipeline, shapes: ShapesParams, sampling: SamplingParams
) -> tuple[float, dict[float, OracleScore]]:
    """Pick the guidance with the best all-attributes accuracy on the validation set."""
    seen, _ = split_combinations(shapes)
    prompts, targets = keyword_set(seen)
    scores = {
        guidance: generate_and_score(
            pipeline,
            prompts,
            targets,
            guidance=guidance,
            steps=sampling.steps,
            images_per_prompt=sampling.images_per_prompt,
            seed=sampling.seed,
        )
        for guidance in sampling.guidance_candidates
    }
    best = max(scores, key=lambda g: (scores[g].all, -g))
    return best, scores


def measure_test_sets(
    pipeline: StableDiffusionPipeline,
    shapes: ShapesParams,
    sampling: SamplingParams,
    guidance: float,
    embed: EmbedFn | None = None,
    images_per_combination: int = 24,
) -> dict[str, OracleScore]:
    """Oracle accuracy on held-out combinations, keyword and narrative prompts (test seed)."""
    _, held = split_combinations(shapes)
    keyword_prompts, keyword_targets = keyword_set(held)
    narrative_prompts, narrative_targets = narrative_set(held, sampling.seed + 1)
    per_narrative = max(1, images_per_combination // NARRATIVE_PROMPTS_PER_COMBINATION)
    common = dict(guidance=guidance, steps=sampling.steps, seed=sampling.seed + 1, embed=embed)
    return {
        "keyword": generate_and_score(
            pipeline,
            keyword_prompts,
            keyword_targets,
            images_per_prompt=images_per_combination,
            **common,
        ),
        "narrative": generate_and_score(
            pipeline,
            narrative_prompts,
            narrative_targets,
            images_per_prompt=per_narrative,
            **common,
        ),
    }
