"""The GPU check of the real path: run by `bench/gpu_check.sh` on a machine with an NVIDIA GPU.

1. Builds the full-size SD1.5 architecture and a LLaMA-13B-architecture teacher (its first
   `--teacher-layers` of 40 layers) with seeded random weights, in fp16, and a SURD folder
   at 512 px.
2. Runs `sur doctor` (every stage's production code) with the sd15 profile under the
   launcher's mixed precision (`--mixed-precision`, bf16 by default: what `accelerate launch
   --mixed_precision bf16` sets) for `--steps` real optimiser steps at the profile's batch:
   seconds per step, samples per second and CUDA peak memory per stage.
3. Opens the exported text path on ONNX Runtime's CUDA and TensorRT providers: parity against
   PyTorch fp32 on the GPU, and median latency at batch 1 and 8 beside PyTorch eager.

Writes every figure to one JSON file (`--out`) and prints RESULT lines. A provider this
machine's onnxruntime cannot run is recorded with the reason, not skipped silently.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

REQUIRED = ("torch", "diffusers", "transformers", "accelerate", "onnxruntime", "pydantic")


def preflight() -> dict:
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(f"gpu_check: missing packages {missing}: install the project (make install)")
    import onnxruntime
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False)")
    return {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "onnxruntime": onnxruntime.__version__,
        "ort_compiled_providers": onnxruntime.get_available_providers(),
    }


def median_ms(function, rounds: int) -> float:
    import torch

    function()  # warm-up (kernel selection, TensorRT engine build)
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        started = time.perf_counter()
        function()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def provider_figures(params, export_dir: Path, adapter_dir: Path, rounds: int) -> dict:
    """Parity and latency of the exported text path per GPU provider, beside PyTorch eager."""
    import torch

    from suradapter.export.onnx_export import parity_max_abs_diff
    from suradapter.export.runtime import OnnxTextPath, ProviderError
    from suradapter.model.adapter import SURAdapter
    from suradapter.model.text_path import AdaptedTextPath
    from suradapter.model.zoo import load_base_from_params

    pipeline = load_base_from_params(params.base_model)
    adapter = SURAdapter.from_pretrained(adapter_dir).eval()
    reference = AdaptedTextPath.from_pipeline(pipeline, adapter).float().to("cuda").eval()
    prompts = list(params.export.parity_prompts) * 2
    figures: dict = {}
    with torch.inference_mode():
        for batch in (1, 8):
            tokens = reference.tokenize(prompts[:batch])
            ids, mask = tokens.input_ids.cuda(), tokens.attention_mask.cuda()
            figures[f"torch_cuda_b{batch}_ms"] = median_ms(partial(reference, ids, mask), rounds)
        for provider in ("cuda", "tensorrt"):
            try:
                session = OnnxTextPath.load(
                    export_dir, [provider], Path(params.export.trt_cache_dir)
                )
            except ProviderError as err:
                figures[provider] = {"available": False, "reason": str(err)}
                continue
            diff = parity_max_abs_diff(reference, session, params.export.parity_prompts)
            entry = {"available": True, "parity_max_abs_diff": diff}
            for batch in (1, 8):
                tokens = session.tokenize(reference.tokenizer, prompts[:batch])
                ids, mask = tokens["input_ids"], tokens["attention_mask"]
                entry[f"b{batch}_ms"] = median_ms(partial(session.run, ids, mask), rounds)
            figures[provider] = entry
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write.")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sur-gpu-check"))
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--mixed-precision", default="bf16", choices=["no", "fp16", "bf16"])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    figures = {"machine": preflight(), "settings": vars(args)}
    os.environ["ACCELERATE_MIXED_PRECISION"] = args.mixed_precision  # as the launcher does

    from real_profile import build_models, surd_at_512  # beside this file
    from rich.console import Console

    from suradapter.config import load_params
    from suradapter.doctor import DoctorError, print_report, run_doctor

    params = load_params(Path("params.yaml"), profile="sd15")
    started = time.perf_counter()
    vocabulary = Path(params.bootstrap.output_dir) / "tokenizer"
    base, teacher = build_models(args.workdir / "models", vocabulary, args.teacher_layers)
    source = surd_at_512(params, args.workdir / "surd", args.rows)
    figures["build_seconds"] = round(time.perf_counter() - started, 1)
    real = params.model_copy(
        update={
            "base_model": params.base_model.model_copy(update={"id": str(base)}),
            "embed": params.embed.model_copy(update={"model": str(teacher)}),
            "prepare": params.prepare.model_copy(update={"source": str(source)}),
        }
    )
    doctor_dir = args.workdir / "doctor"
    try:
        report = run_doctor(real, doctor_dir, args.rows, args.steps, None, source)
    except DoctorError as err:
        figures["doctor_error"] = str(err)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2, default=str) + "\n")
        sys.exit(f"gpu_check: doctor failed: {err}")
    print_report(report, Console(width=120))
    figures["doctor"] = report.as_dict()
    figures["providers"] = provider_figures(
        real, doctor_dir / "export", doctor_dir / "adapter", args.rounds
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    stages = {stage.stage: stage for stage in report.stages}
    train = stages["train"]
    print(f"RESULT gpu_train_step_s {train.seconds_per_unit:.4f}")
    print(f"RESULT gpu_train_samples_per_s {train.figures['samples_per_second']:.2f}")
    print(f"RESULT gpu_train_peak_gib {train.peak_memory_bytes / 2**30:.2f}")
    print(f"RESULT gpu_embed_rows_per_s {1 / stages['embed'].seconds_per_unit:.1f}")
    for provider in ("cuda", "tensorrt"):
        entry = figures["providers"][provider]
        if entry["available"]:
            print(f"RESULT gpu_ort_{provider}_parity {entry['parity_max_abs_diff']:.2e}")
            print(f"RESULT gpu_ort_{provider}_b8_ms {entry['b8_ms']:.2f}")
        else:
            print(f"RESULT gpu_ort_{provider}_available 0")
    print(f"RESULT gpu_doctor_ok {int(not report.gate_verdict['passed'])}")
    print(f"figures: {args.out}")


if __name__ == "__main__":
    main()
