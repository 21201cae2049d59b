"""Train the tiny shapes-world text-to-image model and save it as a diffusers folder.

The recipe follows the measured second prototype (shared/reference/shapes_prototype.md):
a fixed pixel-unshuffle-4 "VAE" (48x8x8 latents), a UNet (64, 128) with attention only at
4x4, a CLIP-style text encoder over the real CLIP BPE vocabulary, v-prediction with the
squaredcos schedule, min-SNR weighting, 10% caption dropout, EMA weights for sampling,
batch 32, AdamW with warm-up and cosine decay. It trains on keyword prompts only, so the
model follows keyword prompts and not narrative ones: the gap the adapter closes.

Randomness for step k comes from a generator seeded by (seed, k), and training state is
saved with `accelerator.save_state` every N steps, so a resumed run continues exactly.
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import EMAModel, compute_snr
from torch.optim.lr_scheduler import LRScheduler
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, get_scheduler

from suradapter.atomic import recover_dir, replace_dir, staging_dir
from suradapter.config import BootstrapParams, ShapesParams
from suradapter.data.shapes import (
    all_combinations,
    held_out_combinations,
    keyword_prompt,
    render_scene,
)
from suradapter.model.losses import min_snr_weights
from suradapter.model.pixel_vae import PixelUnshuffleVAE
from suradapter.model.text_path import sd_tokenize
from suradapter.model.tokenizer import (
    clip_merges,
    fetch_clip_bpe,
    write_clip_tokenizer,
)
from suradapter.train.checkpoints import latest_checkpoint, read_log, save_checkpoint, write_log

TRAIN_LOG = "train_log.jsonl"
TRAIN_TIMESTEPS = 1000


@dataclass
class TrainingSet:
    """Pre-rendered keyword-prompt training data: images and token ids per sample."""

    images: torch.Tensor  # uint8 [N, 3, H, W]
    input_ids: torch.Tensor  # long [N, T]
    empty_ids: torch.Tensor  # long [T], the dropped-caption prompt ""


def build_tokenizer(params: BootstrapParams, folder: Path) -> CLIPTokenizer:
    """Write the real CLIP BPE tokenizer (from PyPI's open-clip-torch wheel) and load it."""
    bpe = fetch_clip_bpe(Path(params.checkpoint_dir) / "clip-bpe")
    write_clip_tokenizer(clip_merges(bpe), folder, model_max_length=params.text_max_length)
    return CLIPTokenizer.from_pretrained(folder)


def build_untrained_components(
    params: BootstrapParams, tokenizer: CLIPTokenizer, image_size: int
) -> tuple[CLIPTextModel, UNet2DConditionModel, PixelUnshuffleVAE]:
    """Seeded, untrained text encoder, UNet and the fixed VAE of the shapes base model."""
    vae = PixelUnshuffleVAE(factor=params.pixel_factor)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=params.text_hidden_size,
        intermediate_size=4 * params.text_hidden_size,
        num_hidden_layers=params.text_layers,
        num_attention_heads=params.text_heads,
        max_position_embeddings=params.text_max_length,
        projection_dim=params.text_hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    latent_channels = vae.config.latent_channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        text_encoder = CLIPTextModel(text_config)
        unet = UNet2DConditionModel(
            sample_size=image_size // params.pixel_factor,
            in_channels=latent_channels,
            out_channels=latent_channels,
            layers_per_block=1,
            block_out_channels=tuple(params.unet_channels),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=params.text_hidden_size,
            attention_head_dim=params.unet_heads,  # diffusers reads this as the head count
            norm_num_groups=8,
        )
    return text_encoder, unet, vae


def training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=TRAIN_TIMESTEPS,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
    )


def sampling_scheduler() -> DDIMScheduler:
    """DDIM with trailing spacing, matching the training noise schedule."""
    return DDIMScheduler.from_config(
        training_scheduler().config,
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=False,
    )


def render_training_set(
    shapes: ShapesParams, count: int, seed: int, tokenizer: CLIPTokenizer
) -> TrainingSet:
    """Render `count` scenes of the training (not held-out) combinations, keyword prompts only."""
    held = set(held_out_combinations(shapes))
    combos = [combo for combo in all_combinations(shapes) if combo not in held]
    prompts = [keyword_prompt(*combo) for combo in combos]
    tokens = sd_tokenize(tokenizer, [*prompts, ""]).input_ids
    rng = random.Random(f"bootstrap:{seed}")
    images = torch.empty(count, 3, shapes.image_size, shapes.image_size, dtype=torch.uint8)
    which = torch.empty(count, dtype=torch.long)
    for index in tqdm(range(count), desc="render", unit="scene", leave=False):
        choice = rng.randrange(len(combos))
        image = render_scene(*combos[choice], rng, shapes)
        images[index] = (
            torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
            .view(shapes.image_size, shapes.image_size, 3)
            .permute(2, 0, 1)
        )
        which[index] = choice
    return TrainingSet(images=images, input_ids=tokens[:-1][which], empty_ids=tokens[-1])


