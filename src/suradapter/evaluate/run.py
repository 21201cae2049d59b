"""`sur evaluate`: score an adapter against the base and @production, then apply the gates.

The figures (see `report.json`):
- semantic accuracy (shapes world): the oracle reads count/colour/shape from images of
  narrative prompts, held-out combinations and held-out templates separately, with a
  fixed seed; keyword-prompt accuracy with and without the adapter is the quality guard;
- embedding alignment (every profile): cosine and retrieval top-1 of the adapted
  narrative embedding among the keyword-prompt embeddings of the held-out rows;
- held-out denoising loss on keyword prompts, base vs adapter (quality guard);
- CLIP score when `evaluate.clip_model` points at a local CLIP model.

With a production adapter, `production_margin` is the adapter's lead over it: in narrative
accuracy where the oracle runs, else the smaller of its alignment cosine and retrieval top-1
leads (one is a step function of 1/rows, on which two good adapters often tie; the other is
continuous but blind to a collapse that the retrieval catches).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from PIL import Image

from suradapter.comparison import comparison_grid
from suradapter.config import Params
from suradapter.data.pairs import AdapterTrainingData
from suradapter.devices import process_device
from suradapter.evaluate.alignment import embedding_alignment
from suradapter.evaluate.clip_score import clip_scores, load_clip
from suradapter.evaluate.denoise import heldout_denoise_loss
from suradapter.evaluate.gates import Gate, gated_report
from suradapter.evaluate.semantic import (
    HELDOUT_COMBINATIONS,
    HELDOUT_TEMPLATES,
    KEYWORD,
    attribute_mean,
    closure_by_figure,
    gap_closure,
    prompt_sets,
    score_sets,
)
from suradapter.model.adapter import SURAdapter
from suradapter.model.text_path import AdaptedTextPath
from suradapter.model.zoo import load_base_from_params
from suradapter.provenance import ADAPTER_WEIGHTS, sha256_file

TEST_SPLIT = "test"
ALIGNMENT_FIGURES = ("cosine", "retrieval_top1")
ALIGNMENT_MARGIN_BASIS = "min over alignment cosine and retrieval_top1, adapter minus production"


@dataclass
class EvaluationResult:
    report: dict
    grid: Image.Image | None = None  # base | adapter images of held-out narrative prompts
    # Timings stay out of the report (a DVC output: a function of the inputs alone).
    seconds: float = 0.0
    load_seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.report["passed"]

    @property
    def gates(self) -> list[Gate]:
        return [Gate(**gate) for gate in self.report["gates"]]

    @property
    def failed_gates(self) -> list[Gate]:
        return [gate for gate in self.gates if not gate.passed]


def require_adapter(folder: Path) -> Path:
    """Return `folder` if it holds a trained adapter; raises FileNotFoundError naming it."""
    if not (Path(folder) / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder}: no trained adapter ({ADAPTER_WEIGHTS} missing)")
    return Path(folder)


def load_adapter(folder: Path) -> SURAdapter:
    """Load a saved adapter in eval mode; raises FileNotFoundError naming the folder."""
    return SURAdapter.from_pretrained(require_adapter(folder)).eval()


def heldout_pairs(manifest: Path, limit: int) -> tuple[list[str], list[str]]:
    """(narrative, keyword) prompts of the first `limit` test-split rows."""
    table = pq.read_table(manifest, columns=["text", "prompt", "split"]).to_pylist()
    rows = [row for row in table if row["split"] == TEST_SPLIT][:limit]
    if not rows:
        raise ValueError(f"{manifest}: no rows in split '{TEST_SPLIT}' to evaluate on")
    return [row["text"] for row in rows], [row["prompt"] for row in rows]


def _plain_encoder(path: AdaptedTextPath):
    """The base text path alone: the frozen encoder's states, no adapter."""

    def encode(prompts: list[str]) -> torch.Tensor:
        tokens = path.tokenize(prompts)
        return path.encode_text(tokens.input_ids, tokens.attention_mask)

    return encode


def load_models(
    params: Params,
    adapter_dir: Path,
    production: tuple[str, SURAdapter] | None,
    device: torch.device,
) -> tuple[StableDiffusionPipeline, dict[str, AdaptedTextPath]]:
    """The base pipeline (in `base_model.dtype`) and the adapted text paths to score
    ("adapter", and "production" when given), all on `device`."""
    pipeline = load_base_from_params(params.base_model).to(device)
    models = {"adapter": AdaptedTextPath.from_pipeline(pipeline, load_adapter(adapter_dir))}
    if production is not None:
        models["production"] = AdaptedTextPath.from_pipeline(pipeline, production[1].eval())
    for model in models.values():
        model.adapter.to(device)
    return pipeline, models


