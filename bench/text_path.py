"""ONNX Runtime (CPU provider) against PyTorch eager for the adapted text path, side by side.

Two models, each exported with `sur export`'s code and timed in one run with alternating
rounds (medians):
  tiny     the test profile's text encoder + adapter
  clip-l   a real-size, randomly initialised CLIP-L text encoder (width 768, 12 layers,
           77 tokens) + the sd15-profile adapter (exported with external data)

    .venv/bin/python bench/text_path.py [--rounds 20]

Prints RESULT ort_vs_torch_b1, ort_vs_torch_b8 (ORT latency / PyTorch latency, CLIP-L) and
parity_max_abs_diff (CLIP-L), the same for tiny with a `_tiny` suffix, the adapter's share of
the PyTorch text-path latency, and gemm_floor_vs_torch_b1/b8: the encoder's linear layers
alone (PyTorch/MKL GEMMs of the same shapes) over the whole PyTorch text path, the lowest
`ort_vs_torch` any fp32 runtime doing the same arithmetic at that GEMM speed could reach.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from suradapter.config import load_params
from suradapter.export.onnx_export import export_text_path
from suradapter.export.runtime import OnnxTextPath
from suradapter.model.adapter import SURAdapter
from suradapter.model.text_path import AdaptedTextPath, token_embeddings
from suradapter.model.zoo import load_base_pipeline

PROMPTS = [
    "a trio of fire-truck coloured coins lying in the snow",
    "a woman in a white dress with angel wings",
    "3 red circles, white background, flat icon, centered, high quality",
    "grandma kept a pair of ripe-strawberry coloured coins in her sewing box",
    "a cartoon of a duo of stop-sign coloured bottle caps, nothing else in sight",
    "an astronaut riding a horse on the moon, detailed, 8k",
    "",
    "a museum display of two stop-sign coloured poker chips",
]


def clip_l_path(tokenizer_dir: Path) -> AdaptedTextPath:
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
    )
    torch.manual_seed(0)
    encoder = CLIPTextModel(config).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
    params = load_params(Path("params.yaml"), profile="sd15").adapter
    adapter = SURAdapter.from_params(params, 768).eval()
    with torch.no_grad():
        adapter.fc.weight.normal_(0.0, 0.02)
    return AdaptedTextPath(tokenizer, encoder, adapter)


def median_ms(function, rounds: int) -> float:
    function()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def encoder_gemms(path: AdaptedTextPath, rows: int):
    """The text encoder's linear layers alone, each on `rows` token rows: the arithmetic any
    fp32 runtime must do, at PyTorch's (MKL's) GEMM speed. Attention and the adapter left out,
    so its time is a lower bound."""
    layers = [m for m in path.text_encoder.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(rows, layer.in_features) for layer in layers]

    def run() -> None:
        for layer, rows_in in zip(layers, inputs, strict=True):
            torch.nn.functional.linear(rows_in, layer.weight, layer.bias)

    return run


def time_batch(path, onnx_path, ids, mask, rounds: int) -> dict[str, float]:
    """Median ms of the PyTorch text path, the ORT text path, the adapter alone and the
    encoder's GEMM floor, interleaved."""
    gemms = encoder_gemms(path, ids.numel())
    with torch.inference_mode():
        states = path.encode_text(ids, mask)
        tokens = token_embeddings(path.text_encoder, ids)
        runs = {
            "torch": lambda: path(ids, mask),
            "ort": lambda: onnx_path.run(ids, mask),
            "adapter": lambda: path.adapter(states, mask, tokens),
            "gemm_floor": gemms,
        }
        samples: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(3):  # alternate so that machine noise hits all alike
            for name, run in runs.items():
                samples[name].append(median_ms(run, rounds))
    return {name: statistics.median(values) for name, values in samples.items()}


def measure(name: str, path: AdaptedTextPath, settings, rounds: int, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        adapter_dir = Path(folder) / "adapter"
        path.adapter.save_pretrained(adapter_dir)
        started = time.perf_counter()
        result = export_text_path(path, settings, Path(folder) / "export", adapter_dir, name)
        print(f"{name}: export {time.perf_counter() - started:.1f} s, {result.report['inputs']}")
        onnx_path = OnnxTextPath.load(result.folder)
        for batch in (1, 8):
            tokens = path.tokenize(PROMPTS[:batch])
            ms = time_batch(path, onnx_path, tokens.input_ids, tokens.attention_mask, rounds)
            eager = ms["torch"]
            share = ms["adapter"] / eager
            print(
                f"{name} b{batch}: torch {eager:.2f} ms, ort {ms['ort']:.2f} ms, encoder GEMMs "
                f"alone {ms['gemm_floor']:.2f} ms, adapter share of torch text path {share:.1%}"
            )
            print(f"RESULT ort_vs_torch_b{batch}{suffix} {ms['ort'] / eager:.3f}")
            print(f"RESULT gemm_floor_vs_torch_b{batch}{suffix} {ms['gemm_floor'] / eager:.3f}")
            print(f"RESULT adapter_share_b{batch}{suffix} {share:.3f}")
        print(f"RESULT parity_max_abs_diff{suffix} {result.report['parity_max_abs_diff']:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    settings = load_params(Path("params.yaml")).export
    print(f"torch threads {torch.get_num_threads()}")
    tiny_adapter_params = load_params(Path("params.yaml"), profile="tiny").adapter
    pipeline = load_base_pipeline("tiny")
    adapter = SURAdapter.for_pipeline(tiny_adapter_params, pipeline).eval()
    tiny = AdaptedTextPath.from_pipeline(pipeline, adapter)
    measure("tiny", tiny, settings, args.rounds, "_tiny")
    base = load_params(Path("params.yaml")).bootstrap.output_dir
    measure("clip-l", clip_l_path(Path(base) / "tokenizer"), settings, args.rounds, "")


if __name__ == "__main__":
    main()
