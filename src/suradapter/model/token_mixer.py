"""A position-aware token mixer: the fixed-mode branch that moves information between tokens.

It reads the prompt's token embeddings (the frozen text encoder's input table), not the
encoder's output states. Narrative words the base encoder never saw (the shapes world) are
faint in those states: telling them apart took a learned gain of 50-90x on a few feature
directions, and the same gain amplified the states' float noise (ONNX Runtime vs PyTorch) to
3e-5 at the output. A table lookup is exact in every runtime, and the word is not faint there.

Every (token, channel) input feature is standardised with statistics fitted on training
prompts (constant features, such as the first token's, are zeroed), then MLP-Mixer blocks
run: an MLP across token positions (shared over channels), then one across channels. Its
output projection starts at zero, so an untrained branch adds nothing. Prompts must be padded
to `tokens`, as the Stable Diffusion pipeline always does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

# What the mixer reads; saved in the adapter's config so an adapter whose mixer read
# something else is refused at load (`suradapter.model.adapter`).
MIXER_INPUT = "token_embeddings"

# A feature whose fitted std is below this fraction of the features' RMS std is constant
# (e.g. every state of the first token: CLIP's text encoder is causal). It is ignored rather
# than divided by its std, which would amplify float noise (ONNX vs PyTorch) ~10^4 times.
CONSTANT_FRACTION = 1e-3


class MixerBlock(nn.Module):
    """Pre-norm residual MLPs: across tokens, then across channels."""

    def __init__(self, tokens: int, hidden: int, token_hidden: int) -> None:
        super().__init__()
        self.token_norm = nn.LayerNorm(hidden)
        self.token_mlp = nn.Sequential(
            nn.Linear(tokens, token_hidden), nn.GELU(), nn.Linear(token_hidden, tokens)
        )
        self.channel_norm = nn.LayerNorm(hidden)
        self.channel_mlp = nn.Sequential(
            nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        mixed = self.token_mlp(self.token_norm(features).transpose(1, 2)).transpose(1, 2)
        features = features + mixed
        return features + self.channel_mlp(self.channel_norm(features))


class TokenMixer(nn.Module):
    """Standardise [B, tokens, width] token embeddings, mix, and return a zero-initialised
    update of the same shape."""

    def __init__(self, width: int, tokens: int, hidden: int, token_hidden: int, depth: int) -> None:
        super().__init__()
        self.tokens = tokens
        self.register_buffer("input_mean", torch.zeros(tokens, width))
        self.register_buffer("input_scale", torch.ones(tokens, width))  # 1 / std; 0: constant
        self.lift = nn.Linear(width, hidden)
        self.blocks = nn.ModuleList(MixerBlock(tokens, hidden, token_hidden) for _ in range(depth))
        self.output_norm = nn.LayerNorm(hidden)
        self.output = nn.Linear(hidden, width)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    @torch.no_grad()
    def fit_statistics(self, inputs: Iterable[torch.Tensor]) -> int:
        """Set the per-(token, channel) mean and 1/std from batches of inputs [B, tokens, width].

        Returns the number of rows seen. Raises ValueError for fewer than 2 rows.
        """
        count, total, squares = 0, 0.0, 0.0
        for batch in inputs:
            batch = batch.to(self.input_mean.device, torch.float64)
            count += batch.shape[0]
            total = total + batch.sum(0)
            squares = squares + batch.pow(2).sum(0)
        if count < 2:
            raise ValueError(f"token mixer statistics need at least 2 rows, got {count}")
        mean = total / count
        variance = (squares - count * mean.pow(2)) / (count - 1)
        std = variance.clamp_min(0).sqrt()
        varying = std > CONSTANT_FRACTION * std.pow(2).mean().sqrt()
        self.input_mean.copy_(mean)
        self.input_scale.copy_(torch.where(varying, 1.0 / std.clamp_min(1e-30), 0.0))
        return count

    def forward(self, token_embeddings: torch.Tensor) -> torch.Tensor:
        if token_embeddings.shape[1] != self.tokens:
            raise ValueError(
                f"the token mixer expects prompts padded to {self.tokens} tokens, "
                f"got {token_embeddings.shape[1]}"
            )
        standardised = (token_embeddings - self.input_mean) * self.input_scale
        features = self.lift(standardised.to(self.lift.weight.dtype))
        for block in self.blocks:
            features = block(features)
        return self.output(self.output_norm(features))
