"""Teacher features: the hook reads the right (pre-norm) layer, pooling ignores padding and
batch mates, and the cache is content-addressed, resumable after SIGKILL and shardable."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import LlamaConfig, LlamaModel

from suradapter.config import EmbedParams
from suradapter.teacher.cache import TeacherCache, fingerprint_id, text_key
from suradapter.teacher.embed import ShardSpec, run_embed
from suradapter.teacher.model import (
    Teacher,
    extract_features,
    hooked_layer_output,
    load_teacher,
    pool,
    teacher_fingerprint,
)

SUR = str(Path(sys.executable).parent / "sur")


@pytest.fixture(scope="module")
def tiny_llama() -> LlamaModel:
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaModel(config).eval()


def _llama_teacher(model, layer: int, pooling: str = "mean") -> Teacher:
    return Teacher(model, None, {"layer": layer, "pooling": pooling, "max_length": 16})


@pytest.mark.parametrize("layer", [0, 1])
def test_hook_equals_the_matching_hidden_state(tiny_llama, layer):
    ids = torch.randint(0, 128, (2, 9))
    mask = torch.ones_like(ids)
    states = tiny_llama(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hooked = hooked_layer_output(_llama_teacher(tiny_llama, layer), ids, mask)
    torch.testing.assert_close(hooked, states.hidden_states[layer + 1], rtol=0, atol=1e-6)


def test_last_layer_hook_is_the_pre_final_norm_residual_stream(tiny_llama):
    ids = torch.randint(0, 128, (2, 9))
    mask = torch.ones_like(ids)
    states = tiny_llama(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hooked = hooked_layer_output(_llama_teacher(tiny_llama, 2), ids, mask)
    assert not torch.allclose(hooked, states.hidden_states[-1], atol=1e-3)  # that one is normed
    torch.testing.assert_close(tiny_llama.norm(hooked), states.hidden_states[-1], atol=1e-5, rtol=0)


def _padded(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    return ids, mask


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_pooled_features_ignore_padding_side_and_batch_mates(tiny_llama, pooling):
    teacher = _llama_teacher(tiny_llama, 1, pooling)
    rows = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [3]]

    def features(batch, side):
        ids, mask = _padded(batch, side)
        return pool(hooked_layer_output(teacher, ids, mask), mask, pooling)

    alone = torch.cat([features([row], "right") for row in rows])
    for side in ("left", "right"):
        torch.testing.assert_close(features(rows, side), alone, rtol=0, atol=1e-5)


def test_last_token_pooling_picks_the_last_real_token():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    assert pool(hidden, mask, "last").flatten().tolist() == [1.0, 7.0]
    assert pool(hidden, mask, "mean").flatten().tolist() == [0.5, 6.0]


@pytest.fixture(scope="module")
def minilm():
    return load_teacher(EmbedParams())


def test_minilm_features_match_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    from suradapter.teacher.model import resolve_teacher_path

    full = SentenceTransformer(resolve_teacher_path("minilm"), device="cpu")
    unnormalised = SentenceTransformer(modules=[full[0], full[1]], device="cpu")
    texts = ["a trio of fire-truck coloured coins lying in the snow", "a single plate", "hi"]
    theirs = unnormalised.encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(extract_features(minilm, texts), theirs, rtol=0, atol=1e-5)
    singles = torch.cat([extract_features(minilm, [text]) for text in texts])
    torch.testing.assert_close(extract_features(minilm, texts), singles, rtol=0, atol=1e-5)


def test_fingerprint_separates_teacher_settings(minilm):
    other = load_teacher(EmbedParams(layer=2, pooling="last"))
    assert other.fingerprint_id != minilm.fingerprint_id
    assert minilm.fingerprint["layer"] == 5 and len(minilm.fingerprint["weights"]) == 64


def _texts(n: int) -> list[str]:
    words = ["coins", "plates", "tiles", "buttons", "slices", "signs"]
    return [f"prompt {i}: some {words[i % 6]} in a row of {i % 17} things" for i in range(n)]


def test_cache_computes_each_distinct_text_once_and_only_missing_ones(tmp_path):
    params = EmbedParams(cache_dir=str(tmp_path / "cache"), shard_size=16, batch_size=8)
    texts = _texts(40)
    first = run_embed(params, texts=[*texts, *texts[:10]])
    assert (first.texts, first.distinct, first.computed) == (50, 40, 40)
    again = run_embed(params, texts=[*texts, "one new prompt"])
    assert (again.cached_before, again.computed) == (40, 1)
    cache = TeacherCache(Path(params.cache_dir), _namespace(params))
    features = cache.get([text_key(t) for t in texts[:3]])
    expected = extract_features(load_teacher(params), texts[:3])
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-5)
    with pytest.raises(KeyError, match="not in the teacher cache"):
        cache.get([text_key("never embedded")])


def _namespace(params: EmbedParams) -> dict:
    return teacher_fingerprint(params)


def test_stale_index_is_rebuilt_from_shards(tmp_path):
    params = EmbedParams(cache_dir=str(tmp_path / "cache"), shard_size=8, batch_size=8)
    run_embed(params, texts=_texts(20))
    namespace = _namespace(params)
    folder = Path(params.cache_dir) / fingerprint_id(namespace)
    (folder / "index.json").write_text(json.dumps({"shards": [], "entries": {}}))
    assert len(TeacherCache(Path(params.cache_dir), namespace)) == 20


def _project(tmp_path: Path, repo_root: Path, texts: list[str], **embed) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"text": texts}), manifest)
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["embed"].update(manifest=str(manifest), cache_dir=str(tmp_path / "cache"), **embed)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _shards(cache_root: Path) -> list[Path]:
    return sorted(cache_root.glob("*/shards/*.safetensors"))


def test_sigkill_mid_run_then_resume_without_recomputing(tmp_path, repo_root):
    texts = _texts(3000)
    params_path = _project(tmp_path, repo_root, texts, shard_size=100, batch_size=50)
    command = [SUR, "--params", str(params_path), "embed"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(_shards(tmp_path / "cache")) < 3 and process.poll() is None:
        assert time.monotonic() < deadline, "embed wrote no shards in time"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = _shards(tmp_path / "cache")
    assert 3 <= len(finished) < 30, "the kill must land mid-run"
    digests = {}
    for shard in finished:  # every shard on disk is complete and readable
        with safe_open(str(shard), framework="pt") as handle:
            assert handle.get_tensor("features").shape == (100, 384)
        digests[shard] = hashlib.sha256(shard.read_bytes()).hexdigest()
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    params = EmbedParams(**yaml.safe_load(params_path.read_text())["embed"])
    cache = TeacherCache(Path(params.cache_dir), _namespace(params))
    assert len(cache) == 3000 and not list((tmp_path / "cache").rglob(".*.tmp-*"))
    rows = 0
    for shard in _shards(tmp_path / "cache"):
        with safe_open(str(shard), framework="pt") as handle:
            rows += len(json.loads(handle.metadata()["keys"]))
    assert rows == 3000, "a text was computed twice"
    for shard, digest in digests.items():  # finished shards were kept as they were
        assert hashlib.sha256(shard.read_bytes()).hexdigest() == digest


def test_two_sharded_processes_merge_to_the_single_process_cache(tmp_path, repo_root):
    texts = _texts(300)
    single = _project(tmp_path / "single", repo_root, texts, shard_size=64, batch_size=32)
    split = _project(tmp_path / "split", repo_root, texts, shard_size=64, batch_size=32)
    env = {**os.environ, "COLUMNS": "200"}
    subprocess.run(
        [SUR, "--params", str(single), "embed"], check=True, env=env, capture_output=True
    )
    workers = [
        subprocess.Popen(
            [SUR, "--params", str(split), "embed", "--shard", f"{i}/2"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    for worker in workers:
        assert worker.wait(timeout=300) == 0, worker.stderr.read()
    subprocess.run(
        [SUR, "--params", str(split), "embed", "--merge-only"],
        check=True,
        env=env,
        capture_output=True,
    )
    names = {p.name.split("-")[0] for p in _shards(tmp_path / "split" / "cache")}
    assert names == {"p0of2", "p1of2"}
    params = EmbedParams(cache_dir=str(tmp_path / "single" / "cache"), shard_size=64)
    namespace = _namespace(params)
    one = TeacherCache(tmp_path / "single" / "cache", namespace)
    two = TeacherCache(tmp_path / "split" / "cache", namespace)
    keys = [text_key(t) for t in texts]
    assert set(one.index) == set(two.index) == set(keys)
    torch.testing.assert_close(one.get(keys), two.get(keys), rtol=0, atol=1e-6)


def test_shard_spec_parsing():
    assert ShardSpec.parse("1/3") == ShardSpec(1, 3)
    for bad in ("3/3", "a/b", "1"):
        with pytest.raises(ValueError, match="--shard"):
            ShardSpec.parse(bad)
    owners = [sum(ShardSpec(i, 3).owns(text_key(str(k))) for i in range(3)) for k in range(50)]
    assert owners == [1] * 50


def test_counts_are_logged_to_an_active_mlflow_run(tmp_path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("embed-test")  # never the active experiment of an earlier test
    params = EmbedParams(cache_dir=str(tmp_path / "cache"), batch_size=8)
    with mlflow.start_run() as run:
        run_embed(params, texts=_texts(12))
    logged = mlflow.get_run(run.info.run_id).data.metrics
    assert logged["embed_computed"] == 12 and logged["embed_distinct"] == 12
    mlflow.set_tracking_uri(None)
