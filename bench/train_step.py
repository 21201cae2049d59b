"""Adapter training-step time against the method's floor, measured side by side.

The floor is what any adapter-on-the-text-path method must pay per step: the frozen UNet's
forward and backward (to its conditioning input) on the same batch. "Ours" is the whole
`sur train` step: two frozen text-encoder passes, the VAE encode, the adapter, the three
losses, the UNet forward and backward, clipping-free optimiser step. Rounds alternate the
two so that machine noise hits both; medians are reported.

    .venv/bin/python bench/train_step.py [--rounds 20] [--batch-size 32]

Prints RESULT train_step_vs_unet_floor <x> and RESULT train_samples_per_s <n>.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from suradapter.config import load_params
from suradapter.data.prepare import prepare_dataset
from suradapter.data.shapes import generate_shapes_dataset
from suradapter.model.adapter import SURAdapter
from suradapter.model.zoo import load_base_from_params
from suradapter.teacher.embed import open_cache, run_embed
from suradapter.train.adapter import frozen_parts, make_optimizer, step_loss
from suradapter.train.data import AdapterTrainingData


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    params = load_params(args.params)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        shapes = params.shapes.model_copy(update={"num_samples": 256})
        prepare = params.prepare.model_copy(
            update={"source": str(root / "raw"), "output_dir": str(root / "prepared")}
        )
        embed = params.embed.model_copy(
            update={"manifest": str(root / "prepared/manifest.parquet"), "cache_dir": str(root)}
        )
        generate_shapes_dataset(shapes, root / "raw")
        prepare_dataset(prepare)
        run_embed(embed)
        pipeline = load_base_from_params(params.base_model)
        frozen = frozen_parts(pipeline, torch.device("cpu"), torch.float32)
        data = AdapterTrainingData(Path(embed.manifest), pipeline.tokenizer, open_cache(embed))
        rows = torch.arange(args.batch_size) % len(data)
        dropped = torch.zeros(args.batch_size, dtype=torch.bool)
        batch = data.batch(rows, dropped)  # reads the images: inside the temp folder's life

    adapter_params = params.adapter.model_copy(update={"teacher_dim": data.teacher.shape[1]})
    adapter = SURAdapter.for_pipeline(adapter_params, pipeline).train()
    optimizer = make_optimizer(params, adapter)

    def ours() -> None:
        terms = step_loss(
            params, adapter, frozen, batch, dropped, torch.Generator().manual_seed(0), None
        )
        terms.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with torch.no_grad():
        condition = frozen.text_encoder(batch.keyword_ids)[0]
        latents = frozen.vae.encode(batch.pixels).latent_dist.sample()
        timesteps = torch.randint(0, 1000, (args.batch_size,))
        noisy = frozen.noise_scheduler.add_noise(latents, torch.randn_like(latents), timesteps)

    def floor() -> None:
        states = condition.clone().requires_grad_(True)
        prediction = frozen.unet(noisy, timesteps, encoder_hidden_states=states).sample
        F.mse_loss(prediction, latents).backward()

    timings: dict[str, list[float]] = {"ours": [], "floor": []}
    for _ in range(3):
        ours()
        floor()
    for _ in range(args.rounds):
        for name, function in (("ours", ours), ("floor", floor)):
            start = time.perf_counter()
            function()
            timings[name].append(time.perf_counter() - start)
    ours_s, floor_s = (statistics.median(timings[k]) for k in ("ours", "floor"))
    print(f"batch {args.batch_size}: step {ours_s * 1000:.1f} ms, floor {floor_s * 1000:.1f} ms")
    print(f"RESULT train_step_vs_unet_floor {ours_s / floor_s:.2f}")
    print(f"RESULT train_samples_per_s {args.batch_size / ours_s:.0f}")


if __name__ == "__main__":
    main()
