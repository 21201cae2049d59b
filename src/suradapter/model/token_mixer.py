"""A position-aware token mixer: the fixed-mode branch that moves information between tokens.

The SUR-adapter's attention mixes raw CLIP states, whose narrative words can be faint when the
base encoder never saw them (the shapes world). This branch standardises every (token, channel)
feature with statistics fitted on training states (constant features are zeroed), then runs
MLP-Mixer blocks: an MLP across
token positions (shared over channels), then one across channels. Its output projection starts
at zero, so an untrained branch adds nothing. Prompts must be padded to `tokens`, as the
Stable Diffusion pipeline always does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

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
    """Standardise [B, tokens, width] states, mix, and return a zero-initialised update."""

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
    def fit_statistics(self, states: Iterable[torch.Tensor]) -> int:
        """Set the per-(token, channel) mean and 1/std from batches of states [B, tokens, width].

        Returns the number of rows seen. Raises ValueError for fewer than 2 rows.
        """
        count, total, squares = 0, 0.0, 0.0
        for batch in states:
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

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.shape[1] != self.tokens:
            raise ValueError(
                f"the token mixer expects prompts padded to {self.tokens} tokens, "
                f"got {hidden_states.shape[1]}"
            )
        standardised = (hidden_states - self.input_mean) * self.input_scale
        features = self.lift(standardised.to(self.lift.weight.dtype))
        for block in self.blocks:
            features = block(features)
        return self.output(self.output_norm(features))
