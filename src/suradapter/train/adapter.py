"""`sur train`: train the SUR-adapter on a frozen base model with Accelerate.

One loop for CPU, one GPU, many GPUs and many nodes (`accelerate launch` / `torchrun`).
Only the adapter (and, in fixed mode, its teacher projection) is trainable; the text encoder,
UNet and VAE are frozen. Each step's randomness (batch rows, caption dropout, noise,
timesteps, adapter dropout) is seeded from (seed, step, micro-step, rank), and the state is
saved with `accelerator.save_state` every N steps, so a killed run resumes to the same
weights as an uninterrupted one.
"""

from __future__ import annotations

import gc
import hashlib
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import extract_model_from_parallel, gather_object, send_to_device
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.training_utils import compute_snr
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from tqdm import tqdm
from transformers import get_scheduler

from suradapter.atomic import recover_dir, replace_dir, staging_dir
from suradapter.config import Params, TrainParams
from suradapter.data.pairs import AdapterBatch, AdapterTrainingData
from suradapter.data.prepare import prepared_resolution
from suradapter.frozen.cache import LATENTS, TEXTS, FrozenCache
from suradapter.frozen.encode import (
    fill_frozen_cache,
    latent_moments,
    open_frozen_cache,
    sample_latents,
    text_states,
)
from suradapter.model.adapter import SURAdapter
from suradapter.model.losses import (
    LossTerms,
    alignment_loss,
    combine_losses,
    denoising_loss,
    denoising_target,
    llm_distillation_loss,
    preservation_loss,
)
from suradapter.model.specs import check_resolution
from suradapter.model.text_path import token_embeddings
from suradapter.model.zoo import load_base_from_params, native_resolution
from suradapter.provenance import sha256_file
from suradapter.teacher.embed import ShardSpec, open_cache
from suradapter.teacher.model import checked_teacher_dim
from suradapter.train.checkpoints import (
    claim_checkpoints,
    latest_checkpoint,
    read_log,
    run_fingerprint,
    save_checkpoint,
    write_log,
)
from suradapter.train.data import draw_rows, step_generator, training_loader
from suradapter.train.ema import load_ema, make_ema, save_ema

LOSS_LOG = "loss_log.jsonl"
COSINE_FLOOR = 0.1  # the cosine schedule ends at 10% of the peak learning rate
LAUNCHER_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"  # set by `accelerate launch`


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    seconds: float
    log: list[dict] = field(default_factory=list)
    device: str = "cpu"
    mixed_precision: str = "no"  # as the launcher or params set it
    frozen_dtype: str = "float32"  # of the frozen text encoder, UNet and VAE


@dataclass
class FrozenParts:
    """The frozen base: what the adapter's losses run through."""

    text_encoder: nn.Module
    unet: nn.Module
    vae: nn.Module
    noise_scheduler: DDPMScheduler

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


def lr_schedule(params: Params, optimizer: torch.optim.Optimizer) -> LRScheduler:
    """Linear warm-up, then constant or cosine decay to COSINE_FLOOR of the peak at max_steps
    (transformers' schedules)."""
    train = params.train
    if train.lr_scheduler == "constant":
        return get_scheduler("constant_with_warmup", optimizer, train.warmup_steps)
    return get_scheduler(
        "cosine_with_min_lr",
        optimizer,
        train.warmup_steps,
        train.max_steps,
        scheduler_specific_kwargs={"min_lr_rate": COSINE_FLOOR},
    )


