"""A position-aware token mixer: the fixed-mode branch that moves information between tokens.

The SUR-adapter's attention mixes raw CLIP states, whose narrative words can be faint when the
base encoder never saw them (the shapes world). This branch standardises every (token, channel)
feature with statistics fitted on training states, then runs MLP-Mixer blocks: an MLP across
token positions (shared over channels), then one across channels. Its output projection starts
at zero, so an untrained branch adds nothing. Prompts must be padded to `tokens`, as the
Stable Diffusion pipeline always does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

MIN_STD = 1e-4  # floor of a fitted standard deviation (constant features)


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
        self.register_buffer("input_std", torch.ones(tokens, width))
        self.lift = nn.Linear(width, hidden)
        self.blocks = nn.ModuleList(MixerBlock(tokens, hidden, token_hidden) for _ in range(depth))
        self.output_norm = nn.LayerNorm(hidden)
        self.output = nn.Linear(hidden, width)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    @torch.no_grad()
    def fit_statistics(self, states: Iterable[torch.Tensor]) -> int:
        """Set the per-(token, channel) mean and std from batches of states [B, tokens, width].

        Returns the number of rows seen. Raises ValueError when there are none.
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
        self.input_mean.copy_(mean)
        self.input_std.copy_(variance.clamp_min(0).sqrt().clamp_min(MIN_STD))
        return count

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.shape[1] != self.tokens:
            raise ValueError(
                f"the token mixer expects prompts padded to {self.tokens} tokens, "
                f"got {hidden_states.shape[1]}"
            )
        standardised = (hidden_states - self.input_mean) / self.input_std
        features = self.lift(standardised.to(self.lift.weight.dtype))
        for block in self.blocks:
            features = block(features)
        return self.output(self.output_norm(features))
