"""Teacher features: the hook reads the right (pre-norm) layer, pooling ignores padding and
batch mates, and the cache is content-addressed, resumable after SIGKILL and shardable; it
heals (a damaged index is rebuilt, a damaged or non-finite shard is removed and recomputed,
never served) and concurrent writers never overwrite each other."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors import safe_open
from safetensors.torch import save
from transformers import LlamaConfig, LlamaModel

from suradapter.config import EmbedParams
from suradapter.teacher.cache import (
    DamagedCacheError,
    TeacherCache,
    TeacherCacheWarning,
    fingerprint_id,
    text_key,
)
from suradapter.teacher.embed import (
    ShardSpec,
    compute_missing,
    feature_settings,
    open_cache,
    run_embed,
)
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


def test_a_random_teacher_is_seeded_and_cached_apart_from_the_pretrained_one(tmp_path):
    pretrained = EmbedParams(cache_dir=str(tmp_path / "cache"))
    random = pretrained.model_copy(update={"weights": "random"})
    assert teacher_fingerprint(random)["weights"] != teacher_fingerprint(pretrained)["weights"]
    assert fingerprint_id(teacher_fingerprint(random)) != fingerprint_id(
        teacher_fingerprint(pretrained)
    )
    assert feature_settings(random) != feature_settings(pretrained)  # `sur train` tells them apart
    texts = _texts(4)
    first, again = (extract_features(load_teacher(random), texts) for _ in range(2))
    assert torch.equal(first, again)  # seeded: the same random teacher every time
    assert not torch.allclose(first, extract_features(load_teacher(pretrained), texts), atol=0.1)


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


def _embed_params(params_path: Path) -> EmbedParams:
    return EmbedParams(**yaml.safe_load(params_path.read_text())["embed"])


def _shards(cache_root: Path) -> list[Path]:
    return sorted(cache_root.glob("*/shards/*.safetensors"))


def test_sigkill_mid_run_then_resume_without_recomputing(tmp_path, repo_root):
    texts = _texts(1500)
    params_path = _project(tmp_path, repo_root, texts, shard_size=50, batch_size=50)
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
            assert handle.get_tensor("features").shape == (50, 384)
        digests[shard] = hashlib.sha256(shard.read_bytes()).hexdigest()
    # the resumed run as the retrain flow starts it: its counts go to a run nested under the
    # flow's stage run
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    experiment = client.create_experiment("sur-adapter", (tmp_path / "artifacts").as_uri())
    stage_run = client.create_run(experiment, run_name="embed").info.run_id
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "SUR_PARENT_RUN_ID": stage_run}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    nested = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{stage_run}'")
    assert [run.info.run_name for run in nested] == ["embed"]
    counts = nested[0].data.metrics  # exactly the rows of the shards the kill cut off
    assert counts["embed_cached_before"] == 50 * len(finished)
    assert counts["embed_computed"] == 1500 - 50 * len(finished)
    params = _embed_params(params_path)
    cache = TeacherCache(Path(params.cache_dir), _namespace(params))
    assert len(cache) == 1500 and not list((tmp_path / "cache").rglob(".*.tmp-*"))
    rows = 0
    for shard in _shards(tmp_path / "cache"):
        with safe_open(str(shard), framework="pt") as handle:
            rows += len(json.loads(handle.metadata()["keys"]))
    assert rows == 1500, "a text was computed twice"
    for shard, digest in digests.items():  # finished shards were kept as they were
        assert hashlib.sha256(shard.read_bytes()).hexdigest() == digest


def test_two_sharded_processes_merge_to_the_single_process_cache(tmp_path, repo_root):
    texts = _texts(300)
    single = _project(tmp_path / "single", repo_root, texts, shard_size=64, batch_size=32)
    split = _project(tmp_path / "split", repo_root, texts, shard_size=64, batch_size=32)
    env = {**os.environ, "COLUMNS": "200"}
    run_embed(_embed_params(single))  # what one `sur embed` does, in this process
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


# --- The cache heals: damaged index or shards are rebuilt / removed and recomputed, never served.


def _embedded(tmp_path: Path, count: int = 20, shard_size: int = 8) -> tuple[EmbedParams, Path]:
    params = EmbedParams(cache_dir=str(tmp_path / "cache"), shard_size=shard_size, batch_size=8)
    run_embed(params, texts=_texts(count))
    return params, Path(params.cache_dir) / fingerprint_id(_namespace(params))


def _shard_rows(shard: Path) -> tuple[list[str], torch.Tensor]:
    with safe_open(str(shard), framework="pt") as handle:
        return json.loads(handle.metadata()["keys"]), handle.get_tensor("features")


def _reopen(params: EmbedParams) -> TeacherCache:
    """A fresh open that must find nothing to heal (no warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", TeacherCacheWarning)
        return TeacherCache(Path(params.cache_dir), _namespace(params))


def _training_manifest(path: Path, texts: list[str]) -> Path:
    rows = {
        "sample_id": [text_key(f"image {i}") for i in range(len(texts))],
        "text": texts,
        "prompt": ["a keyword prompt"] * len(texts),
        "image_path": [f"images/{i}.png" for i in range(len(texts))],
        "split": ["train"] * len(texts),
    }
    pq.write_table(pa.table(rows), path)
    return path


@pytest.mark.parametrize("damage", ["truncated", "missing", "wrong rows"])
def test_damaged_index_is_rebuilt_and_embed_and_training_read(tmp_path, tiny_pipeline, damage):
    from suradapter.data.pairs import AdapterTrainingData

    params, folder = _embedded(tmp_path)
    index = folder / "index.json"
    saved = index.read_bytes()
    open_cache(params)
    assert index.read_bytes() == saved, "a sound index is left alone (DVC sees no change)"
    record = json.loads(saved)
    if damage == "truncated":
        index.write_bytes(index.read_bytes()[: len(index.read_bytes()) // 2])
    elif damage == "missing":
        index.unlink()
    else:  # the shard list is right, the rows are not: it must not be trusted either
        keys = list(record["entries"])
        first, second = record["entries"][keys[0]], record["entries"][keys[1]]
        record["entries"][keys[0]], record["entries"][keys[1]] = second, first
        index.write_text(json.dumps(record))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = open_cache(params)
    if damage == "truncated":
        assert any("index.json is unreadable" in str(w.message) for w in caught)
    assert len(cache) == 20
    rewritten = json.loads(index.read_text())["entries"]
    assert {key: tuple(place) for key, place in rewritten.items()} == cache.index
    assert _reopen(params).index == cache.index
    assert run_embed(params, texts=_texts(20)).computed == 0
    texts = _texts(20)
    manifest = _training_manifest(tmp_path / "manifest.parquet", texts)
    data = AdapterTrainingData(manifest, tiny_pipeline.tokenizer, open_cache(params))
    expected = extract_features(load_teacher(params), texts)
    torch.testing.assert_close(data.teacher[:20], expected, rtol=0, atol=1e-5)


def test_truncated_shard_is_removed_and_recomputed_by_sur_embed(tmp_path, repo_root):
    texts = _texts(40)
    params_path = _project(tmp_path, repo_root, texts, shard_size=10, batch_size=10)
    command = [SUR, "--params", str(params_path), "embed"]
    run_embed(_embed_params(params_path))  # the first fill, in this process
    shards = _shards(tmp_path / "cache")
    assert len(shards) == 4
    damaged, kept = shards[0], shards[1:]
    lost_keys, _ = _shard_rows(damaged)
    kept_bytes = {shard: shard.read_bytes() for shard in kept}
    damaged.write_bytes(damaged.read_bytes()[:-700])  # a copy cut short
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"removed damaged shard shards/{damaged.name}" in result.stderr
    assert "does not match its name" in result.stderr
    digest = hashlib.sha256(damaged.read_bytes()).hexdigest()  # the same texts, the same bytes
    assert damaged.name == f"main-{digest}.safetensors", "rewritten whole"
    for shard, blob in kept_bytes.items():  # the good shards were neither rewritten nor lost
        assert shard.read_bytes() == blob
    params = _embed_params(params_path)
    cache = _reopen(params)
    assert set(cache.index) == {text_key(t) for t in texts}
    rows = sum(len(_shard_rows(shard)[0]) for shard in _shards(tmp_path / "cache"))
    assert rows == 40, "only the lost shard's texts are computed again"
    by_key = {text_key(t): t for t in texts}
    expected = extract_features(load_teacher(params), [by_key[k] for k in lost_keys])
    torch.testing.assert_close(cache.get(lost_keys), expected, rtol=0, atol=1e-5)


def _flip_a_feature_byte(shard: Path) -> None:
    blob = bytearray(shard.read_bytes())
    blob[-3] ^= 0x01  # a low mantissa bit of the last feature: still a plausible number
    shard.write_bytes(bytes(blob))


def test_flipped_bytes_are_detected_never_served_and_recomputed(tmp_path):
    params, folder = _embedded(tmp_path)
    damaged = sorted((folder / "shards").glob("*.safetensors"))[0]
    keys, features = _shard_rows(damaged)
    _flip_a_feature_byte(damaged)
    with pytest.warns(TeacherCacheWarning, match=f"{damaged.name} .*does not match its name"):
        cache = open_cache(params)
    assert not damaged.exists() and cache.missing(keys) == keys
    with pytest.raises(KeyError, match=f"run `sur embed`; removed as damaged: .*{damaged.name}"):
        cache.get(keys)
    again = run_embed(params, texts=_texts(20))
    assert (again.computed, again.damaged_removed) == (len(keys), 0)
    torch.testing.assert_close(_reopen(params).get(keys), features, rtol=0, atol=1e-5)

    cache = open_cache(params)  # damaged after the cache was opened: still never served
    shard_name, _ = cache.index[keys[0]]
    _flip_a_feature_byte(folder / "shards" / shard_name)
    with (
        pytest.warns(TeacherCacheWarning, match=shard_name),
        pytest.raises(DamagedCacheError, match=f"{shard_name} failed verification"),
    ):
        cache.get(keys)
    assert not (folder / "shards" / shard_name).exists() and keys[0] not in cache


def test_non_finite_features_are_never_written_nor_served(tmp_path):
    params, folder = _embedded(tmp_path)
    cache = open_cache(params)
    before = sorted(p.name for p in (folder / "shards").iterdir())
    nan = torch.zeros(2, 384)
    nan[1, 7] = float("nan")
    with pytest.raises(ValueError, match="refusing to cache 1 non-finite"):
        cache.write_shard("main", ["k0", "k1"], nan)
    with pytest.raises(ValueError, match="non-finite"):
        cache.write_shard("main", ["k0"], torch.full((1, 384), float("inf")))
    assert sorted(p.name for p in (folder / "shards").iterdir()) == before

    # A consistent rewrite: valid bytes, named by their own digest, but a NaN feature.
    original = sorted((folder / "shards").glob("*.safetensors"))[0]
    keys, features = _shard_rows(original)
    poisoned = features.clone()
    poisoned[2, 5] = float("nan")
    blob = save({"features": poisoned}, metadata={"keys": json.dumps(keys)})
    rewritten = original.with_name(f"main-{hashlib.sha256(blob).hexdigest()}.safetensors")
    rewritten.write_bytes(blob)
    original.unlink()
    with pytest.warns(TeacherCacheWarning, match=f"{rewritten.name} .*non-finite"):
        cache = open_cache(params)
    assert not rewritten.exists()
    with pytest.raises(KeyError, match="not in the teacher cache"):
        cache.get(keys)  # what training does: loud, no NaN handed over
    assert run_embed(params, texts=_texts(20)).computed == len(keys)
    served = _reopen(params).get([text_key(t) for t in _texts(20)])
    assert torch.isfinite(served).all()
    torch.testing.assert_close(_reopen(params).get(keys), features, rtol=0, atol=1e-5)


def test_a_teacher_giving_nan_stops_embed_and_caches_no_nan(tmp_path):
    params = EmbedParams(cache_dir=str(tmp_path / "cache"), shard_size=4, batch_size=4)
    teacher = load_teacher(params)
    poison = teacher.tokenizer("zebra", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        teacher.model.get_input_embeddings().weight[poison] = float("nan")
    texts = [*_texts(12), "a zebra of coins"]
    cache = TeacherCache(Path(params.cache_dir), teacher.fingerprint)
    by_key = {text_key(t): t for t in texts}
    with pytest.raises(ValueError, match=r"non-finite features .*'a zebra of coins'"):
        compute_missing(teacher, cache, by_key, params, ShardSpec())
    reopened = _reopen(params)  # every shard on disk verified (finite) on open
    assert text_key("a zebra of coins") not in reopened
    assert len(reopened) > 0, "the good batches before the bad one are kept"
    assert torch.isfinite(reopened.get(list(reopened.index))).all()


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_writers_never_overwrite_or_delete_each_others_shards(tmp_path):
    namespace = _namespace(EmbedParams())
    root = tmp_path / "cache"
    first = TeacherCache(root, namespace)
    shards = [
        first.write_shard("main", [f"a{i}-{row}" for row in range(3)], torch.randn(3, 384))
        for i in range(3)
    ]
    shards[0].unlink()  # e.g. removed as damaged: the next writer must not reuse a name
    kept = {shard: shard.read_bytes() for shard in shards[1:]}
    live = root / fingerprint_id(namespace) / "shards" / f".main-x.safetensors.tmp-{os.getpid()}"
    live.write_bytes(b"a live writer, mid-shard")
    dead = live.with_name(f".main-y.safetensors.tmp-{_dead_pid()}")
    dead.write_bytes(b"a writer that was killed mid-shard")
    second = TeacherCache(root, namespace)  # a second writer opens the same cache
    assert live.exists() and not dead.exists()
    other = second.write_shard("main", [f"b-{row}" for row in range(3)], torch.randn(3, 384))
    also = first.write_shard("main", [f"c-{row}" for row in range(3)], torch.randn(3, 384))
    assert len({other, also, *kept}) == 4
    for shard, blob in kept.items():
        assert shard.read_bytes() == blob
    keys = {f"{p}-{row}" for p in ("a1", "a2", "b", "c") for row in range(3)}
    assert set(TeacherCache(root, namespace).index) == keys


def test_two_unsharded_embed_runs_on_one_cache_keep_every_row(tmp_path, repo_root):
    texts = _texts(240)
    halves = [texts[:120], texts[120:]]
    projects = [
        _project(tmp_path / f"run{i}", repo_root, half, shard_size=10, batch_size=10)
        for i, half in enumerate(halves)
    ]
    cache_dir = tmp_path / "shared-cache"
    for path in projects:  # both runs fill one cache
        params = yaml.safe_load(path.read_text())
        params["embed"]["cache_dir"] = str(cache_dir)
        path.write_text(yaml.safe_dump(params))
    runs = [
        subprocess.Popen(
            [SUR, "--params", str(path), "embed"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for path in projects
    ]
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read()
    shards = _shards(cache_dir)
    assert len(shards) == 24 and {shard.name.split("-")[0] for shard in shards} == {"main"}
    params = EmbedParams(cache_dir=str(cache_dir))
    cache = _reopen(params)
    assert set(cache.index) == {text_key(t) for t in texts}
    assert sum(len(_shard_rows(shard)[0]) for shard in shards) == 240
    assert torch.isfinite(cache.get([text_key(t) for t in texts])).all()


def test_legacy_numbered_shards_are_adopted_when_sound(tmp_path):
    params, folder = _embedded(tmp_path)
    shards = sorted((folder / "shards").glob("*.safetensors"))
    lost_keys, _ = _shard_rows(shards[0])
    for number, shard in enumerate(shards):  # the naming before content addressing
        shard.rename(shard.with_name(f"main-{number:05d}.safetensors"))
    legacy = folder / "shards" / "main-00000.safetensors"
    legacy.write_bytes(legacy.read_bytes()[:-700])
    with pytest.warns(TeacherCacheWarning, match="main-00000.safetensors .*unreadable"):
        cache = open_cache(params)
    names = [p.name for p in (folder / "shards").glob("*.safetensors")]
    assert sorted(names) == [p.name for p in shards[1:]]  # renamed back to their digests
    assert cache.missing(text_key(t) for t in _texts(20)) == lost_keys
    assert run_embed(params, texts=_texts(20)).computed == len(lost_keys)
    assert len(_reopen(params)) == 20
