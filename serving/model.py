"""A registered version made ready to serve: verified files, ONNX text path, base UNet/VAE.

`load_version` opens the exported text path of a fetched version (its files checked against
the registry's manifest by the fetch) with the loader the pyfunc model uses (`load_export`),
and attaches the base diffusion pipeline named in `export.json`. `smoke_test`
embeds fixed prompts before a version is allowed to serve.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from serving.settings import ServingParams
from suradapter.config import Params
from suradapter.export.runtime import ExportedTextPath, OnnxTextPath, load_export
from suradapter.model.zoo import load_base_pipeline
from suradapter.provenance import ARTIFACTS_DIR, EXPORT_DIR

LOG = logging.getLogger(__name__)
SMOKE_PROMPTS = ("", "three red circles on a white background")


class VersionLoadError(RuntimeError):
    """A version's gates did not pass, or it does not load or pass the smoke test."""


@dataclass(frozen=True)
class SamplingSpec:
    """One image request, with every default already filled in."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    seed: int
    width: int
    height: int


@dataclass
class Rendered:
    """Images of one request and the seconds spent in each stage."""

    adapted: Image.Image
    base: Image.Image | None
    seconds: dict[str, float]


@dataclass
class BaseDiffusion:
    """The frozen base pipeline. Its call mutates scheduler state, so calls hold `lock`."""

    model_id: str
    pipeline: StableDiffusionPipeline
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def device(self) -> torch.device:
        return self.pipeline.unet.device

    @property
    def cross_attention_dim(self) -> int:
        return int(self.pipeline.unet.config.cross_attention_dim)

    @property
    def native_size(self) -> int:
        return int(self.pipeline.unet.config.sample_size) * int(self.pipeline.vae_scale_factor)

    @property
    def size_multiple(self) -> int:
        downsamples = len(self.pipeline.unet.config.block_out_channels) - 1
        return int(self.pipeline.vae_scale_factor) * 2**downsamples

    def render(self, spec: SamplingSpec, embeds: dict[str, torch.Tensor] | None) -> Image.Image:
        """One image: from `embeds` (prompt_embeds, negative_prompt_embeds) when given, else
        through the pipeline's own text encoder."""
        prompts = (
            embeds
            if embeds is not None
            else {"prompt": spec.prompt, "negative_prompt": spec.negative_prompt}
        )
        generator = torch.Generator(device="cpu").manual_seed(spec.seed)
        with self.lock, torch.inference_mode():
            output = self.pipeline(
                **prompts,
                num_inference_steps=spec.steps,
                guidance_scale=spec.guidance,
                height=spec.height,
                width=spec.width,
                generator=generator,
                output_type="pil",
            )
        return output.images[0]


class BaseModels:
    """Base pipelines by id, shared by the versions that name the same base."""

    def __init__(self, params: Params, device: str) -> None:
        self.params = params
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        self._loaded: dict[str, BaseDiffusion] = {}
        self._lock = threading.Lock()

    def get(self, model_id: str) -> BaseDiffusion:
        """The base pipeline `model_id`, loaded on first use. Raises BaseModelNotFoundError."""
        with self._lock:
            if model_id not in self._loaded:
                own = self.params.base_model
                ours = model_id == own.id
                revision, dtype, seed = (
                    (own.revision, own.dtype, own.seed) if ours else (None, "float32", 0)
                )
                pipeline = load_base_pipeline(model_id, revision, dtype, seed).to(self.device)
                base = BaseDiffusion(model_id, pipeline)
                size = base.native_size
                base.render(SamplingSpec("", "", 1, 1.0, 0, size, size), None)  # warm-up
                self._loaded[model_id] = base
                LOG.info("base model %s loaded on %s and warmed up", model_id, self.device)
            return self._loaded[model_id]

    def keep_only(self, model_ids: set[str]) -> None:
        """Forget the pipelines no served version uses (in-flight requests keep theirs)."""
        with self._lock:
            for model_id in set(self._loaded) - model_ids:
                del self._loaded[model_id]


