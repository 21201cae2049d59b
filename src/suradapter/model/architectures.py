"""Real architectures as data, built offline with seeded random weights (`sur zoo build`).

Each `configs/<name>.json` declares one architecture: `kind: diffusion` (a Stable Diffusion
folder: CLIP text encoder, UNet, VAE, scheduler, tokenizer) or `kind: teacher` (a
transformers model folder with its tokenizer). `build_architecture` writes it as a standard
folder that `StableDiffusionPipeline.from_pretrained` or `AutoModel.from_pretrained` loads
like downloaded weights, so the real code path runs without the real weights. Same name and
seed, same weights. The tokenizers use the real CLIP BPE (49,408 tokens) that ships with the
project: SD's own, or its first merges laid out as a LLaMA-style tokenizer (a BOS token, no
pad token).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tokenizers.processors import TemplateProcessing
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPTokenizerFast,
    LlamaConfig,
    LlamaModel,
    PreTrainedTokenizerFast,
)

from suradapter.atomic import recover_dir, replace_dir, staging_dir
from suradapter.devices import TORCH_DTYPES
from suradapter.model.specs import architecture_spec
from suradapter.model.tokenizer import BOS, EOS, write_clip_tokenizer

ZOO_RECORD = "zoo.json"  # written into every built folder: what it is, and that it is random
SCHEDULERS = {"DDIMScheduler": DDIMScheduler, "PNDMScheduler": PNDMScheduler}
TEACHER_CLASSES = {"LlamaModel": (LlamaConfig, LlamaModel)}
CLIP_BYTE_SYMBOLS = 512  # CLIP's vocabulary starts with 256 byte symbols and the same with </w>


def clip_tokenizer(vocabulary_dir: Path, spec: dict[str, Any]) -> CLIPTokenizer:
    """CLIP's real BPE from `vocabulary_dir`, with the spec's length and pad token.

    Raises ValueError when the folder does not hold the full 49,408-token vocabulary.
    """
    tokenizer = CLIPTokenizer.from_pretrained(
        vocabulary_dir,
        model_max_length=spec["model_max_length"],
        pad_token=spec.get("pad_token", EOS),
    )
    if len(tokenizer) != 49408:
        raise ValueError(f"{vocabulary_dir}: expected CLIP's 49,408 tokens, got {len(tokenizer)}")
    return tokenizer


def diffusion_components(
    spec: dict[str, Any], tokenizer: CLIPTokenizer, seed: int
) -> StableDiffusionPipeline:
    """A `StableDiffusionPipeline` of the spec's architecture, weights seeded by `seed`."""
    text_config = CLIPTextConfig(
        **(spec["text_encoder"] | {"vocab_size": len(tokenizer)}),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    declared = spec["text_encoder"].get("vocab_size", len(tokenizer))
    if declared != len(tokenizer):
        raise ValueError(f"text encoder declares {declared} tokens, tokenizer has {len(tokenizer)}")
    scheduler_spec = dict(spec["scheduler"])
    scheduler = SCHEDULERS[scheduler_spec.pop("class")](**scheduler_spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config)
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(**spec["vae"])
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def llama_style_tokenizer(vocabulary_dir: Path, spec: dict[str, Any]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer from CLIP's first `num_merges` merges, shaped like LLaMA's:
    a BOS token before every text, no EOS appended, and no pad token (callers must set one)."""
    lines = (Path(vocabulary_dir) / "merges.txt").read_text(encoding="utf-8").split("\n")
    merges = lines[1 : spec["num_merges"] + 1]
    with tempfile.TemporaryDirectory(prefix="sur-teacher-tokenizer-") as folder:
        write_clip_tokenizer(merges, folder, spec["model_max_length"])
        backend = CLIPTokenizerFast.from_pretrained(folder).backend_tokenizer
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        model_max_length=spec["model_max_length"],
    )


def teacher_model(
    spec: dict[str, Any], tokenizer: PreTrainedTokenizerFast, seed: int, layers: int | None = None
):
    """The spec's teacher model class with seeded random weights (its first `layers` layers
    when given: the same blocks, fewer of them)."""
    model_spec = dict(spec["model"])
    if layers is not None:
        if not 1 <= layers <= model_spec["num_hidden_layers"]:
            raise ValueError(f"--layers must be 1..{model_spec['num_hidden_layers']}, got {layers}")
        model_spec["num_hidden_layers"] = layers
    config_class, model_class = TEACHER_CLASSES[model_spec.pop("class")]
    if len(tokenizer) > model_spec["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, model {model_spec['vocab_size']}")
    config = config_class(
        **model_spec,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config)


def build_architecture(
    name: str,
    out_dir: Path,
    clip_vocabulary: Path,
    seed: int = 0,
    dtype: str = "float32",
    layers: int | None = None,
) -> dict[str, Any]:
    """Write architecture `name` with seeded random weights to `out_dir` (replaced atomically).

    `layers` keeps a teacher's first N layers. Returns the record also saved as `zoo.json`
    in the folder. Raises KeyError for an unknown name, ValueError for a built-in test model
    (no folder form) or a `layers` the architecture cannot take.
    """
    spec = architecture_spec(name)
    if spec["tokenizer"].get("vocabulary") != "clip":
        raise ValueError(f"'{name}' is built in memory by the zoo (base_model.id: {name})")
    if layers is not None and spec["kind"] != "teacher":
        raise ValueError(f"--layers applies to teachers; '{name}' is a {spec['kind']} model")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(out_dir)
    staging = staging_dir(out_dir)
    try:
        if spec["kind"] == "diffusion":
            tokenizer = clip_tokenizer(clip_vocabulary, spec["tokenizer"])
            pipeline = diffusion_components(spec, tokenizer, seed)
            if dtype != "float32":
                pipeline.to(dtype=TORCH_DTYPES[dtype])
            pipeline.save_pretrained(staging, safe_serialization=True)
            modules = {"text_encoder": pipeline.text_encoder, "unet": pipeline.unet}
            modules["vae"] = pipeline.vae
        else:
            tokenizer = llama_style_tokenizer(clip_vocabulary, spec["tokenizer"])
            model = teacher_model(spec, tokenizer, seed, layers).to(TORCH_DTYPES[dtype])
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            modules = {"model": model}
        record = {
            "architecture": name,
            "kind": spec["kind"],
            "seed": seed,
            "dtype": dtype,
            "layers": layers,
            "weights": "random (seeded): for dry runs and benchmarks, not for images",
            "parameters": {
                key: sum(p.numel() for p in m.parameters()) for key, m in modules.items()
            },
        }
        (staging / ZOO_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, out_dir)
    return record


def zoo_record(folder: str | Path) -> dict[str, Any] | None:
    """The `zoo.json` of a folder built by `build_architecture`, or None for real weights."""
    path = Path(folder) / ZOO_RECORD
    return json.loads(path.read_text()) if path.is_file() else None
