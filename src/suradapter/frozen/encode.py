"""`sur encode`: fill the frozen-output cache for the training split, resumably.

What the frozen text encoder and VAE give never changes during training, so it is computed
once: per training image its VAE latent distribution (mean and log-variance: `sur train`
still draws a fresh latent from it every step), per distinct text (narrative, keyword and
the empty prompt of caption dropout) the text encoder's last hidden states. Only missing
entries are computed; they are flushed to a new shard every `encode.shard_size`, so memory
stays bounded and a killed run loses at most one unflushed shard. `--shard i/n` (or
RANK/WORLD_SIZE under `accelerate launch` / torchrun) splits the keys by hash across
processes; their shards need no merge step.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from suradapter.config import Params
from suradapter.data.prepare import prepared_resolution
from suradapter.devices import TORCH_DTYPES, process_device
from suradapter.frozen.cache import LATENTS, LOGVAR, MEAN, STATES, TEXTS, FrozenCache
from suradapter.teacher.embed import ShardSpec

FORMAT = 1  # bump when what an entry means changes


def text_states(text_encoder: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The frozen text encoder's last hidden states [B, T, W]: what the adapter reads."""
    return text_encoder(ids)[0]


def latent_moments(vae: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent distribution of `pixels` in [-1, 1]: (mean, log-variance).

    A deterministic VAE (the shapes world's pixel VAE) has log-variance -inf: zero spread.
    """
    dist = vae.encode(pixels).latent_dist
    mean = dist.mode()
    logvar = getattr(dist, "logvar", None)
    return mean, torch.full_like(mean, -torch.inf) if logvar is None else logvar


def sample_latents(
    mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """One draw mean + std * eps (float32; eps from `generator`, on the CPU: device-independent)."""
    eps = torch.randn(mean.shape, generator=generator).to(mean.device)
    return mean.float() + torch.exp(0.5 * logvar.float()) * eps


def cache_dtype(base_dtype: str, device: torch.device) -> torch.dtype:
    """The dtype entries are computed and stored in: the base model's, except float32 on a CPU
    (where half-precision convolutions are slow and `sur train` runs the frozen parts in fp32)."""
    return torch.float32 if device.type == "cpu" else TORCH_DTYPES[base_dtype]


def module_digest(module: nn.Module) -> str:
    """sha256 over a module's state (names, dtypes, shapes, bytes): its weights' identity."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """sha256 of what decides token ids: vocabulary, merges, specials, length."""
    merges = getattr(tokenizer, "bpe_ranks", {})
    record = {
        "class": type(tokenizer).__name__,
        "vocab": tokenizer.get_vocab(),
        "merges": [" ".join(pair) for pair in sorted(merges, key=merges.get)],
        "special": {key: str(value) for key, value in tokenizer.special_tokens_map.items()},
        "max_length": tokenizer.model_max_length,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def frozen_fingerprint(
    pipeline: StableDiffusionPipeline, dtype: torch.dtype, resolution: int
) -> dict[str, object]:
    """What an entry depends on: another base model, dtype or resolution is another namespace."""
    return {
        "format": FORMAT,
        "text_encoder": module_digest(pipeline.text_encoder),
        "vae": module_digest(pipeline.vae),
        "tokenizer": tokenizer_digest(pipeline.tokenizer),
        "dtype": str(dtype).removeprefix("torch."),
        "resolution": resolution,
    }


@dataclass
class EncodeSummary:
    images: int
    texts: int
    cached_before: int
    computed: int
    shards_written: int
    damaged_removed: int
    estimated_bytes: int
    cache_bytes: int
    seconds: float  # filling (the base model's loading excluded)
    device: str
    dtype: str

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


class _Pixels(Dataset):
    def __init__(self, data, rows: list[int]) -> None:
        self.data, self.rows = data, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.data.pixels(self.rows[index])


def open_frozen_cache(
    params: Params, pipeline: StableDiffusionPipeline, device: torch.device
) -> FrozenCache:
    """The namespace of this base model, dtype and prepared resolution (damaged shards removed)."""
    dtype = cache_dtype(params.base_model.dtype, device)
    resolution = prepared_resolution(Path(params.embed.manifest))
    fingerprint = frozen_fingerprint(pipeline, dtype, resolution)
    return FrozenCache(Path(params.encode.cache_dir), fingerprint)


def fill_frozen_cache(
    cache: FrozenCache,
    params: Params,
    pipeline: StableDiffusionPipeline,
    data,
    device: torch.device,
    shard: ShardSpec,
    say: Callable[[str], None] = print,
) -> EncodeSummary:
    """Compute this shard's missing entries for the rows of `data` (an AdapterTrainingData).

    Moves the pipeline's text encoder and VAE to `device` in the cache dtype.
    """
    started = time.perf_counter()
    for problem in cache.damaged:
        say(f"encode: removed damaged shard {problem}; its entries are computed again")
    dtype = cache_dtype(params.base_model.dtype, device)
    text_ids = data.ids_by_text_key()
    image_rows = {key: row for row, key in enumerate(data.image_keys)}
    missing_images, missing_texts = (
        cache.missing(LATENTS, image_rows),
        cache.missing(TEXTS, text_ids),
    )
    owned_images = [key for key in missing_images if shard.owns(key)]
    owned_texts = [key for key in missing_texts if shard.owns(key)]
    total = len(image_rows) + len(text_ids)
    cached_before = total - len(missing_images) - len(missing_texts)
    estimate = written = 0
    if owned_images or owned_texts:
        text_encoder, vae = (
            _placed(m, device, dtype) for m in (pipeline.text_encoder, pipeline.vae)
        )
        estimate = _estimate_bytes(
            vae, text_encoder, data, owned_images, owned_texts, device, dtype
        )
        say(
            f"encode {shard.writer}: {len(owned_images)} latents + {len(owned_texts)} text states "
            f"to compute ({cached_before} of {total} cached), about {estimate / 1e9:.2f} GB "
            f"in {str(dtype).removeprefix('torch.')} into {cache.folder}"
        )
        rows = [image_rows[key] for key in owned_images]
        written += _fill_latents(cache, vae, data, rows, owned_images, params, device, dtype, shard)
        written += _fill_texts(cache, text_encoder, text_ids, owned_texts, params, dtype, shard)
    return EncodeSummary(
        images=len(image_rows),
        texts=len(text_ids),
        cached_before=cached_before,
        computed=len(owned_images) + len(owned_texts),
        shards_written=written,
        damaged_removed=len(cache.damaged),
        estimated_bytes=estimate,
        cache_bytes=cache.size_bytes(),
        seconds=round(time.perf_counter() - started, 3),
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
    )


def _placed(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """`module` on `device` in `dtype` (cast only when it is not already)."""
    return module.to(device) if module.dtype == dtype else module.to(device, dtype=dtype)


@torch.inference_mode()
def _estimate_bytes(vae, text_encoder, data, images: list, texts: list, device, dtype) -> int:
    """Bytes the missing entries will take, from one image's latent and the text state shape."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    mean, logvar = latent_moments(vae, data.pixels(0)[None].to(device, dtype))
    per_image = mean.numel() * itemsize * (1 if torch.isinf(logvar).all() else 2)
    per_text = data.narrative_ids.shape[1] * text_encoder.config.hidden_size * itemsize
    return len(images) * per_image + len(texts) * per_text


@torch.inference_mode()
def _fill_latents(cache, vae, data, rows, keys, params, device, dtype, shard) -> int:
    """Encode the images of `rows` (decoded by DataLoader workers); a shard per shard_size."""
    if not rows:
        return 0
    loader = DataLoader(
        _Pixels(data, rows),
        batch_size=params.encode.batch_size,
        num_workers=params.encode.loader_workers,
        pin_memory=device.type == "cuda",
    )
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    done = written = 0

    def flush(count: int) -> None:
        nonlocal pending, done, written
        mean, logvar = (torch.cat(parts) for parts in zip(*pending, strict=True))
        tensors = {MEAN: mean[:count]}
        if not torch.isinf(logvar[:count]).all():  # a deterministic VAE stores no spread
            tensors[LOGVAR] = logvar[:count]
        cache.write_shard(LATENTS, keys[done : done + count], tensors)
        pending = [(mean[count:], logvar[count:])] if count < len(mean) else []
        done, written = done + count, written + 1

    with tqdm(total=len(rows), desc=f"encode latents {shard.writer}", unit="image") as progress:
        for pixels in loader:
            mean, logvar = latent_moments(vae, pixels.to(device, dtype, non_blocking=True))
            pending.append((mean.cpu(), logvar.cpu()))
            progress.update(len(pixels))
            while sum(len(part[0]) for part in pending) >= params.encode.shard_size:
                flush(params.encode.shard_size)
    if pending:
        flush(sum(len(part[0]) for part in pending))
    return written


@torch.inference_mode()
def _fill_texts(cache, text_encoder, text_ids, keys, params, dtype, shard) -> int:
    """Run the text encoder on the token ids of `keys`; a shard per shard_size texts."""
    device = next(text_encoder.parameters()).device
    written = 0
    size = params.encode.shard_size
    with tqdm(total=len(keys), desc=f"encode texts {shard.writer}", unit="text") as progress:
        for start in range(0, len(keys), size):
            chunk = keys[start : start + size]
            ids = torch.stack([text_ids[key] for key in chunk])
            states = [
                text_states(text_encoder, part.to(device)).to(dtype).cpu()
                for part in ids.split(params.encode.batch_size)
            ]
            progress.update(len(chunk))
            cache.write_shard(TEXTS, chunk, {STATES: torch.cat(states)})
            written += 1
    return written


def run_encode(
    params: Params, shard: ShardSpec | None = None, device: torch.device | None = None
) -> EncodeSummary:
    """`sur encode`: load the base model and fill the cache for the training split."""
    from suradapter.data.pairs import AdapterTrainingData
    from suradapter.model.specs import check_resolution
    from suradapter.model.zoo import load_base_from_params, native_resolution

    device = device or process_device()
    pipeline = load_base_from_params(params.base_model)
    manifest = Path(params.embed.manifest)
    check_resolution(
        prepared_resolution(manifest), native_resolution(pipeline), params.base_model.id
    )
    data = AdapterTrainingData(manifest, pipeline.tokenizer, None)
    cache = open_frozen_cache(params, pipeline, device)
    shard = shard or ShardSpec.from_environment()
    return fill_frozen_cache(cache, params, pipeline, data, device, shard)