@dataclass
class ServedVersion:
    """Everything one registry version needs to answer embed and generate requests."""

    version: str
    root: Path
    exported: ExportedTextPath
    base: BaseDiffusion

    @property
    def text_path(self) -> OnnxTextPath:
        return self.exported.text_path

    @property
    def token_lock(self) -> threading.Lock:
        return self.exported.token_lock

    @property
    def base_model(self) -> str:
        return str(self.exported.report["base_model"])

    @property
    def width(self) -> int:
        return int(self.text_path.metadata["hidden_size"])

    @property
    def batch_invariant(self) -> bool:
        """Whether a prompt's embedding is the same in any batch (not in reference mode,
        whose attention mixes the prompts of a batch)."""
        return self.text_path.metadata.get("adapter_mode") != "reference"

    def embed(self, prompts: list[str]) -> np.ndarray:
        """Adapted prompt embeddings, float32 [len(prompts), tokens, width], in one call."""
        return self.exported.embed(prompts)

    def generate(
        self,
        spec: SamplingSpec,
        compare_base: bool = False,
        embed: Callable[[list[str]], np.ndarray] | None = None,
    ) -> Rendered:
        """The adapted image (and the base model's, same seed, when `compare_base`). The
        prompts' embeddings come from `embed` (default: this version's `embed`)."""
        started = time.perf_counter()
        embeds = (embed or self.embed)([spec.prompt, spec.negative_prompt])
        text_done = time.perf_counter()
        unet = self.base.pipeline.unet
        tensor = torch.from_numpy(embeds).to(device=unet.device, dtype=unet.dtype)
        adapted = self.base.render(
            spec, {"prompt_embeds": tensor[:1], "negative_prompt_embeds": tensor[1:]}
        )
        adapted_done = time.perf_counter()
        base = self.base.render(spec, None) if compare_base else None
        seconds = {
            "text_path": text_done - started,
            "denoise_decode": adapted_done - text_done,
        }
        if compare_base:
            seconds["base_image"] = time.perf_counter() - adapted_done
        return Rendered(adapted, base, seconds)


def load_version(
    root: Path, version: str, params: Params, settings: ServingParams, bases: BaseModels
) -> ServedVersion:
    """Load the version downloaded to `root` (its files already checked against the registry's
    manifest by the source's fetch). Raises VersionLoadError."""
    export_dir = Path(root) / ARTIFACTS_DIR / EXPORT_DIR
    try:
        exported = load_export(
            export_dir, list(settings.providers), Path(params.export.trt_cache_dir)
        )
        base = bases.get(str(exported.report["base_model"]))
    except Exception as err:
        raise VersionLoadError(f"version {version}: cannot load: {err}") from err
    served = ServedVersion(version, Path(root), exported, base)
    if served.width != base.cross_attention_dim:
        raise VersionLoadError(
            f"version {version}: text path width {served.width} does not match the base "
            f"UNet's cross_attention_dim {base.cross_attention_dim} ({served.base_model})"
        )
    return served


def smoke_test(served: ServedVersion) -> None:
    """Embed SMOKE_PROMPTS; raise VersionLoadError unless the result is finite and well shaped."""
    try:
        embeds = served.embed(list(SMOKE_PROMPTS))
    except Exception as err:
        raise VersionLoadError(f"version {served.version}: smoke test failed: {err}") from err
    expected = (len(SMOKE_PROMPTS), served.text_path.max_length, served.width)
    if embeds.shape != expected:
        raise VersionLoadError(
            f"version {served.version}: smoke test embeddings have shape {embeds.shape}, "
            f"expected {expected}"
        )
    if not np.isfinite(embeds).all():
        raise VersionLoadError(f"version {served.version}: smoke test embeddings are not finite")
