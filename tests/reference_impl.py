"""An independent re-statement of the official SUR-adapter forward pass, for parity tests.

Written from the digest in shared/reference/sur_adapter.md: `nn.TransformerEncoder` with
PyTorch defaults (batch_first=False), single-head attention whose value is the raw input,
an MLP residual, and `out = eta * fc(attn) + (1 - eta) * x` with `fc.weight` zeroed.
"""

from __future__ import annotations

import torch
from torch import nn


class ReferenceAttention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.query_layer = nn.Linear(width, width)
        self.key_layer = nn.Linear(width, width)
        self.value_layer = nn.Linear(width, width)  # present in the checkpoint, never used
        self.output_layer = nn.Sequential(
            nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)
        )

    def forward(self, query, key, value):
        scores = torch.matmul(self.query_layer(query), self.key_layer(key).transpose(-2, -1))
        weights = torch.softmax(scores / torch.sqrt(torch.tensor(float(self.width))), dim=-1)
        mixed = torch.matmul(weights, value) + value
        return self.output_layer(mixed) + mixed


class ReferenceAdapter(nn.Module):
    def __init__(
        self,
        depth: int = 2,
        adapter_weight: float = 0.1,
        width: int = 768,
        nhead: int = 8,
        ff_dim: int = 2048,
    ) -> None:
        super().__init__()
        self.adapter_weight = adapter_weight
        self.encoder_layer = nn.TransformerEncoderLayer(
            d_model=width, nhead=nhead, dim_feedforward=ff_dim
        )
        self.transformer_encoder = nn.TransformerEncoder(self.encoder_layer, num_layers=depth)
        self.attention = ReferenceAttention(width)
        self.fc = nn.Linear(width, width)
        nn.init.zeros_(self.fc.weight)

    def forward(self, x):
        encoded = self.transformer_encoder(x)
        attended = self.attention(encoded, x, x)
        fc_out = self.fc(attended)
        return self.adapter_weight * fc_out + (1 - self.adapter_weight) * x, encoded, fc_out
