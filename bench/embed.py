"""Benchmark the teacher-feature stage against the naive loop and sentence-transformers.

On the same 5k distinct narrative prompts and the same MiniLM teacher (mean pooling,
same max length), in one run:
  ours   the stage's compute path: length-bucketed batches under inference_mode, into a
         fresh cache (shards written, as in production)
  naive  one prompt at a time through the same hooked model
  peer   sentence-transformers `encode()` (Transformer + mean Pooling, no Normalize)

    .venv/bin/python bench/embed.py [--prompts 5000]

Prints RESULT embed_speedup_vs_naive, embed_prompts_per_s, embed_vs_sentence_transformers,
embed_max_abs_diff_vs_sentence_transformers, and the cache size per 1k prompts.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer

from suradapter.config import load_params
from suradapter.data.lexicon import TEMPLATES
from suradapter.data.shapes import all_combinations, narrative_prompt
from suradapter.teacher.cache import TeacherCache, text_key
from suradapter.teacher.embed import ShardSpec, compute_missing
from suradapter.teacher.model import extract_features, load_teacher, resolve_teacher_path


def distinct_prompts(params, count: int) -> list[str]:
    combos = all_combinations(params.shapes)
    rng = random.Random("bench-embed")
    prompts: dict[str, None] = {}
    while len(prompts) < count:
        combo = rng.choice(combos)
        prompts[narrative_prompt(*combo, rng.randrange(len(TEMPLATES)), rng)] = None
    return list(prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=5000)
    parser.add_argument("--naive-prompts", type=int, default=1000, help="Naive loop sample.")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    params = load_params(args.params)
    texts = distinct_prompts(params, args.prompts)
    teacher = load_teacher(params.embed)
    extract_features(teacher, texts[:8])  # warm-up

    with tempfile.TemporaryDirectory() as folder:
        cache = TeacherCache(Path(folder), teacher.fingerprint)
        start = time.perf_counter()
        compute_missing(teacher, cache, {text_key(t): t for t in texts}, params.embed, ShardSpec())
        ours_s = time.perf_counter() - start
        ours = cache.get([text_key(t) for t in texts])
        size = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())

    naive_texts = texts[: args.naive_prompts]
    start = time.perf_counter()
    for text in naive_texts:
        extract_features(teacher, [text])
    naive_s = time.perf_counter() - start

    full = SentenceTransformer(resolve_teacher_path("minilm"), device="cpu")
    peer = SentenceTransformer(modules=[full[0], full[1]], device="cpu")
    peer.max_seq_length = params.embed.max_length
    start = time.perf_counter()
    theirs = peer.encode(texts, convert_to_tensor=True, show_progress_bar=False)
    peer_s = time.perf_counter() - start

    ours_rate = len(texts) / ours_s
    naive_rate = len(naive_texts) / naive_s
    peer_rate = len(texts) / peer_s
    diff = (ours - theirs.cpu()).abs().max().item()
    print(
        f"ours {ours_rate:.0f}/s, naive {naive_rate:.0f}/s, sentence-transformers {peer_rate:.0f}/s"
    )
    print(f"threads={torch.get_num_threads()} batch_size={params.embed.batch_size}")
    print(f"RESULT embed_speedup_vs_naive {ours_rate / naive_rate:.2f}")
    print(f"RESULT embed_prompts_per_s {ours_rate:.0f}")
    print(f"RESULT embed_vs_sentence_transformers {ours_rate / peer_rate:.2f}")
    print(f"RESULT embed_max_abs_diff_vs_sentence_transformers {diff:.2e}")
    print(f"RESULT embed_cache_bytes_per_1k_prompts {size * 1000 / len(texts):.0f}")


if __name__ == "__main__":
    main()
