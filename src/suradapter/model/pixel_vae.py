"""A fixed, weight-free "autoencoder" for tiny worlds: pixel-unshuffle down, pixel-shuffle up.

It stands in for `AutoencoderKL` in a `StableDiffusionPipeline`: `encode` folds each f x f
pixel patch into channels (3x32x32 -> 48x8x8 for f=4) and `decode` unfolds it exactly. A
trained VAE cannot be learned in the CPU budget of the shapes world (see the prototype
notes); this one is lossless and free. `block_out_channels` only tells the pipeline the
downscale factor (2 ** (len - 1) == f).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput


@dataclass
class LatentDistributionOutput(BaseOutput):
    latent_dist: DeterministicLatent


class DeterministicLatent:
    """A point "distribution", so callers written for AutoencoderKL keep working."""

    def __init__(self, latents: torch.Tensor) -> None:
        self.latents = latents

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latents

    def mode(self) -> torch.Tensor:
        return self.latents


@dataclass
class DecoderOutput(BaseOutput):
    sample: torch.Tensor


class PixelUnshuffleVAE(ModelMixin, ConfigMixin):
    """Lossless space-to-depth latents; no trainable weights."""

    @register_to_config
    def __init__(
        self,
        factor: int = 4,
        in_channels: int = 3,
        scaling_factor: float = 1.0,
        block_out_channels: tuple[int, ...] | None = None,
        latent_channels: int | None = None,
    ) -> None:
        super().__init__()
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"pixel-unshuffle factor must be a power of two, got {factor}")
        expected_blocks = int(math.log2(factor)) + 1
        self.register_to_config(
            block_out_channels=list(block_out_channels or [in_channels] * expected_blocks),
            latent_channels=latent_channels or in_channels * factor * factor,
        )
        # A saved one-element buffer gives the module a dtype, a device and a weights file, as
        # pipelines and `from_pretrained` expect of every component.
        self.register_buffer("anchor", torch.zeros(1))

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        latents = F.pixel_unshuffle(x, self.config.factor) * self.config.scaling_factor
        dist = DeterministicLatent(latents)
        return LatentDistributionOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        images = F.pixel_shuffle(z / self.config.scaling_factor, self.config.factor)
        return DecoderOutput(sample=images) if return_dict else (images,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x).latent_dist.mode()).sample
