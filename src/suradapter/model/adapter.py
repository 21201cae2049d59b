"""The SUR-adapter: a small transformer that rewrites frozen CLIP text embeddings.

One class, two modes:
- `reference`: bug-compatible with the official `SUR_adapter.py`. Its encoder runs with
  `batch_first=False` (so a [B, T, D] input attends across samples at each token position),
  it keeps the unused template layer and `attention.value_layer`, and it loads the official
  checkpoints strictly.
- `fixed` (default): `batch_first=True` with a key-padding mask, so attention runs over the
  tokens of each prompt; no unused weights; an optional learnable teacher projection; an
  optional position-aware token mixer (`suradapter.model.token_mixer`) added to the output,
  which reads the prompt's token embeddings.

Both fuse as `out = eta * fc(attn) + (1 - eta) * x` (+ `mixer(tokens)`), with `fc.weight` and
the mixer's output projection zero-initialised, so an untrained adapter changes little.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from suradapter.config import AdapterParams, adapter_rule_violations
from suradapter.model.token_mixer import MIXER_INPUT, TokenMixer

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

AdapterMode = Literal["fixed", "reference"]
MODES: tuple[AdapterMode, ...] = ("fixed", "reference")


@dataclass
class SURAdapterOutput(BaseOutput):
    """What the adapter returns.

    adapted: fused embeddings for the UNet, [B, T, D].
    encoder_features: transformer-encoder output (the LLM-distillation target side), [B, T, D].
    fc_output: the fc projection before fusion, [B, T, D].
    mixer_output: the token mixer's update (already in `adapted`), [B, T, D]; None without one.

    The fields after the first default to None, as in diffusers' outputs, so the output can
    be rebuilt from a mapping: Accelerate does that to cast it to fp32 under mixed precision.
    """

    adapted: torch.Tensor
    encoder_features: torch.Tensor | None = None
    fc_output: torch.Tensor | None = None
    mixer_output: torch.Tensor | None = None


class TokenAttention(nn.Module):
    """Single-head attention with raw-value residual and an MLP, as in the reference.

    `h = softmax(Q(query) K(key)^T / sqrt(D)) key + key; out = MLP(h) + h`. The value is the
    un-projected input. `value_layer` exists only in reference mode, where it is never used.
    """

    def __init__(self, width: int, keep_value_layer: bool) -> None:
        super().__init__()
        self.width = width
        self.query_layer = nn.Linear(width, width)
        self.key_layer = nn.Linear(width, width)
        if keep_value_layer:
            self.value_layer = nn.Linear(width, width)
        self.output_layer = nn.Sequential(
            nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)
        )

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        scores = self.query_layer(query) @ self.key_layer(key).transpose(-2, -1)
        scores = scores / math.sqrt(self.width)
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, :], float("-inf"))
        weighted = scores.softmax(dim=-1) @ key + key
        return self.output_layer(weighted) + weighted


class SURAdapter(ModelMixin, ConfigMixin):
    """SUR-adapter over frozen text-encoder states; `save_pretrained` carries eta and shape."""

    @register_to_config
    def __init__(
        self,
        width: int = 768,
        depth: int = 2,
        adapter_weight: float = 0.1,
        mode: AdapterMode = "fixed",
        num_heads: int = 8,
        ff_dim: int = 2048,
        dropout: float = 0.1,
        teacher_dim: int | None = None,
        init_seed: int = 0,
        token_mixer: dict | None = None,
    ) -> None:
        """`token_mixer`: keyword arguments of `TokenMixer` (tokens, hidden, token_hidden,
        depth) and `reads` (its input, `MIXER_INPUT`) for the fixed-mode mixer branch, or
        None."""
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"adapter mode '{mode}' is unknown; use one of {MODES}")
        problems = adapter_rule_violations(mode, width, num_heads, teacher_dim, token_mixer)
        if problems:
            raise ValueError("; ".join(problems))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self._build(width, depth, mode, num_heads, ff_dim, dropout, teacher_dim)
            if token_mixer is not None:
                self.mixer = TokenMixer(width, **_mixer_arguments(token_mixer))

    def _build(
        self,
        width: int,
        depth: int,
        mode: AdapterMode,
        num_heads: int,
        ff_dim: int,
        dropout: float,
        teacher_dim: int | None,
    ) -> None:
        reference = mode == "reference"
        layer = nn.TransformerEncoderLayer(
            d_model=width,
            nhead=num_heads,
            dim_feedforward=ff_dim,
            dropout=dropout,
            batch_first=not reference,
        )
        # Nested tensors would zero padded positions in eval mode only; keep train == eval.
        self.transformer_encoder = nn.TransformerEncoder(
            layer, num_layers=depth, enable_nested_tensor=False
        )
        if reference:
            self.encoder_layer = layer  # the reference keeps its (unused) template layer
        self.attention = TokenAttention(width, keep_value_layer=reference)
        self.fc = nn.Linear(width, width)
        nn.init.zeros_(self.fc.weight)
        if teacher_dim is not None:
            self.teacher_projection = nn.Linear(teacher_dim, width)

    @classmethod
    def from_params(
        cls, params: AdapterParams, text_width: int | None = None, text_tokens: int | None = None
    ) -> SURAdapter:
        """Build a fresh adapter from params; `text_width` and `text_tokens` are the base text
        encoder's hidden size and the tokenizer's max length.

        Raises ValueError when neither gives a width (or a mixer's token count), or when they
        disagree.
        """
        width = params.width or text_width
        if width is None:
            raise ValueError("adapter width unknown: set adapter.width or load the base model")
        if text_width is not None and width != text_width:
            raise ValueError(
                f"adapter.width {width} does not match the base text encoder width {text_width}"
            )
        return cls(
            width=width,
            depth=params.depth,
            adapter_weight=params.adapter_weight,
            mode=params.mode,
            num_heads=params.num_heads,
            ff_dim=params.ff_dim,
            dropout=params.dropout,
            teacher_dim=params.teacher_dim if params.mode == "fixed" else None,
            init_seed=params.init_seed,
            token_mixer=_mixer_config(params, text_tokens),
        )

    @classmethod
    def for_pipeline(cls, params: AdapterParams, pipeline: StableDiffusionPipeline) -> SURAdapter:
        """Build a fresh adapter sized for `pipeline`'s text encoder and tokenizer."""
        width = pipeline.text_encoder.config.hidden_size
        return cls.from_params(params, width, pipeline.tokenizer.model_max_length)

    @property
    def adapter_weight(self) -> float:
        return float(self.config.adapter_weight)

    @property
    def is_reference(self) -> bool:
        return self.config.mode == "reference"

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_embeddings: torch.Tensor | None = None,
    ) -> SURAdapterOutput:
        """Adapt text-encoder states [B, T, D]; `attention_mask` [B, T] is 1 for real tokens.

        `token_embeddings` [B, T, D], the text encoder's input embeddings of the same prompts
        (`suradapter.model.text_path.token_embeddings`), feed the token mixer and are required
        when there is one. Reference mode ignores the mask, as the reference does.
        """
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != self.config.width:
            raise ValueError(
                f"adapter expects hidden_states [batch, tokens, {self.config.width}], "
                f"got {tuple(hidden_states.shape)}"
            )
        padding = None
        if attention_mask is not None and not self.is_reference:
            padding = attention_mask.to(hidden_states.device) == 0
        encoded = self.transformer_encoder(hidden_states, src_key_padding_mask=padding)
        attended = self.attention(encoded, hidden_states, key_padding_mask=padding)
        fc_output = self.fc(attended)
        eta = self.adapter_weight
        adapted = eta * fc_output + (1.0 - eta) * hidden_states
        mixer_output = None
        if self.has_token_mixer:
            if token_embeddings is None:
                raise ValueError(
                    "this adapter's token mixer reads the prompts' token embeddings: pass "
                    "token_embeddings (suradapter.model.text_path.token_embeddings)"
                )
            mixer_output = self.mixer(token_embeddings)
            adapted = adapted + mixer_output
        return SURAdapterOutput(
            adapted=adapted,
            encoder_features=encoded,
            fc_output=fc_output,
            mixer_output=mixer_output,
        )

    @property
    def has_token_mixer(self) -> bool:
        return "mixer" in self._modules

    def project_teacher(self, teacher_features: torch.Tensor) -> torch.Tensor:
        """Map pooled teacher features [B, teacher_dim] to [B, 1, width].

        Raises ValueError if this adapter was built without a teacher projection.
        """
        if not hasattr(self, "teacher_projection"):
            raise ValueError("this adapter has no teacher projection (teacher_dim is null)")
        return self.teacher_projection(teacher_features)[:, None, :]

    def num_inference_parameters(self) -> int:
        """Elements of the parameters the inference path uses (not the unused and
        training-only ones that `num_parameters()` counts too)."""
        skip = ("encoder_layer.", "attention.value_layer.", "teacher_projection.")
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith(skip))

    @classmethod
    def from_reference_checkpoint(
        cls, path: str | Path, adapter_weight: float = 0.1, **config: object
    ) -> SURAdapter:
        """Load an official `adapter.pt` state_dict strictly into a reference-mode adapter.

        eta is not stored in those checkpoints, so it is given here. Raises ValueError when the
        file is not a reference state_dict.
        """
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "fc.weight" not in state:
            raise ValueError(f"{path}: not a SUR-adapter state_dict (no 'fc.weight' key)")
        width = state["fc.weight"].shape[0]
        depth = 1 + max(
            int(key.split(".")[2]) for key in state if key.startswith("transformer_encoder.layers.")
        )
        ff_dim = state["transformer_encoder.layers.0.linear1.weight"].shape[0]
        config = {"num_heads": 8, "dropout": 0.1, **config}
        adapter = cls(
            width=width,
            depth=depth,
            adapter_weight=adapter_weight,
            mode="reference",
            ff_dim=ff_dim,
            **config,
        )
        try:
            adapter.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{path}: does not match the reference layout: {err}") from None
        return adapter.eval()


