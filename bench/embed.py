"""Benchmark the teacher-feature stage against sentence-transformers and the naive loop.

The same MiniLM teacher (mean pooling, same max length) and the same distinct narrative
prompts for every side, in interleaved rounds after a warm-up; rates are medians over rounds:
  ours   the stage's production path (`compute_missing`: length-bucketed batches of
         `embed.batch_size` under inference_mode, shards written to a fresh cache)
  peer   sentence-transformers `encode()` (Transformer + mean Pooling, no Normalize) at the
         same batch size and the same padding policy: prompts sorted by length, each batch
         padded to its longest prompt
  naive  one prompt at a time through the same hooked model (`extract_features`), on a
         sample of each round's prompts

    .venv/bin/python bench/embed.py [--prompts 2000] [--rounds 3] [--naive-prompts 200]

Prints RESULT embed_speedup_vs_naive, embed_prompts_per_s, embed_vs_sentence_transformers,
embed_max_abs_diff_vs_sentence_transformers, the cache size per 1k prompts, and
embed_gemm_floor_speedup_vs_naive: the teacher's linear layers alone (PyTorch/MKL GEMMs on
the same padded token rows) over the naive loop, the most any fp32 batching of the same
arithmetic could gain on this CPU.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer

from suradapter.config import load_params
from suradapter.data.lexicon import TEMPLATES
from suradapter.data.shapes import all_combinations, narrative_prompt
from suradapter.teacher.cache import TeacherCache, text_key
from suradapter.teacher.embed import ShardSpec, compute_missing, length_buckets
from suradapter.teacher.model import extract_features, load_teacher, resolve_teacher_path


def distinct_prompts(params, count: int, seed: str) -> list[str]:
    combos = all_combinations(params.shapes)
    rng = random.Random(seed)
    prompts: dict[str, None] = {}
    while len(prompts) < count:
        combo = rng.choice(combos)
        prompts[narrative_prompt(*combo, rng.randrange(len(TEMPLATES)), rng)] = None
    return list(prompts)


def run_ours(teacher, params, texts: list[str]) -> tuple[float, torch.Tensor, int]:
    """(seconds, features in `texts` order, cache bytes) of the stage into a fresh cache."""
    with tempfile.TemporaryDirectory() as folder:
        cache = TeacherCache(Path(folder), teacher.fingerprint)
        start = time.perf_counter()
        compute_missing(teacher, cache, {text_key(t): t for t in texts}, params.embed, ShardSpec())
        seconds = time.perf_counter() - start
        features = cache.get([text_key(t) for t in texts])
        size = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
    return seconds, features, size


def run_peer(peer: SentenceTransformer, texts: list[str], batch_size: int):
    start = time.perf_counter()
    features = peer.encode(
        texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False
    )
    return time.perf_counter() - start, features.cpu()


def run_naive(teacher, texts: list[str]) -> float:
    start = time.perf_counter()
    for text in texts:
        extract_features(teacher, [text])
    return time.perf_counter() - start


def run_gemm_floor(teacher, params, texts: list[str]) -> float:
    """Seconds of the teacher's linear layers alone on the token rows our batches hold
    (length-bucketed, padded to each batch's longest): the arithmetic any fp32 implementation
    must do, at PyTorch's (MKL's) GEMM speed. Attention, norms and pooling left out, so the
    rate it gives is an upper bound."""
    layers = [m for m in teacher.model.modules() if isinstance(m, torch.nn.Linear)]
    lengths = teacher.tokenizer(texts, truncation=True, max_length=params.embed.max_length)[
        "input_ids"
    ]
    batches = length_buckets(teacher, texts, params.embed.batch_size)
    rows = [max(len(lengths[i]) for i in batch) * len(batch) for batch in batches]
    inputs = {
        n: {layer.in_features: torch.randn(n, layer.in_features) for layer in layers}
        for n in set(rows)
    }
    start = time.perf_counter()
    with torch.inference_mode():
        for n in rows:
            for layer in layers:
                torch.nn.functional.linear(inputs[n][layer.in_features], layer.weight, layer.bias)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2000, help="Prompts per round.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--naive-prompts", type=int, default=200, help="Naive sample a round.")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    params = load_params(args.params)
    batch_size = params.embed.batch_size
    teacher = load_teacher(params.embed)
    full = SentenceTransformer(resolve_teacher_path("minilm"), device="cpu")
    peer = SentenceTransformer(modules=[full[0], full[1]], device="cpu")
    peer.max_seq_length = params.embed.max_length

    warm = distinct_prompts(params, 2 * batch_size, "bench-embed-warm-up")
    run_ours(teacher, params, warm)
    run_peer(peer, warm, batch_size)
    run_naive(teacher, warm[:16])

    rates: dict[str, list[float]] = {"ours": [], "peer": [], "naive": [], "floor": []}
    diffs, sizes = [], []
    for round_index in range(args.rounds):
        texts = distinct_prompts(params, args.prompts, f"bench-embed-{round_index}")
        ours_s, ours, size = run_ours(teacher, params, texts)
        peer_s, theirs = run_peer(peer, texts, batch_size)
        naive_s = run_naive(teacher, texts[: args.naive_prompts])
        rates["floor"].append(len(texts) / run_gemm_floor(teacher, params, texts))
        rates["ours"].append(len(texts) / ours_s)
        rates["peer"].append(len(texts) / peer_s)
        rates["naive"].append(args.naive_prompts / naive_s)
        diffs.append((ours - theirs).abs().max().item())
        sizes.append(size * 1000 / len(texts))
        print(
            f"round {round_index}: ours {rates['ours'][-1]:.0f}/s, sentence-transformers "
            f"{rates['peer'][-1]:.0f}/s, naive {rates['naive'][-1]:.0f}/s, linear layers "
            f"alone {rates['floor'][-1]:.0f}/s"
        )
    ours_rate, peer_rate, naive_rate, floor_rate = (statistics.median(rates[k]) for k in rates)
    print(f"threads={torch.get_num_threads()} batch_size={batch_size} (both batched sides)")
    print(f"RESULT embed_speedup_vs_naive {ours_rate / naive_rate:.2f}")
    print(f"RESULT embed_prompts_per_s {ours_rate:.0f}")
    print(f"RESULT embed_gemm_floor_speedup_vs_naive {floor_rate / naive_rate:.2f}")
    print(f"RESULT embed_vs_sentence_transformers {ours_rate / peer_rate:.2f}")
    print(f"RESULT embed_max_abs_diff_vs_sentence_transformers {max(diffs):.2e}")
    print(f"RESULT embed_cache_bytes_per_1k_prompts {statistics.median(sizes):.0f}")


if __name__ == "__main__":
    main()