def evaluate_adapter(
    params: Params,
    adapter_dir: Path | None = None,
    production: tuple[str, SURAdapter] | None = None,
    grid: bool = True,
    device: torch.device | None = None,
) -> EvaluationResult:
    """Score the adapter in `adapter_dir` (default: evaluate.adapter_dir) and decide gates.

    `production` is (version, adapter) of the model behind @production, when there is one.
    With `grid`, the shapes world also gets an image grid of held-out narrative prompts.
    Everything runs on `device` (default: this process's GPU when one is visible, else the
    CPU), the base model in `base_model.dtype`.
    """
    started = time.monotonic()
    diffusers_logging.set_verbosity_error()  # long narratives: one truncation notice per batch
    settings = params.evaluate
    folder = Path(adapter_dir or settings.adapter_dir)
    pipeline, models = load_models(params, folder, production, device or process_device())
    path, adapter = models["adapter"], models["adapter"].adapter
    load_seconds = time.monotonic() - started

    metrics: dict = {"production_version": production[0] if production else None}
    narratives, keywords = heldout_pairs(Path(params.embed.manifest), settings.alignment_rows)
    base_encode = _plain_encoder(path)
    encoders = {"base": base_encode} | {name: m.encode for name, m in models.items()}
    metrics["alignment"] = embedding_alignment(narratives, keywords, encoders, base_encode)

    data = AdapterTrainingData(
        Path(params.embed.manifest), pipeline.tokenizer, None, split=TEST_SPLIT
    )
    conditions = {"base": path.encode_text, "adapter": path}
    metrics["denoise"] = heldout_denoise_loss(
        pipeline,
        data,
        conditions,
        settings.denoise_batches,
        params.train.batch_size,
        params.sampling.seed + 1,
    )
    for losses in metrics["denoise"].values():
        losses["relative_increase"] = losses["adapter"] / losses["base"] - 1.0

    if params.uses_shapes_world:
        metrics |= _semantic_metrics(params, pipeline, models)
    else:
        metrics |= {"semantic": None, "narrative_accuracy": None, "keyword_accuracy": None}
        metrics["gap_closure_measured"] = False
        if production is not None:
            metrics["production_margin"] = alignment_margin(metrics["alignment"])
            metrics["production_margin_basis"] = ALIGNMENT_MARGIN_BASIS
    metrics["clip_score"], metrics["clip_score_note"] = (
        None,
        "skipped: evaluate.clip_model is not set",
    )
    if settings.clip_model is not None:
        clip = load_clip(settings.clip_model)
        models_embed = {"base": None} | {name: m.pipeline_embeds for name, m in models.items()}
        prompts = narratives[: settings.clip_prompts]
        metrics["clip_score"] = clip_scores(clip, pipeline, prompts, models_embed, params.sampling)
        metrics["clip_score_note"] = (
            f"{len(prompts)} held-out narrative prompts, {settings.clip_model}"
        )

    report = gated_report(
        metrics,
        settings.gates,
        sha256_file(folder / ADAPTER_WEIGHTS),
        adapter_dir=str(folder),
        profile=params.profile,
        base_model=params.base_model.id,
    )
    image_grid = None
    if grid and params.uses_shapes_world:
        image_grid = comparison_grid(params, adapter, grid_prompts(params), pipeline)
    seconds = time.monotonic() - started
    return EvaluationResult(report, image_grid, round(seconds, 1), round(load_seconds, 1))


def grid_prompts(params: Params) -> list[str]:
    """Narrative prompts of the held-out combinations for the image grid."""
    sets = prompt_sets(params.shapes, params.sampling, params.evaluate.images_per_combination)
    prompts = sets[HELDOUT_COMBINATIONS].prompts
    step = max(1, len(prompts) // params.evaluate.grid_prompts)
    return prompts[::step][: params.evaluate.grid_prompts]


def _semantic_metrics(
    params: Params, pipeline: StableDiffusionPipeline, models: dict[str, AdaptedTextPath]
) -> dict:
    """Oracle accuracy of base, adapter (and production) on the three prompt sets."""
    settings = params.evaluate
    sets = prompt_sets(params.shapes, params.sampling, settings.images_per_combination)
    scores = {"base": score_sets(pipeline, sets, params.sampling, embed=None)}
    for name, model in models.items():
        scores[name] = score_sets(pipeline, sets, params.sampling, embed=model.pipeline_embeds)
    semantic = {
        set_name: {model: scores[model][set_name].as_dict() for model in scores}
        for set_name in sets
    }
    base, adapter = scores["base"], scores["adapter"]
    closures = closure_by_figure(
        base[KEYWORD], base[HELDOUT_COMBINATIONS], adapter[HELDOUT_COMBINATIONS],
        settings.min_gap_points,
    )  # fmt: skip
    closure, used = gap_closure(closures)
    narrative = {m: attribute_mean(s[HELDOUT_COMBINATIONS]) for m, s in scores.items()}
    result = {
        "semantic": semantic,
        "semantic_n": {name: s.n for name, s in base.items()},
        "narrative_accuracy": narrative,
        "template_accuracy": {m: attribute_mean(s[HELDOUT_TEMPLATES]) for m, s in scores.items()},
        "keyword_accuracy": {m: attribute_mean(s[KEYWORD]) for m, s in scores.items()},
        "gap_closure": closure,
        "gap_closure_attributes": used,
        "gap_closure_by_figure": closures,
        "gap_closure_measured": True,
        "narrative_gain_points": 100 * (narrative["adapter"] - narrative["base"]),
    }
    if "production" in scores:
        result["production_margin"] = narrative["adapter"] - narrative["production"]
        result["production_margin_basis"] = "narrative accuracy, adapter minus production"
    return result


def alignment_margin(alignment: dict) -> float:
    """The adapter's margin over production without an oracle: the smaller of its cosine and
    retrieval top-1 gains over production, so neither figure may regress."""
    return min(alignment[m]["adapter"] - alignment[m]["production"] for m in ALIGNMENT_FIGURES)