def lr_schedule(params: BootstrapParams, optimizer: torch.optim.Optimizer) -> LRScheduler:
    """Linear warm-up, then cosine decay to `min_lr_ratio` of the peak at the last step
    (transformers' `cosine_with_min_lr`)."""
    return get_scheduler(
        "cosine_with_min_lr",
        optimizer,
        params.warmup_steps,
        params.steps,
        scheduler_specific_kwargs={"min_lr_rate": params.min_lr_ratio},
    )


def train_base_model(
    params: BootstrapParams, shapes: ShapesParams, max_steps: int | None = None
) -> tuple[StableDiffusionPipeline, list[dict]]:
    """Train (or resume) the shapes base model; return the EMA pipeline and the training log.

    `max_steps` stops early (for tests); the LR schedule still follows `params.steps`.
    """
    checkpoints = Path(params.checkpoint_dir)
    checkpoints.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(params, checkpoints / "tokenizer")
    text_encoder, unet, vae = build_untrained_components(params, tokenizer, shapes.image_size)
    data = render_training_set(shapes, params.num_renders, params.seed, tokenizer)
    scheduler = training_scheduler()

    accelerator = Accelerator(project_dir=str(checkpoints))
    trainable = [*text_encoder.parameters(), *unet.parameters()]
    optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=0.0)
    schedule = lr_schedule(params, optimizer)
    text_encoder, unet, optimizer, schedule = accelerator.prepare(
        text_encoder, unet, optimizer, schedule
    )
    ema_text = EMAModel(text_encoder.parameters(), decay=params.ema_decay)
    ema_unet = EMAModel(unet.parameters(), decay=params.ema_decay)
    accelerator.register_for_checkpointing(ema_text, ema_unet)

    start, resume_from = latest_checkpoint(checkpoints)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
    log_path = checkpoints / TRAIN_LOG
    log = read_log(log_path, up_to=start)
    stop = min(params.steps, max_steps or params.steps)
    device = accelerator.device
    text_encoder.train()
    unet.train()
    progress = tqdm(range(start, stop), initial=start, total=stop, desc="bootstrap", unit="step")
    started = time.monotonic()
    for step in progress:
        generator = torch.Generator().manual_seed(params.seed * 1_000_003 + step)
        loss = _training_loss(params, data, text_encoder, unet, vae, scheduler, generator, device)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        ema_text.step(text_encoder.parameters())
        ema_unet.step(unet.parameters())
        done = step + 1
        if done % params.log_every == 0 or done == stop:
            record = {"step": done, "loss": float(loss), "lr": schedule.get_last_lr()[0]}
            record["seconds"] = round(time.monotonic() - started, 1)
            log.append(record)
            progress.set_postfix(loss=f"{record['loss']:.4f}")
            write_log(log_path, log)
        if done % params.checkpoint_every == 0 or done == stop:
            save_checkpoint(accelerator, checkpoints, done)
    ema_text.copy_to(text_encoder.parameters())
    ema_unet.copy_to(unet.parameters())
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=accelerator.unwrap_model(text_encoder).eval(),
        tokenizer=tokenizer,
        unet=accelerator.unwrap_model(unet).eval(),
        scheduler=sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to("cpu"), log


def _training_loss(
    params: BootstrapParams,
    data: TrainingSet,
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    vae: PixelUnshuffleVAE,
    scheduler: DDPMScheduler,
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    batch = torch.randint(len(data.images), (params.batch_size,), generator=generator)
    pixels = (data.images[batch].float() / 127.5 - 1.0).to(device)
    latents = vae.to(device).encode(pixels).latent_dist.sample()
    input_ids = data.input_ids[batch].clone()
    dropped = torch.rand(params.batch_size, generator=generator) < params.caption_dropout
    input_ids[dropped] = data.empty_ids
    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = torch.randint(0, TRAIN_TIMESTEPS, (params.batch_size,), generator=generator)
    timesteps = timesteps.to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = scheduler.get_velocity(latents, noise, timesteps)
    states = text_encoder(input_ids.to(device))[0]
    prediction = unet(noisy, timesteps, encoder_hidden_states=states).sample
    per_sample = F.mse_loss(prediction.float(), target, reduction="none").flatten(1).mean(1)
    snr = compute_snr(scheduler, timesteps)
    return (per_sample * min_snr_weights(snr, params.snr_gamma, "v_prediction")).mean()


def save_base_model(pipeline: StableDiffusionPipeline, out_dir: Path, tokenizer_dir: Path) -> None:
    """Write the pipeline as a diffusers folder with fp16 weights (loads as fp32), atomically.

    The tokenizer is stored as CLIP's `vocab.json` + `merges.txt` from `tokenizer_dir`
    (1.4 MB) instead of the 3.6 MB `tokenizer.json` transformers would write.
    """
    recover_dir(out_dir)
    staging = staging_dir(out_dir)
    pipeline.text_encoder.half()
    pipeline.unet.half()
    try:
        pipeline.save_pretrained(staging)
    finally:
        pipeline.text_encoder.float()
        pipeline.unet.float()
    shutil.rmtree(staging / "tokenizer")
    shutil.copytree(tokenizer_dir, staging / "tokenizer")
    replace_dir(staging, out_dir)
