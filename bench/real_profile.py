"""The real profile on real-size architectures: `sur doctor` for SD1.5 + a LLaMA-13B-wide teacher.

Builds, with seeded random weights (`sur zoo build`), the full-size SD1.5 architecture
(UNet 320/640/1280/1280 with 768-wide cross-attention, its VAE, CLIP ViT-L/14 text encoder,
the real CLIP BPE) and a LLaMA-13B-architecture teacher (5120 wide; its first
`--teacher-layers` of 40 decoder layers, since 26 GB of fp16 weights do not fit here), renders
a small SURD folder at 512 px, then runs the doctor (every stage's production code on a slice)
with the `sd15` profile, changing only the model paths, the SURD source and the step budget.
Beside it, the same batch's floor: the frozen UNet's forward and backward to its conditioning
(what any text-path adapter pays per step), timed after a warm-up.

    .venv/bin/python bench/real_profile.py [--rows 8] [--steps 2] [--batch-size 1] [--keep DIR]

Prints the doctor's table, then RESULT sd15_train_step_s, sd15_unet_fwd_bwd_s,
sd15_embed_rows_per_s, sd15_export_parity and sd15_doctor_ok (1 when every stage ran and the
gates refused the dry-run adapter) and sd15_untrained_adapter_refused (1 when `sur evaluate`
fails a freshly initialised adapter on the same slice).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from suradapter.config import load_params
from suradapter.data.shapes import generate_shapes_dataset
from suradapter.doctor import DoctorError, print_report, run_doctor, slice_params
from suradapter.model.architectures import build_architecture
from suradapter.model.zoo import load_base_pipeline

SURD_SIDE = 512


def build_models(folder: Path, clip_vocabulary: Path, teacher_layers: int) -> tuple[Path, Path]:
    """The random-weight SD1.5 and LLaMA-13B-architecture folders (reused when present)."""
    base, teacher = folder / "sd15", folder / "llama-13b"
    for name, out, layers in (("sd15", base, None), ("llama-13b", teacher, teacher_layers)):
        if not (out / "zoo.json").is_file():
            started = time.perf_counter()
            build_architecture(name, out, clip_vocabulary, dtype="float16", layers=layers)
            print(f"built {name} in {time.perf_counter() - started:.0f} s", flush=True)
    return base, teacher


def surd_at_512(params, folder: Path, rows: int) -> Path:
    """A SURD folder of `rows` rendered scenes at 512 px (objects scaled with the canvas)."""
    scale = SURD_SIDE // params.shapes.image_size
    shapes = params.shapes.model_copy(
        update={
            "image_size": SURD_SIDE,
            "object_size": tuple(side * scale for side in params.shapes.object_size),
            "min_gap": params.shapes.min_gap * scale,
        }
    )
    return generate_shapes_dataset(shapes, folder, rows)


def unet_floor_seconds(base: Path, batch: int, rounds: int) -> float:
    """Median seconds of the frozen UNet's forward + backward to its conditioning, fp32."""
    pipeline = load_base_pipeline(str(base), dtype="float32")
    unet = pipeline.unet
    side = unet.config.sample_size
    latents = torch.randn(batch, unet.config.in_channels, side, side)
    width = pipeline.text_encoder.config.hidden_size
    states = torch.randn(batch, pipeline.tokenizer.model_max_length, width)
    timesteps = torch.randint(0, 1000, (batch,))

    def step() -> float:
        condition = states.clone().requires_grad_(True)
        started = time.perf_counter()
        prediction = unet(latents, timesteps, encoder_hidden_states=condition).sample
        prediction.float().pow(2).mean().backward()
        return time.perf_counter() - started

    step()  # warm-up
    return statistics.median(step() for _ in range(rounds))


def untrained_verdict(params, workdir: Path, source: Path, steps: int, batch: int):
    """`sur evaluate`'s verdict on a freshly initialised (untrained) adapter, on the doctor's
    prepared slice; every gate failure is printed."""
    from suradapter.evaluate.run import evaluate_adapter
    from suradapter.model.adapter import SURAdapter

    dry = slice_params(params, workdir, source, steps, batch)
    folder = workdir / "untrained-adapter"
    SURAdapter.from_params(params.adapter).save_pretrained(folder)
    result = evaluate_adapter(dry, folder)
    for gate in result.gates:
        print(f"untrained adapter: {gate.describe()}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8, help="SURD rows in the doctor's slice.")
    parser.add_argument("--steps", type=int, default=2, help="Optimiser steps of the dry run.")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--teacher-layers", type=int, default=2)
    parser.add_argument("--floor-rounds", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="Keep models and data here (reused next run).")
    args = parser.parse_args()
    params = load_params(Path("params.yaml"), profile="sd15")
    console = Console(width=120)
    with tempfile.TemporaryDirectory(prefix="sur-real-profile-") as scratch:
        root = args.keep or Path(scratch)
        vocabulary = Path(params.bootstrap.output_dir) / "tokenizer"
        base, teacher = build_models(root / "models", vocabulary, args.teacher_layers)
        source = surd_at_512(params, root / "surd", args.rows)
        real = params.model_copy(
            update={
                "base_model": params.base_model.model_copy(update={"id": str(base)}),
                "embed": params.embed.model_copy(update={"model": str(teacher)}),
                "prepare": params.prepare.model_copy(update={"source": str(source)}),
            }
        )
        started = time.perf_counter()
        try:
            report = run_doctor(
                real, root / "doctor", args.rows, args.steps, args.batch_size, source
            )
        except DoctorError as err:
            console.print(f"doctor failed: {err}", highlight=False)
            print("RESULT sd15_doctor_ok 0")
            raise SystemExit(1) from None
        print(f"doctor: {time.perf_counter() - started:.0f} s", flush=True)
        print_report(report, console)
        untrained = untrained_verdict(real, root / "doctor", source, args.steps, args.batch_size)
        floor = unet_floor_seconds(base, args.batch_size, args.floor_rounds)
    stages = {stage.stage: stage for stage in report.stages}
    train = stages["train"].seconds_per_unit
    print(f"batch {args.batch_size}: train step {train:.2f} s, UNet fwd+bwd floor {floor:.2f} s")
    print(f"RESULT sd15_train_step_s {train:.3f}")
    print(f"RESULT sd15_unet_fwd_bwd_s {floor:.3f}")
    print(f"RESULT sd15_train_step_vs_unet_floor {train / floor:.2f}")
    print(f"RESULT sd15_embed_rows_per_s {1 / stages['embed'].seconds_per_unit:.2f}")
    print(f"RESULT sd15_export_parity {stages['export'].figures['parity_max_abs_diff']:.2e}")
    print(f"RESULT sd15_doctor_ok {int(not report.gate_verdict['passed'])}")
    print(f"RESULT sd15_untrained_adapter_refused {int(not untrained.passed)}")


if __name__ == "__main__":
    main()
