"""Semantic accuracy in the shapes world: the oracle reads images generated from prompts.

Three fixed prompt sets, each with a fixed seed (the test seed, `sampling.seed + 1`):
- `keyword`: keyword prompts of the held-out combinations (the quality guard);
- `narrative_heldout_combinations`: narrative prompts of the held-out combinations;
- `narrative_heldout_templates`: narrative prompts of the seen combinations, phrased only
  with the held-out templates.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from diffusers import StableDiffusionPipeline

from suradapter.config import SamplingParams, ShapesParams
from suradapter.data.shapes import Combination, held_out_templates, narrative_prompt
from suradapter.evaluate.base_model import (
    NARRATIVE_PROMPTS_PER_COMBINATION,
    keyword_set,
    narrative_set,
    split_combinations,
)
from suradapter.evaluate.oracle import (
    ALL_THREE,
    ATTRIBUTES,
    EmbedFn,
    OracleScore,
    generate_and_score,
)

KEYWORD = "keyword"
HELDOUT_COMBINATIONS = "narrative_heldout_combinations"
HELDOUT_TEMPLATES = "narrative_heldout_templates"


@dataclass(frozen=True)
class PromptSet:
    prompts: list[str]
    targets: list[Combination]
    images_per_prompt: int


def prompt_sets(
    shapes: ShapesParams, sampling: SamplingParams, images_per_combination: int
) -> dict[str, PromptSet]:
    """The three evaluation sets; identical for every model scored with the same params."""
    seen, held = split_combinations(shapes)
    per_narrative = max(1, images_per_combination // NARRATIVE_PROMPTS_PER_COMBINATION)
    rng = random.Random(f"heldout-templates:{sampling.seed + 1}")
    templates = held_out_templates(shapes)
    template_prompts = [narrative_prompt(*combo, rng.choice(templates), rng) for combo in seen]
    return {
        KEYWORD: PromptSet(*keyword_set(held), images_per_combination),
        HELDOUT_COMBINATIONS: PromptSet(*narrative_set(held, sampling.seed + 1), per_narrative),
        HELDOUT_TEMPLATES: PromptSet(template_prompts, list(seen), per_narrative),
    }


def score_sets(
    pipeline: StableDiffusionPipeline,
    sets: dict[str, PromptSet],
    sampling: SamplingParams,
    embed: EmbedFn | None,
) -> dict[str, OracleScore]:
    """Oracle accuracy of one model (`embed`: its text path; None: the base's own) per set."""
    return {
        name: generate_and_score(
            pipeline,
            prompt_set.prompts,
            prompt_set.targets,
            guidance=sampling.guidance,
            steps=sampling.steps,
            images_per_prompt=prompt_set.images_per_prompt,
            seed=sampling.seed + 1,
            embed=embed,
        )
        for name, prompt_set in sets.items()
    }


def attribute_mean(score: OracleScore) -> float:
    """Accuracy averaged over count, colour and shape."""
    return sum(getattr(score, name) for name in ATTRIBUTES) / len(ATTRIBUTES)


def closure_by_figure(
    base_keyword: OracleScore,
    base_narrative: OracleScore,
    adapter_narrative: OracleScore,
    min_gap_points: float,
) -> dict[str, float | None]:
    """Per attribute and for all three at once: (adapter narrative - base narrative) /
    (base keyword - base narrative), the share of the keyword-narrative gap the adapter
    closes; None where that gap is under `min_gap_points` (nothing to close)."""
    closures: dict[str, float | None] = {}
    for name in (*ATTRIBUTES, ALL_THREE):
        gap = getattr(base_keyword, name) - getattr(base_narrative, name)
        gain = getattr(adapter_narrative, name) - getattr(base_narrative, name)
        closures[name] = gain / gap if gap * 100 >= min_gap_points and gap > 0 else None
    return closures


def gap_closure(closures: dict[str, float | None]) -> tuple[float | None, list[str]]:
    """The mean closure over the attributes that have a gap (of `closure_by_figure`).

    Returns (closure, attributes used); closure is None when no attribute qualifies.
    """
    used = [name for name in ATTRIBUTES if closures[name] is not None]
    closure = sum(closures[name] for name in used) / len(used) if used else None
    return closure, used
