"""The `sur train` loop's step time against the method's floor, measured side by side.

"Ours" is the real training loop, `train_adapter` itself: its DataLoader, Accelerate, the
adapter and its losses, the frozen UNet's forward and backward, clipping, scheduler, optimiser,
EMA when the profile keeps one. A step is the time between two of the loop's `on_step`
callbacks. The floor is what any adapter on the text path pays per step whatever it does: the
frozen UNet's forward and backward (to its conditioning) on the same rows, timed inside each
callback, so the two alternate step by step and machine noise hits both. Its inputs (latents,
keyword states) are computed before its clock starts. Warm-up steps and the last step (which
saves the checkpoint) are dropped; medians are reported.

Two worlds: the shapes world (`params.yaml`, its batch size, the frozen-output cache on) and the
`sd15` profile on the full-size random-weight SD1.5 architecture at 512 px with a
LLaMA-13B-wide teacher (`bench/real_profile.py` builds both), batch 1, cache on and off.

    .venv/bin/python bench/train_step.py [--steps 12] [--sd15-steps 3] [--keep DIR]
    .venv/bin/python bench/train_step.py --skip-sd15    # the shapes world only (~1 min)

Prints RESULT train_step_vs_unet_floor, sd15_train_step_vs_unet_floor,
sd15_train_step_vs_unet_floor_nocache and train_samples_per_s. About 9 minutes on 2 cores
(plus a minute to build the SD1.5 models the first time; `--keep DIR` reuses them).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from real_profile import build_models, surd_at_512

from suradapter.config import Params, load_params
from suradapter.data.pairs import AdapterTrainingData
from suradapter.data.prepare import prepare_dataset
from suradapter.data.shapes import generate_shapes_dataset
from suradapter.doctor import slice_params
from suradapter.frozen.encode import latent_moments, run_encode, sample_latents, text_states
from suradapter.model.zoo import load_base_from_params
from suradapter.teacher.embed import open_cache, run_embed
from suradapter.train.adapter import frozen_parts, train_adapter
from suradapter.train.data import draw_rows, step_generator

WARMUP_STEPS = 2
SHAPES_ROWS = 256
SD15_ROWS = 8


@dataclass
class StepTimes:
    """Seconds per training step and per floor, paired by step."""

    steps: list[float] = field(default_factory=list)
    floors: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return statistics.median(self.steps) / statistics.median(self.floors)


class UNetFloor:
    """The frozen UNet's forward + backward to its conditioning on one training step's rows."""

    def __init__(self, params: Params) -> None:
        pipeline = load_base_from_params(params.base_model)
        self.frozen = frozen_parts(pipeline, torch.device("cpu"), torch.float32)
        self.data = AdapterTrainingData(
            Path(params.embed.manifest), pipeline.tokenizer, open_cache(params.embed)
        )
        self.train = params.train

    def seconds(self, step: int) -> float:
        """Time the floor on the rows `sur train` drew for `step` (inputs built off the clock)."""
        generator = step_generator(self.train.seed, step, 0, 0)
        rows, dropped = draw_rows(generator, len(self.data), self.train)
        batch = self.data.batch(rows, dropped)
        frozen = self.frozen
        with torch.no_grad():
            condition = text_states(frozen.text_encoder, batch.keyword_ids)
            mean, logvar = latent_moments(frozen.vae, batch.pixels)
            latents = sample_latents(mean, logvar, generator) * frozen.vae.config.scaling_factor
        started = time.perf_counter()
        noise = torch.randn(latents.shape, generator=generator)
        steps = frozen.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator)
        noisy = frozen.noise_scheduler.add_noise(latents, noise, timesteps)
        states = condition.clone().requires_grad_(True)
        prediction = frozen.unet(noisy, timesteps, encoder_hidden_states=states).sample
        F.mse_loss(prediction.float(), noise).backward()
        return time.perf_counter() - started


def timed_training(params: Params, floor: UNetFloor, warmup: int) -> StepTimes:
    """Run `train_adapter(params)`, timing each step between callbacks and a floor inside each."""
    times = StepTimes()
    last = params.train.max_steps
    exited: list[float] = []

    def on_step(done: int) -> None:
        entered = time.perf_counter()
        if exited and warmup < done < last:  # step `done - 1` ran since the last callback
            times.steps.append(entered - exited[-1])
            times.floors.append(floor.seconds(done - 1))
        exited.append(time.perf_counter())

    train_adapter(params, on_step=on_step)
    return times


def world(params: Params, root: Path, source: Path, steps: int, batch: int, cache: str) -> Params:
    """`params` pointed at `root` (prepared data, teacher cache, frozen cache, checkpoints)."""
    dry = slice_params(params, root, source, steps, batch)
    train = dry.train.model_copy(update={"cache": cache, "log_every": params.train.log_every})
    dry = dry.model_copy(update={"train": train})
    prepare_dataset(dry.prepare)
    run_embed(dry.embed)
    if cache == "auto":
        summary = run_encode(dry)
        print(f"encode: {summary.images} images, {summary.texts} texts in {summary.seconds:.0f} s")
    return dry


def report(name: str, times: StepTimes, batch: int) -> None:
    step, floor = statistics.median(times.steps), statistics.median(times.floors)
    print(
        f"{name}: batch {batch}, {len(times.steps)} timed steps: step {step * 1000:.1f} ms, "
        f"UNet floor {floor * 1000:.1f} ms, ratio {times.ratio:.3f}",
        flush=True,
    )


def shapes_world(params: Params, root: Path, steps: int) -> tuple[StepTimes, int]:
    shapes = params.shapes.model_copy(update={"num_samples": SHAPES_ROWS})
    source = generate_shapes_dataset(shapes, root / "surd")
    batch = params.train.batch_size
    dry = world(params, root / "run", source, WARMUP_STEPS + steps + 1, batch, "auto")
    times = timed_training(dry, UNetFloor(dry), WARMUP_STEPS)
    report("shapes world, cache on", times, batch)
    return times, batch


def sd15_world(params: Params, models: Path, root: Path, steps: int) -> dict[str, StepTimes]:
    vocabulary = Path(params.bootstrap.output_dir) / "tokenizer"
    base, teacher = build_models(models, vocabulary, teacher_layers=2)
    profile = load_params(Path("params.yaml"), profile="sd15")
    source = surd_at_512(profile, root / "surd", SD15_ROWS)
    real = profile.model_copy(
        update={
            "base_model": profile.base_model.model_copy(update={"id": str(base)}),
            "embed": profile.embed.model_copy(update={"model": str(teacher)}),
        }
    )
    results = {}
    for cache in ("auto", "off"):
        dry = world(real, root / f"run-{cache}", source, 1 + steps + 1, 1, cache)
        results[cache] = timed_training(dry, UNetFloor(dry), warmup=1)
        report(f"sd15 512 px, cache {cache}", results[cache], 1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="Timed shapes-world steps.")
    parser.add_argument("--sd15-steps", type=int, default=3, help="Timed SD1.5 steps per mode.")
    parser.add_argument("--skip-sd15", action="store_true", help="The shapes world only.")
    parser.add_argument("--keep", type=Path, help="Keep the SD1.5 models here (reused next run).")
    args = parser.parse_args()
    params = load_params(Path("params.yaml"))
    with tempfile.TemporaryDirectory(prefix="sur-train-step-") as scratch:
        root = Path(scratch)
        shapes, batch = shapes_world(params, root / "shapes", args.steps)
        sd15 = None
        if not args.skip_sd15:
            models = (args.keep or root) / "models"
            sd15 = sd15_world(params, models, root / "sd15", args.sd15_steps)
    print(f"RESULT train_step_vs_unet_floor {shapes.ratio:.3f}")
    print(f"RESULT train_samples_per_s {batch / statistics.median(shapes.steps):.0f}")
    if sd15:
        print(f"RESULT sd15_train_step_vs_unet_floor {sd15['auto'].ratio:.3f}")
        print(f"RESULT sd15_train_step_vs_unet_floor_nocache {sd15['off'].ratio:.3f}")


if __name__ == "__main__":
    main()
