"""Resolve a base text-to-image model: 'tiny' (built from configs), a local folder, or a hub id.

Architectures are data (`configs/<name>.json`), built by one factory and seeded, so the same
name always gives the same weights, offline. Anything else is loaded with
`StableDiffusionPipeline.from_pretrained`; when that needs the hub and the hub cannot be
reached, it fails at once with an error that says what to set.
"""

from __future__ import annotations

import socket
import tempfile
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from diffusers import StableDiffusionPipeline
from huggingface_hub import constants as hub_constants
from huggingface_hub import is_offline_mode
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from transformers import CLIPTokenizer

import suradapter.model.pixel_vae  # noqa: F401  (lets diffusers load PixelUnshuffleVAE folders)
from suradapter.config import BaseModelParams
from suradapter.devices import TORCH_DTYPES
from suradapter.model.architectures import diffusion_components
from suradapter.model.specs import BUILTIN_MODELS, architecture_spec, builtin_corpus
from suradapter.model.tokenizer import build_clip_tokenizer

HUB_PROBE_TIMEOUT_S = 3.0


class BaseModelNotFoundError(RuntimeError):
    """The base model named in params cannot be resolved here."""


@cache
def _builtin_tokenizer(name: str) -> CLIPTokenizer:
    spec = architecture_spec(name)["tokenizer"]
    with tempfile.TemporaryDirectory(prefix=f"sur-{name}-tokenizer-") as folder:
        return build_clip_tokenizer(
            builtin_corpus(name),
            folder,
            num_merges=spec["num_merges"],
            model_max_length=spec["model_max_length"],
            min_frequency=spec.get("min_frequency", 1),
        )


def build_builtin_pipeline(name: str, seed: int = 0) -> StableDiffusionPipeline:
    """Build a built-in model from its configs with seeded weights; same seed, same weights."""
    if name not in BUILTIN_MODELS:
        raise KeyError(f"'{name}' is not a built-in model; known: {', '.join(BUILTIN_MODELS)}")
    return diffusion_components(architecture_spec(name), _builtin_tokenizer(name), seed)


def native_resolution(pipeline: StableDiffusionPipeline) -> int:
    """The image side the base model was built for: UNet sample size x VAE downsampling."""
    return int(pipeline.unet.config.sample_size) * int(pipeline.vae_scale_factor)


def load_base_pipeline(
    model_id: str, revision: str | None = None, dtype: str = "float32", seed: int = 0
) -> StableDiffusionPipeline:
    """Resolve `model_id` to a `StableDiffusionPipeline` with frozen, eval-mode components.

    Raises BaseModelNotFoundError when it is neither built in, a local folder, cached, nor
    reachable on the hub.
    """
    if model_id in BUILTIN_MODELS:
        pipeline = build_builtin_pipeline(model_id, seed=seed)
    else:
        kwargs = dict(dtype=TORCH_DTYPES[dtype], safety_checker=None, requires_safety_checker=False)
        local = Path(model_id).expanduser()
        if local.is_dir():
            if not (local / "model_index.json").is_file():
                raise BaseModelNotFoundError(
                    f"base_model.id '{model_id}' is a folder but not a diffusers model "
                    f"(no model_index.json in {local})"
                )
            pipeline = StableDiffusionPipeline.from_pretrained(
                local, local_files_only=True, **kwargs
            )
        else:
            pipeline = _load_from_hub(model_id, revision, kwargs)
        pipeline.set_progress_bar_config(disable=True)
    for module in (pipeline.text_encoder, pipeline.unet, pipeline.vae):
        module.requires_grad_(False).eval()
    return pipeline


def load_base_from_params(params: BaseModelParams) -> StableDiffusionPipeline:
    """`load_base_pipeline` for the `base_model` params section."""
    return load_base_pipeline(params.id, params.revision, params.dtype, params.seed)


def _load_from_hub(
    model_id: str, revision: str | None, kwargs: dict[str, Any]
) -> StableDiffusionPipeline:
    try:
        return StableDiffusionPipeline.from_pretrained(
            model_id, revision=revision, local_files_only=True, **kwargs
        )
    except (OSError, ValueError):
        pass  # not in the local cache: try the hub below
    reason = hub_unreachable_reason()
    if reason:
        raise BaseModelNotFoundError(
            f"base_model.id '{model_id}' is not 'tiny', not a local folder and not in the "
            f"Hugging Face cache, and the hub cannot be used: {reason}. Set base_model.id in "
            "params.yaml (or configs/<profile>.yaml) to a local diffusers folder, or download "
            f"it first where the hub is reachable: `hf download {model_id}`."
        )
    try:
        return StableDiffusionPipeline.from_pretrained(model_id, revision=revision, **kwargs)
    except RepositoryNotFoundError:
        raise BaseModelNotFoundError(
            f"base_model.id '{model_id}': no such model on the hub (or it is gated: log in "
            "with `hf auth login`)"
        ) from None
    except HfHubHTTPError as err:
        raise BaseModelNotFoundError(f"base_model.id '{model_id}': hub error: {err}") from None


def hub_unreachable_reason(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Return why the hub cannot be used right now, or None if a TCP connect succeeds."""
    if is_offline_mode():
        return "huggingface_hub is in offline mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set)"
    url = urlparse(hub_constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout_s):
            return None
    except OSError as err:
        return f"{url.hostname}:{port} is unreachable ({err})"