def _mixer_config(params: AdapterParams, text_tokens: int | None) -> dict | None:
    """The `token_mixer` argument of `SURAdapter` from params (None without a mixer)."""
    mixer = params.token_mixer
    if mixer is None:
        return None
    tokens = mixer.tokens or text_tokens
    if tokens is None:
        raise ValueError(
            "token mixer length unknown: set adapter.token_mixer.tokens or load the base model"
        )
    if text_tokens is not None and tokens != text_tokens:
        raise ValueError(
            f"adapter.token_mixer.tokens {tokens} does not match the tokenizer's max length "
            f"{text_tokens}"
        )
    return {
        "tokens": tokens,
        "hidden": mixer.hidden,
        "token_hidden": mixer.token_hidden,
        "depth": mixer.depth,
        "reads": MIXER_INPUT,
    }


def _mixer_arguments(config: dict) -> dict:
    """`TokenMixer` keyword arguments from a `token_mixer` config.

    Raises ValueError unless it says the mixer reads `MIXER_INPUT`: an adapter saved before
    its mixer read token embeddings (it read the encoder's output states) has no `reads`,
    and its weights mean something else.
    """
    arguments = dict(config)
    reads = arguments.pop("reads", None)
    if reads != MIXER_INPUT:
        found = (
            "has no 'reads' (saved by an earlier version)" if reads is None else f"reads {reads!r}"
        )
        raise ValueError(
            f"this adapter's token_mixer config {found}; this version's mixer reads "
            f"{MIXER_INPUT!r}: retrain the adapter"
        )
    return arguments


def describe_adapter(adapter: SURAdapter) -> dict[str, object]:
    """Return the facts `sur adapter info` prints: mode, eta, shape and parameter counts."""
    config = adapter.config
    projection = getattr(adapter, "teacher_projection", None)
    return {
        "mode": config.mode,
        "adapter_weight (eta)": config.adapter_weight,
        "width": config.width,
        "depth": config.depth,
        "heads / ff_dim": f"{config.num_heads} / {config.ff_dim}",
        "token mixer": (
            ", ".join(f"{k} {v}" for k, v in config.token_mixer.items())
            if config.token_mixer
            else "none"
        ),
        "inference parameters": f"{adapter.num_inference_parameters():,}",
        "teacher projection (training only)": (
            f"{sum(p.numel() for p in projection.parameters()):,}"
            if projection is not None
            else "none"
        ),
        "trainable parameters": f"{adapter.num_parameters(only_trainable=True):,}",
        "parameters in state_dict": f"{adapter.num_parameters():,}",
    }
