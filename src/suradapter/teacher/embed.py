"""The embed stage: teacher features for every prepared narrative prompt, cached and resumable.

Only texts not yet in the cache are computed, each distinct text once. Work is sorted by
token length and cut into batches (length bucketing: little padding), run under
`torch.inference_mode`, and flushed to a new shard every `shard_size` features, so a killed
run loses at most one unflushed shard. `--shard i/n` (or torchrun/accelerate's RANK and
WORLD_SIZE) splits the texts by hash across processes; their shards merge by index. Shards
are named by their content, so concurrent runs never overwrite each other; a shard found
damaged when the cache opens is removed and its texts are computed again here. A batch whose
features are not finite stops the run (nothing of it is written).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from suradapter.config import EmbedParams
from suradapter.devices import process_device
from suradapter.teacher.cache import (
    TeacherCache,
    non_finite_rows,
    record_namespace,
    recorded_namespace,
    text_key,
)
from suradapter.teacher.model import Teacher, extract_features, load_teacher


@dataclass(frozen=True)
class ShardSpec:
    """This process's share of the work: texts whose hash falls in slot `index` of `count`."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> ShardSpec:
        """Parse 'i/n'. Raises ValueError on anything else."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard must look like i/n, got '{text}'") from None
        if not 0 <= index < count:
            raise ValueError(f"--shard {text}: need 0 <= i < n")
        return cls(index, count)

    @classmethod
    def from_environment(cls) -> ShardSpec:
        """The shard of a torchrun / accelerate launch process, or the whole work."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world) if world > 1 else cls()

    def owns(self, key: str) -> bool:
        return self.count == 1 or int(key[:8], 16) % self.count == self.index

    @property
    def writer(self) -> str:
        return "main" if self.count == 1 else f"p{self.index}of{self.count}"


@dataclass
class EmbedSummary:
    texts: int
    distinct: int
    cached_before: int
    computed: int
    shards_written: int
    damaged_removed: int  # shards that failed verification on open (their texts recomputed)
    seconds: float
    load_seconds: float  # of `seconds`: loading the teacher onto its device
    prompts_per_s: float  # computed prompts per second of computing (load time excluded)
    device: str

    def as_dict(self) -> dict[str, float | str]:
        return asdict(self)


def manifest_texts(path: Path) -> list[str]:
    """The narrative prompts of a prepared manifest. Raises FileNotFoundError naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"prepared manifest {path} not found (run `sur prepare` first)")
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


def length_buckets(teacher: Teacher, texts: list[str], batch_size: int) -> list[list[int]]:
    """Indices of `texts` in batches of similar token length (longest first)."""
    if not texts:
        return []
    lengths = teacher.tokenizer(
        texts, truncation=True, max_length=int(teacher.fingerprint["max_length"])
    )["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: -len(lengths[i]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def compute_missing(
    teacher: Teacher,
    cache: TeacherCache,
    texts_by_key: dict[str, str],
    params: EmbedParams,
    shard: ShardSpec,
) -> tuple[int, int]:
    """Compute and store this shard's missing keys; return (computed, shards written)."""
    todo = [key for key in cache.missing(texts_by_key) if shard.owns(key)]
    texts = [texts_by_key[key] for key in todo]
    pending_keys: list[str] = []
    pending: list[torch.Tensor] = []
    written = 0
    with tqdm(total=len(todo), desc=f"embed {shard.writer}", unit="prompt") as progress:
        for batch in length_buckets(teacher, texts, params.batch_size):
            features = extract_features(teacher, [texts[i] for i in batch])
            bad = non_finite_rows(features)
            if bad:
                if pending_keys:  # keep the good work before it
                    cache.write_shard(shard.writer, pending_keys, torch.cat(pending))
                    cache.save_index()
                raise ValueError(
                    f"teacher {params.model} gave non-finite features (NaN/inf) for {len(bad)} "
                    f"of {len(batch)} texts, e.g. '{texts[batch[bad[0]]]}'; none of that batch "
                    f"was cached (embed.dtype is {params.dtype}: try float32 or bfloat16)"
                )
            pending.append(features)
            pending_keys.extend(todo[i] for i in batch)
            progress.update(len(batch))
            while len(pending_keys) >= params.shard_size:
                features = torch.cat(pending)
                size = params.shard_size
                cache.write_shard(shard.writer, pending_keys[:size], features[:size])
                pending, pending_keys = [features[size:]], pending_keys[size:]
                written += 1
    if pending_keys:
        cache.write_shard(shard.writer, pending_keys, torch.cat(pending))
        written += 1
    return len(todo), written


def feature_settings(params: EmbedParams) -> dict[str, object]:
    """The embed params that determine a feature (not batching, sharding or paths)."""
    settings = params.model_dump(
        include={"model", "revision", "layer", "pooling", "dtype", "max_length"}
    )
    if params.weights != "pretrained":  # the pretrained teacher keeps the record it had
        settings["weights"] = params.weights
    return settings


def run_embed(
    params: EmbedParams,
    shard: ShardSpec | None = None,
    texts: list[str] | None = None,
    device: torch.device | None = None,
) -> EmbedSummary:
    """Fill the cache for the manifest's texts (or `texts`); return counts and timing.

    The teacher runs on `device` (default: this process's GPU when one is visible, else the
    CPU) in `embed.dtype`.
    """
    started = time.perf_counter()
    shard = shard or ShardSpec.from_environment()
    all_texts = texts if texts is not None else manifest_texts(Path(params.manifest))
    texts_by_key = {text_key(text): text for text in all_texts}
    device = device or process_device()
    teacher = load_teacher(params, device)
    loaded = time.perf_counter()
    cache = TeacherCache(Path(params.cache_dir), teacher.fingerprint)
    record_namespace(Path(params.cache_dir), feature_settings(params), teacher.fingerprint)
    cached_before = len(texts_by_key) - len(cache.missing(texts_by_key))
    computed, written = compute_missing(teacher, cache, texts_by_key, params, shard)
    cache.save_index()
    finished = time.perf_counter()
    summary = EmbedSummary(
        texts=len(all_texts),
        distinct=len(texts_by_key),
        cached_before=cached_before,
        computed=computed,
        shards_written=written,
        damaged_removed=len(cache.damaged),
        seconds=round(finished - started, 3),
        load_seconds=round(loaded - started, 3),
        prompts_per_s=round(computed / (finished - loaded), 2) if computed else 0.0,
        device=str(device),
    )
    return summary


def open_cache(params: EmbedParams) -> TeacherCache:
    """Open the namespace `sur embed` filled for these settings, without loading the teacher.

    Raises FileNotFoundError when `sur embed` has not run for them.
    """
    root = Path(params.cache_dir)
    return TeacherCache(root, recorded_namespace(root, feature_settings(params)))