def reference_teacher_projection(teacher_dim: int, width: int, seed: int) -> nn.Linear:
    """The reference's `llm_resize`: a frozen random projection (here seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projection = nn.Linear(teacher_dim, width)
    return projection.requires_grad_(False)


def step_loss(
    params: Params,
    adapter: nn.Module,
    frozen: FrozenParts,
    batch: AdapterBatch,
    dropped: torch.Tensor,
    generator: torch.Generator,
    projection: nn.Module | None,
) -> LossTerms:
    """The SUR-adapter losses for one batch (on the adapter's device).

    Frozen outputs come from the batch when it carries them (train.cache auto), else from the
    frozen text encoder and VAE; either way the latent is drawn from its distribution with
    `generator`, then noise and timesteps, so both paths see the same random numbers.
    """
    device = batch.narrative_ids.device
    with torch.no_grad():
        if batch.narrative_states is None:
            narrative_states = text_states(frozen.text_encoder, batch.narrative_ids)
            keyword_states = text_states(frozen.text_encoder, batch.keyword_ids)
        else:
            narrative_states, keyword_states = batch.narrative_states, batch.keyword_states
        narrative_states, keyword_states = narrative_states.float(), keyword_states.float()
        if batch.latent_mean is None:
            mean, logvar = latent_moments(frozen.vae, batch.pixels.to(frozen.vae.dtype))
        else:
            mean, logvar = batch.latent_mean, batch.latent_logvar
        latents = sample_latents(mean, logvar, generator) * frozen.vae.config.scaling_factor
    model = extract_model_from_parallel(adapter)
    narrative_tokens = keyword_tokens = None
    if model.has_token_mixer:
        narrative_tokens = token_embeddings(frozen.text_encoder, batch.narrative_ids)
        keyword_tokens = token_embeddings(frozen.text_encoder, batch.keyword_ids)
    out = adapter(narrative_states, batch.narrative_mask, narrative_tokens)
    teacher = batch.teacher.to(device)
    target_teacher = (
        model.project_teacher(teacher) if projection is None else projection(teacher)[:, None, :]
    )
    keep = (~dropped).to(device)[:, None].float()
    token_mask = batch.narrative_mask.float() if not model.is_reference else 1.0
    llm = llm_distillation_loss(
        out.encoder_features, target_teacher, params.loss.llm_distill, keep * token_mask
    )
    align = alignment_loss(out.adapted, keyword_states, params.loss.alignment)
    preserve = None
    if params.loss.preservation.weight > 0:
        kept = adapter(keyword_states, batch.keyword_mask, keyword_tokens).adapted
        preserve = preservation_loss(kept, keyword_states, params.loss.preservation)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    steps = frozen.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(device)
    noisy = frozen.noise_scheduler.add_noise(latents, noise, timesteps)
    target = denoising_target(frozen.noise_scheduler, latents, noise, timesteps)
    denoise = denoising_loss(
        frozen.unet,
        noisy.to(frozen.unet.dtype),
        timesteps,
        out.adapted,
        target,
        params.loss.denoise,
        snr=compute_snr(frozen.noise_scheduler, timesteps),
        prediction_type=frozen.prediction_type,
    )
    return combine_losses(params.loss, denoise, llm, align, preserve)


def fit_mixer_statistics(
    adapter: SURAdapter, text_encoder: nn.Module, data: AdapterTrainingData, params: Params
) -> int:
    """Fit the token mixer's input standardisation on the token embeddings of training rows.

    Uses the narrative and keyword prompts of `params.adapter.token_mixer.fit_rows` rows,
    drawn with the train seed (all rows when there are fewer). Returns the prompts seen.
    """
    mixer_params = params.adapter.token_mixer
    generator = torch.Generator().manual_seed(params.train.seed)
    rows = torch.randperm(len(data), generator=generator)[: mixer_params.fit_rows]

    def inputs():
        for ids in (data.narrative_ids, data.keyword_ids):
            for chunk in rows.split(params.train.batch_size):
                with torch.no_grad():
                    yield token_embeddings(text_encoder, ids[chunk]).float()

    return adapter.mixer.fit_statistics(inputs())


def make_optimizer(params: Params, adapter: nn.Module) -> torch.optim.Optimizer:
    """AdamW over the adapter, fused (one kernel for all of its many small tensors)."""
    return torch.optim.AdamW(
        adapter.parameters(),
        lr=params.train.learning_rate,
        weight_decay=params.train.weight_decay,
        fused=True,
    )


def frozen_parts(pipeline: StableDiffusionPipeline, device: torch.device, dtype: torch.dtype):
    for module in (pipeline.text_encoder, pipeline.unet, pipeline.vae):
        module.requires_grad_(False).eval().to(device, dtype=dtype)
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    return FrozenParts(pipeline.text_encoder, pipeline.unet, pipeline.vae, scheduler)


def make_accelerator(train: TrainParams) -> Accelerator:
    """The run's Accelerator. Mixed precision follows `accelerate launch` / `accelerate config`
    unless `train.mixed_precision` sets it; a params value that overrides a different launcher
    setting is said, not silently applied."""
    launcher = os.environ.get(LAUNCHER_PRECISION_ENV)
    accelerator = Accelerator(
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        mixed_precision=train.mixed_precision,
        project_dir=train.checkpoint_dir,
    )
    if train.mixed_precision is not None and launcher and launcher != train.mixed_precision:
        accelerator.print(
            f"train: train.mixed_precision '{train.mixed_precision}' overrides the launcher's "
            f"'{launcher}' (set it to null to let `accelerate launch` decide)"
        )
    return accelerator


def train_adapter(params: Params, on_log=None, on_step=None) -> TrainResult:
    """Train (or resume) the adapter; save it with `save_pretrained`; return a summary.

    `on_log(record)` is called on the main process for each logged step, `on_step(step)`
    after every optimiser step (benches time the loop between these calls).
    """
    train = params.train
    accelerator = make_accelerator(train)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    pipeline = load_base_from_params(params.base_model)
    manifest = Path(params.embed.manifest)
    native = native_resolution(pipeline)
    check_resolution(prepared_resolution(manifest), native, params.base_model.id)
    width = pipeline.text_encoder.config.hidden_size
    data = AdapterTrainingData(manifest, pipeline.tokenizer, open_cache(params.embed))
    cache = None
    if train.cache == "auto":
        cache = frozen_cache_for_training(params, pipeline, data, accelerator)
    frozen = frozen_parts(pipeline, accelerator.device, weight_dtype)
    teacher_dim = checked_teacher_dim(
        params.adapter.teacher_dim, data.teacher.shape[1], params.embed.model
    )
    adapter_params = params.adapter.model_copy(update={"teacher_dim": teacher_dim})
    adapter = SURAdapter.for_pipeline(adapter_params, pipeline)
    if adapter.has_token_mixer:  # a resumed run reloads the same statistics from its checkpoint
        seen = fit_mixer_statistics(adapter, frozen.text_encoder, data, params)
        accelerator.print(f"train: token mixer standardisation fitted on {seen} prompts")
    projection = None
    if adapter.is_reference:
        seed = train.seed + 1
        projection = reference_teacher_projection(teacher_dim, width, seed)
        projection = projection.to(accelerator.device)
    optimizer = make_optimizer(params, adapter)
    schedule = lr_schedule(params, optimizer)
    adapter, optimizer, schedule = accelerator.prepare(adapter, optimizer, schedule)
    ema = make_ema(accelerator.unwrap_model(adapter), train.ema_decay)

    checkpoints = Path(train.checkpoint_dir)
    settings = run_settings(params, accelerator.num_processes, accelerator.mixed_precision)
    fingerprint = run_fingerprint(settings)
    if accelerator.is_main_process and claim_checkpoints(checkpoints, fingerprint, settings):
        accelerator.print("train: params or data changed; old checkpoints dropped")
    accelerator.wait_for_everyone()
    start, resume_from = latest_checkpoint(checkpoints)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        if ema is not None:
            load_ema(ema, resume_from)
    accelerator.print(
        f"train: {accelerator.num_processes} process(es) on {accelerator.device}, mixed "
        f"precision {accelerator.mixed_precision}, starting at step {start} of {train.max_steps}"
    )
    log = read_log(checkpoints / LOSS_LOG, up_to=start)
    adapter.train()
    started = time.monotonic()
    rank, accumulation = accelerator.process_index, train.gradient_accumulation_steps
    progress = tqdm(
        range(start, train.max_steps),
        initial=start,
        total=train.max_steps,
        desc="train",
        unit="step",
        disable=not accelerator.is_local_main_process,
    )
    batches = iter(training_loader(data, cache, train, start, rank, accelerator.device))
    for step in progress:
        for micro in range(accumulation):
            generator = step_generator(train.seed, step, micro, rank)
            draw_rows(generator, len(data), train)  # the loader drew these rows: same state
            torch.manual_seed(generator.initial_seed())  # adapter dropout
            batch = AdapterBatch(
                **send_to_device(next(batches), accelerator.device, non_blocking=True)
            )
            with accelerator.accumulate(adapter):
                terms = step_loss(
                    params, adapter, frozen, batch, batch.dropped, generator, projection
                )
                accelerator.backward(terms.total)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(adapter.parameters(), train.max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
            if ema is not None and accelerator.sync_gradients:
                ema.step(accelerator.unwrap_model(adapter).parameters())
        done = step + 1
        if done % train.log_every == 0 or done == train.max_steps:
            record = {"step": done, **terms.as_floats(), "lr": schedule.get_last_lr()[0]}
            record["seconds"] = round(time.monotonic() - started, 2)
            log.append(record)
            progress.set_postfix(loss=f"{record['total']:.4f}")
            if accelerator.is_main_process:
                write_log(checkpoints / LOSS_LOG, log)
                if on_log:
                    on_log(record)
        if done % train.checkpoint_every == 0 or done == train.max_steps:
            save_checkpoint(
                accelerator, checkpoints, done, None if ema is None else partial(save_ema, ema)
            )
        if on_step:
            on_step(done)
    accelerator.wait_for_everyone()
    check_ranks_agree(accelerator, accelerator.unwrap_model(adapter))
    output_dir = Path(train.output_dir)
    if accelerator.is_main_process:
        recover_dir(output_dir)
        staging = staging_dir(output_dir)
        trained = accelerator.unwrap_model(adapter)
        if ema is not None:  # what is saved, evaluated and exported: the EMA weights
            ema.copy_to(trained.parameters())
        trained.save_pretrained(staging)
        replace_dir(staging, output_dir)
    accelerator.wait_for_everyone()
    del adapter, optimizer, schedule  # the prepared (DDP) wrapper goes before the process group
    end_training(accelerator)
    return TrainResult(
        output_dir,
        train.max_steps,
        time.monotonic() - started,
        log,
        str(accelerator.device),
        accelerator.mixed_precision,
        str(weight_dtype).removeprefix("torch."),
    )


def end_training(accelerator: Accelerator) -> None:
    """Drop and collect the prepared wrappers, then end training (destroying the process group).

    A DDP wrapper's reducer holds the Gloo process group. Were it the group's last holder, its
    destructor would join Gloo's worker threads with the GIL held while a worker, freeing a
    finished collective's tensors, waits for the GIL: a hang, seen in 2 of 30 two-process runs
    here (pytorch/pytorch#56297). Collected while the group is registered, the wrapper only
    drops a reference, and `destroy_process_group` frees the group with the GIL released.
    The caller drops its own references to the wrappers first.
    """
    accelerator.free_memory()
    gc.collect()  # free_memory collects before it clears its own lists
    accelerator.end_training()


def check_ranks_agree(accelerator: Accelerator, model: nn.Module) -> None:
    """Raise RuntimeError unless every process ends with the same weights (DDP keeps them
    equal; a rank that drifted would make the saved adapter one rank's view)."""
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    digests = gather_object([digest.hexdigest()])
    if len(set(digests)) > 1:
        raise RuntimeError(f"train: the processes ended with different weights: {digests}")
    if accelerator.num_processes > 1:
        accelerator.print(
            f"train: weights identical on {len(digests)} processes ({digests[0][:12]})"
        )


def run_settings(params: Params, num_processes: int, mixed_precision: str) -> dict:
    """What determines the trained weights: the math params, the world size and precision
    (as the launcher or params set it), and the inputs.

    Bookkeeping (output paths, logging cadence, tracking) is left out, so changing it keeps
    the checkpoints resumable; a change to the training code does not.
    """
    bookkeeping = {
        "output_dir", "checkpoint_dir", "checkpoint_every", "log_every",
        "tracking_uri", "experiment", "grid_prompts", "loader_workers",
    }  # fmt: skip
    return {
        "adapter": params.adapter.model_dump(),
        "loss": params.loss.model_dump(),
        "train": params.train.model_dump(exclude=bookkeeping),
        "base_model": params.base_model.model_dump(),
        "num_processes": num_processes,
        "mixed_precision": mixed_precision,
        "manifest_sha256": sha256_file(Path(params.embed.manifest)),
        "teacher": params.embed.model_dump(exclude={"batch_size", "shard_size"}),
        "code_sha256": {name: sha256_file(path) for name, path in _training_code().items()},
    }


def _training_code() -> dict[str, Path]:
    """The source files that define the training math (a change invalidates checkpoints)."""
    import sys

    from suradapter.data import pairs
    from suradapter.frozen import encode
    from suradapter.model import adapter as adapter_module
    from suradapter.model import losses
    from suradapter.train import data

    modules = (adapter_module, losses, pairs, data, encode, sys.modules[__name__])
    return {module.__name__: Path(module.__file__) for module in modules}


def frozen_cache_for_training(
    params: Params, pipeline: StableDiffusionPipeline, data: AdapterTrainingData, accelerator
) -> FrozenCache:
    """The frozen-output cache, complete for `data`: each process fills its share of what is
    missing or damaged (normally nothing: `sur encode` ran), then all reopen it."""
    cache = open_frozen_cache(params, pipeline, accelerator.device)
    shard = ShardSpec(accelerator.process_index, accelerator.num_processes)
    summary = fill_frozen_cache(
        cache, params, pipeline, data, accelerator.device, shard, say=accelerator.print
    )
    accelerator.wait_for_everyone()
    if summary.computed or accelerator.num_processes > 1:
        cache = FrozenCache(Path(params.encode.cache_dir), cache.fingerprint)
    missing = cache.missing(LATENTS, data.image_keys)
    missing += cache.missing(TEXTS, [*data.narrative_keys, *data.keyword_keys])
    if missing:
        raise RuntimeError(f"frozen cache {cache.folder}: {len(missing)} entries still missing")
    accelerator.print(
        f"train: frozen outputs from {cache.folder} ({summary.cached_before} cached, "
        f"{summary.computed} computed now)"
    )
    return cache
