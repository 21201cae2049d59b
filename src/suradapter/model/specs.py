"""Architectures as data: `configs/<name>.json`, read without importing torch or diffusers.

Also the base model's native image size, from its configs alone (no weights), so that a stage
can refuse a resolution the model was not built for before anything heavy loads.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError

from suradapter.config import BaseModelParams

BUILTIN_MODELS = ("tiny",)  # built in memory by the zoo; the others are `sur zoo build` folders


def architecture_names() -> list[str]:
    """The architectures declared in `configs/` (the `tiny` test model included)."""
    folder = resources.files("suradapter.model").joinpath("configs")
    names = (p.name for p in folder.iterdir() if p.name.endswith(".json"))
    return sorted(name.removesuffix(".json") for name in names)


@cache
def _spec_text(name: str) -> str:
    return resources.files("suradapter.model").joinpath(f"configs/{name}.json").read_text()


def architecture_spec(name: str) -> dict[str, Any]:
    """The declared architecture `name`. Raises KeyError listing the known ones."""
    if name not in architecture_names():
        known = ", ".join(architecture_names())
        raise KeyError(f"'{name}' is not a known architecture; known: {known}")
    return json.loads(_spec_text(name))


def builtin_corpus(name: str) -> list[str]:
    """The tokenizer training corpus of a built-in model, one line per entry."""
    text = resources.files("suradapter.model").joinpath(f"configs/{name}_corpus.txt").read_text()
    return [line for line in text.splitlines() if line.strip()]


def declared_native_resolution(params: BaseModelParams) -> int | None:
    """The image side the base model is built for (UNet sample size x VAE downsampling),
    read from its configs alone. None when they are not on this machine (an uncached hub id).
    """
    if params.id in BUILTIN_MODELS:
        spec = architecture_spec(params.id)
        unet, vae = spec["unet"], spec["vae"]
    else:
        unet, vae = (_component_config(params, name) for name in ("unet", "vae"))
        if unet is None or vae is None:
            return None
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def _component_config(params: BaseModelParams, component: str) -> dict[str, Any] | None:
    local = Path(params.id).expanduser()
    if local.is_dir():
        path = local / component / "config.json"
        return json.loads(path.read_text()) if path.is_file() else None
    try:
        cached = hf_hub_download(
            params.id, f"{component}/config.json", revision=params.revision, local_files_only=True
        )
    except (OSError, ValueError, HfHubHTTPError):
        return None
    return json.loads(Path(cached).read_text())


def check_resolution(resolution: int | None, native: int | None, model_id: str) -> None:
    """Raise ValueError naming both when `resolution` (of prepared images) is not the base
    model's native size; an unknown side (None) is not checked."""
    if None not in (resolution, native) and resolution != native:
        raise ValueError(
            f"images are prepared at {resolution} px (prepare.resolution) but base_model.id "
            f"'{model_id}' is built for {native} px (UNet sample size x VAE downsampling): set "
            f"prepare.resolution: {native} and re-run `sur prepare`"
        )
