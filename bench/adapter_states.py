"""How far can an adapter get on the shapes world? Retrieval on frozen CLIP states, side by side.

Research bench for issue 7 (the narrative gap). The base text encoder is frozen, so its
states are computed once; each candidate is then trained on them with the alignment (and
preservation) distances only, no UNet, which takes seconds to minutes instead of a full
`sur train`. A candidate's output is scored by nearest-keyword retrieval: for each prompt of
an evaluation set (the same sets `sur evaluate` uses), the closest of the 54 keyword-prompt
embeddings (MSE over all tokens) names a count, colour and shape, scored against the truth.
This is a proxy for the oracle on generated images, far cheaper to run.

Candidates, in one run:
- `ridge`: a closed-form linear map from all flattened, standardised narrative states to the
  keyword states (the linear ceiling; no keyword preservation);
- `adapter`: the adapter built from `params.yaml` (with its token mixer when one is set),
  trained with its alignment and preservation distances and the `train` learning rate, batch
  and steps;
- `states_mixer` (with `--states-mixer`): the same adapter, but its token mixer reads the
  encoder's output states instead of the token embeddings (the design before issue 18);
- `token_mlp` (with `--token-mlp`): a wider token model (per-token MLP to `--hidden`,
  learned positions, pre-norm transformer), the design the README says closes most of
  the gap, at a cost.

    .venv/bin/python bench/adapter_states.py [--steps N] [--batch-size N] [--lr X]
        [--distance mse] [--extra-rows N] [--states-mixer] [--token-mlp [--hidden N]]

Prints `RESULT <candidate>_<set>_<attribute> <accuracy>`,
`RESULT <candidate>_keyword_deviation <relative change of keyword embeddings>` and
`RESULT <candidate>_float_noise_gain <x>`: how many times a relative 1e-6 perturbation of the
frozen states (another runtime's rounding) grows at the output, max over elements, the worst
of 5 draws. The export's parity is about this gain times the runtimes' state difference.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import torch
from torch import nn

from suradapter.config import Params, load_params
from suradapter.data.shapes import (
    all_combinations,
    held_out_combinations,
    held_out_templates,
    keyword_prompt,
    narrative_prompt,
)
from suradapter.evaluate.semantic import HELDOUT_COMBINATIONS, HELDOUT_TEMPLATES, prompt_sets
from suradapter.model.adapter import SURAdapter
from suradapter.model.losses import feature_distance
from suradapter.model.text_path import token_embeddings
from suradapter.model.zoo import load_base_from_params

ATTRIBUTES = ("count", "colour", "shape")
# states [B, T, D], attention mask [B, T], token embeddings [B, T, D]
Encoded = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class StateEncoder:
    """The frozen base tokenizer + text encoder, prompts -> (states, mask, token embeddings)."""

    def __init__(self, params: Params) -> None:
        pipeline = load_base_from_params(params.base_model)
        self.tokenizer, self.text_encoder = pipeline.tokenizer, pipeline.text_encoder.eval()

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> Encoded:
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        states = self.text_encoder(tokens.input_ids)[0].float()
        embedded = token_embeddings(self.text_encoder, tokens.input_ids).float()
        return states, tokens.attention_mask, embedded


def training_pairs(params: Params, extra_rows: int, seed: int) -> tuple[list[str], list[str]]:
    """(narrative, keyword) prompts of the prepared train split, plus `extra_rows` drawn like
    it (seen combinations, training templates) to try a larger world."""
    table = pq.read_table(Path(params.embed.manifest), columns=["text", "prompt", "split"])
    rows = [row for row in table.to_pylist() if row["split"] == "train"]
    narratives, keywords = [r["text"] for r in rows], [r["prompt"] for r in rows]
    held = set(held_out_combinations(params.shapes))
    seen = [c for c in all_combinations(params.shapes) if c not in held]
    templates = sorted(set(range(12)) - set(held_out_templates(params.shapes)))
    rng = random.Random(seed)
    for _ in range(extra_rows):
        combo = rng.choice(seen)
        narratives.append(narrative_prompt(*combo, rng.choice(templates), rng))
        keywords.append(keyword_prompt(*combo))
    return [*narratives, ""], [*keywords, ""]  # "" = the caption-dropout row


class TokenMLP(nn.Module):
    """Per-token MLP to `hidden`, learned positions, pre-norm transformer, residual output."""

    def __init__(self, width: int, tokens: int, hidden: int, depth: int) -> None:
        super().__init__()
        self.lift = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.positions = nn.Parameter(torch.zeros(1, tokens, hidden))
        layer = nn.TransformerEncoderLayer(
            hidden, 4, 2 * hidden, dropout=0.0, batch_first=True, norm_first=True
        )
        self.mix = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, width))

    def forward(self, standardised: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mixed = self.mix(self.lift(standardised) + self.positions, src_key_padding_mask=mask == 0)
        return self.out(mixed)


def fit_ridge(narrative: Encoded, keyword: torch.Tensor, scale: Callable, lam: float) -> Model:
    flat = scale(narrative[0]).flatten(1)
    target = keyword.flatten(1)
    mean = target.mean(0)
    gram = flat.T @ flat + lam * torch.eye(flat.shape[1])
    weights = torch.linalg.solve(gram, flat.T @ (target - mean))
    return lambda states, mask, tokens: (scale(states).flatten(1) @ weights + mean).view_as(states)


def train_model(
    module: nn.Module,
    forward: Model,
    narrative: Encoded,
    keyword: Encoded,
    params: Params,
    steps: int,
    batch_size: int,
) -> float:
    """AdamW with warm-up + cosine (as `sur train`), alignment + preservation distances."""
    lr = params.train.learning_rate
    optimiser = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(params.train.seed)
    align, keep = params.loss.alignment, params.loss.preservation
    started = time.monotonic()
    module.train()
    for step in range(steps):
        warm = min(1.0, (step + 1) / params.train.warmup_steps)
        for group in optimiser.param_groups:
            group["lr"] = lr * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        rows = torch.randint(0, len(narrative[0]), (batch_size,), generator=generator)
        states, target = narrative[0][rows], keyword[0][rows]
        adapted = forward(states, narrative[1][rows], narrative[2][rows])
        loss = feature_distance(adapted, target, align.distance)
        if keep.weight > 0:
            kept = forward(target, keyword[1][rows], keyword[2][rows])
            loss = loss + keep.weight * feature_distance(kept, target, keep.distance)
        optimiser.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(module.parameters(), params.train.max_grad_norm)
        optimiser.step()
    module.eval()
    return time.monotonic() - started


def retrieval(outputs: torch.Tensor, truth: list, keywords: torch.Tensor, combos: list) -> list:
    """Per attribute: the share of rows whose nearest keyword embedding has the right value."""
    nearest = (outputs[:, None] - keywords[None]).pow(2).mean(-1).sum(-1).argmin(1).tolist()
    return [
        sum(combos[n][i] == t[i] for n, t in zip(nearest, truth, strict=True)) / len(truth)
        for i in range(len(ATTRIBUTES))
    ]


def float_noise_gain(model: Model, encoded: Encoded, relative: float = 1e-6) -> float:
    """Max |output change| / max |state change| for a relative `relative` perturbation of the
    states (token embeddings are a lookup, exact in every runtime); worst of 5 draws."""
    states, mask, tokens = encoded
    generator = torch.Generator().manual_seed(0)
    clean = model(states, mask, tokens)
    gains = []
    for _ in range(5):
        sign = torch.rand(states.shape, generator=generator) * 2 - 1
        change = sign * relative * states.abs().clamp_min(1e-3)
        moved = model(states + change, mask, tokens)
        gains.append(float((moved - clean).abs().max() / change.abs().max()))
    return max(gains)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="default: train.max_steps")
    parser.add_argument("--batch-size", type=int, help="default: train.batch_size")
    parser.add_argument("--extra-rows", type=int, default=0)
    parser.add_argument("--states-mixer", action="store_true")
    parser.add_argument("--token-mlp", action="store_true")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ridge-lambda", type=float, default=1.0)
    parser.add_argument("--lr", type=float, help="default: train.learning_rate")
    parser.add_argument(
        "--distance", choices=["softmax_kl", "mse", "cosine"], help="default: loss params"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    params = load_params()
    if args.lr:
        params = params.model_copy(
            update={"train": params.train.model_copy(update={"learning_rate": args.lr})}
        )
    if args.distance:
        loss = params.loss
        update = {"distance": args.distance}
        loss = loss.model_copy(
            update={
                "alignment": loss.alignment.model_copy(update=update),
                "preservation": loss.preservation.model_copy(update=update),
            }
        )
        params = params.model_copy(update={"loss": loss})
    steps = args.steps or params.train.max_steps
    batch_size = args.batch_size or params.train.batch_size
    encode = StateEncoder(params)
    narratives, keywords = training_pairs(params, args.extra_rows, params.train.seed)
    narrative, keyword = encode(narratives), encode(keywords)
    combos = all_combinations(params.shapes)
    keyword_bank = encode([keyword_prompt(*c) for c in combos])[0]
    sets = prompt_sets(params.shapes, params.sampling, params.evaluate.images_per_combination)
    evaluation = {name: (encode(s.prompts), s.targets) for name, s in sets.items()}
    both = torch.cat([narrative[0], keyword[0]])
    mean, std = both.mean(0, keepdim=True), both.std(0, keepdim=True) + 1e-4

    def scale(states: torch.Tensor) -> torch.Tensor:
        return (states - mean) / std

    candidates: dict[str, Model] = {
        "base": lambda states, mask, tokens: states,
        "ridge": fit_ridge(narrative, keyword[0], scale, args.ridge_lambda),
    }
    width = narrative[0].shape[-1]
    adapter_params = params.adapter.model_copy(update={"teacher_dim": None})
    adapter = SURAdapter.from_params(adapter_params, width, narrative[0].shape[1])
    if adapter.has_token_mixer:  # standardised on training prompts, as `sur train` does
        adapter.mixer.fit_statistics([narrative[2], keyword[2]])
    trainable: dict[str, tuple[nn.Module, Model]] = {
        "adapter": (adapter, lambda s, m, t: adapter(s, m, t).adapted)
    }
    if args.states_mixer and adapter.has_token_mixer:
        previous = SURAdapter.from_params(adapter_params, width, narrative[0].shape[1])
        previous.mixer.fit_statistics([narrative[0], keyword[0]])
        trainable["states_mixer"] = (previous, lambda s, m, t: previous(s, m, s).adapted)
    if args.token_mlp:
        token_model = TokenMLP(width, narrative[0].shape[1], args.hidden, depth=2)
        trainable["token_mlp"] = (token_model, lambda s, m, t: s + token_model(scale(s), m))
    for name, (module, forward) in trainable.items():
        seconds = train_model(module, forward, narrative, keyword, params, steps, batch_size)
        print(f"{name}: {steps} steps in {seconds:.0f} s")
        candidates[name] = forward
    short = {HELDOUT_COMBINATIONS: "heldout_combinations", HELDOUT_TEMPLATES: "heldout_templates"}
    results = []
    with torch.no_grad():
        for name, model_fn in candidates.items():
            for set_name, label in short.items():
                encoded, truth = evaluation[set_name]
                scores = retrieval(model_fn(*encoded), truth, keyword_bank, combos)
                results += [
                    (f"{name}_{label}_{a}", s) for a, s in zip(ATTRIBUTES, scores, strict=True)
                ]
            encoded, _ = evaluation["keyword"]
            change = (model_fn(*encoded) - encoded[0]).norm() / encoded[0].norm()
            results.append((f"{name}_keyword_deviation", float(change)))
            results.append((f"{name}_float_noise_gain", float_noise_gain(model_fn, encoded)))
    for name, value in results:
        print(f"RESULT {name} {value:.3f}")


if __name__ == "__main__":
    main()
