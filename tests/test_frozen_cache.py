"""The frozen-output cache: cached and on-the-fly steps agree, the fingerprint separates base
models and resolutions, damaged shards are rebuilt (never served), two processes fill one
cache, and the EMA follows its formula and survives a save/load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from suradapter.config import load_params
from suradapter.data.pairs import AdapterTrainingData, TrainingRows, collate
from suradapter.frozen.cache import LATENTS, MEAN, STATES, TEXTS, FrozenCache
from suradapter.frozen.encode import fill_frozen_cache, frozen_fingerprint, open_frozen_cache
from suradapter.model.zoo import load_base_from_params
from suradapter.teacher.embed import ShardSpec, open_cache

SUR = str(Path(sys.executable).parent / "sur")


def _params(path: Path, cache_dir: Path):
    params = load_params(path, profile="tiny")
    encode = params.encode.model_copy(update={"cache_dir": str(cache_dir), "shard_size": 40})
    return params.model_copy(update={"encode": encode})


def _filled(params, shard=ShardSpec()):
    pipeline = load_base_from_params(params.base_model)
    data = AdapterTrainingData(Path(params.embed.manifest), pipeline.tokenizer, None)
    cache = open_frozen_cache(params, pipeline, torch.device("cpu"))
    summary = fill_frozen_cache(cache, params, pipeline, data, torch.device("cpu"), shard)
    return FrozenCache(Path(params.encode.cache_dir), cache.fingerprint), data, summary


def _entries(cache: FrozenCache, data: AdapterTrainingData) -> dict[str, torch.Tensor]:
    """Copies of every entry (reads are views of the memory-mapped shards)."""
    entries = {f"latent:{k}": cache.read(LATENTS, k, MEAN).clone() for k in data.image_keys}
    for key in {*data.narrative_keys, *data.keyword_keys}:
        entries[f"text:{key}"] = cache.read(TEXTS, key, STATES).clone()
    return entries


def test_a_cached_step_has_the_loss_of_an_on_the_fly_step(tiny_project, tmp_path):
    from suradapter.train.adapter import frozen_parts, step_loss

    params = _params(tiny_project, tmp_path / "frozen")
    cache, _, summary = _filled(params)
    assert summary.computed == summary.images + summary.texts > 0 and not cache.damaged
    pipeline = load_base_from_params(params.base_model)
    frozen = frozen_parts(pipeline, torch.device("cpu"), torch.float32)
    data = AdapterTrainingData(
        Path(params.embed.manifest), pipeline.tokenizer, open_cache(params.embed)
    )
    from suradapter.model.adapter import SURAdapter

    adapter_params = params.adapter.model_copy(update={"teacher_dim": data.teacher.shape[1]})
    adapter = SURAdapter.for_pipeline(adapter_params, pipeline).eval()
    items = [(0, False), (3, True), (5, False), (7, False)]
    losses = {}
    for name, source in (("cached", cache), ("on the fly", None)):
        rows = TrainingRows(data, source)
        batch = collate([rows[item] for item in items])
        assert (batch.pixels is None) == (source is not None)
        generator = torch.Generator().manual_seed(11)
        losses[name] = step_loss(params, adapter, frozen, batch, batch.dropped, generator, None)
    for term in ("total", "denoise", "llm_distill", "alignment", "preservation"):
        cached, fly = (float(getattr(losses[k], term)) for k in ("cached", "on the fly"))
        assert cached == pytest.approx(fly, rel=1e-5, abs=1e-6), term


def test_another_base_model_or_resolution_is_another_namespace(tiny_project, tmp_path):
    params = _params(tiny_project, tmp_path / "frozen")
    cache, _, _ = _filled(params)
    other_seed = params.base_model.model_copy(update={"seed": 1})
    other = load_base_from_params(other_seed)
    fingerprints = {
        "base": cache.fingerprint,
        "other base": frozen_fingerprint(other, torch.float32, cache.fingerprint["resolution"]),
        "other resolution": {**cache.fingerprint, "resolution": 64},
        "other dtype": {**cache.fingerprint, "dtype": "bfloat16"},
    }
    assert fingerprints["other base"]["text_encoder"] != cache.fingerprint["text_encoder"]
    assert fingerprints["other base"]["tokenizer"] == cache.fingerprint["tokenizer"]
    folders = set()
    for name, fingerprint in fingerprints.items():
        opened = FrozenCache(Path(params.encode.cache_dir), fingerprint)
        folders.add(opened.folder)
        expected = len(cache.index[LATENTS]) if name == "base" else 0
        assert len(opened.index[LATENTS]) == expected, name
    assert len(folders) == len(fingerprints)


def test_a_damaged_shard_is_removed_and_rebuilt_never_served(tiny_project, tmp_path):
    params = _params(tiny_project, tmp_path / "frozen")
    cache, data, _ = _filled(params)
    before = _entries(cache, data)
    latent_shard = sorted((cache.folder / LATENTS).glob("*.safetensors"))[0]
    text_shard = sorted((cache.folder / TEXTS).glob("*.safetensors"))[0]
    blob = bytearray(latent_shard.read_bytes())
    blob[-5] ^= 0x01  # one flipped bit inside the tensor data: still a valid safetensors file
    latent_shard.write_bytes(bytes(blob))
    text_shard.write_bytes(text_shard.read_bytes()[:200])  # truncated
    dead_writer = cache.folder / TEXTS / ".x.safetensors.tmp-999999999"  # killed mid-shard
    dead_writer.write_bytes(b"partial")

    reopened = FrozenCache(Path(params.encode.cache_dir), cache.fingerprint)
    assert sorted(problem.split(":")[0] for problem in reopened.damaged) == [
        f"{LATENTS}/{latent_shard.name}",
        f"{TEXTS}/{text_shard.name}",
    ]
    assert not latent_shard.exists() and not text_shard.exists() and not dead_writer.exists()
    lost = len(reopened.missing(LATENTS, data.image_keys))
    lost += len(reopened.missing(TEXTS, [*data.narrative_keys, *data.keyword_keys]))
    assert lost > 0

    healed, _, summary = _filled(params)
    assert (
        summary.computed == lost and summary.cached_before == summary.images + summary.texts - lost
    )
    after = _entries(healed, data)
    assert after.keys() == before.keys()
    for key in before:
        assert torch.allclose(after[key], before[key], atol=1e-6), key


def test_two_processes_fill_one_cache_without_collisions(tiny_project, tmp_path):
    single = _params(tiny_project, tmp_path / "single")
    reference, data, _ = _filled(single)
    raw = yaml.safe_load(tiny_project.read_text())
    raw["encode"].update(cache_dir=str(tmp_path / "shared"), shard_size=40)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    (tmp_path / "configs").symlink_to(tiny_project.parent / "configs")
    command = [SUR, "--params", str(path), "--profile", "tiny", "encode", "--shard"]
    writers = [
        subprocess.Popen([*command, f"{i}/2"], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = [writer.communicate(timeout=600)[0] for writer in writers]
    assert [writer.returncode for writer in writers] == [0, 0], outputs
    shared = FrozenCache(tmp_path / "shared", reference.fingerprint)
    assert not shared.damaged and shared.folder.name == reference.folder.name
    assert shared.missing(LATENTS, data.image_keys) == []
    assert shared.missing(TEXTS, [*data.narrative_keys, *data.keyword_keys]) == []
    expected, got = _entries(reference, data), _entries(shared, data)
    for key in expected:
        assert torch.allclose(got[key], expected[key], atol=1e-6), key
    for output in outputs:
        assert "to compute" in output  # each wrote its own share, with its size estimate


def test_the_ema_follows_diffusers_decay_and_survives_save_and_load(tmp_path):
    from suradapter.train.ema import load_ema, make_ema, save_ema

    model = torch.nn.Linear(2, 1, bias=False)
    ema = make_ema(model, decay=0.5)
    assert make_ema(model, None) is None
    shadow = model.weight.detach().clone()
    for update in range(1, 6):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.step(model.parameters())
        # diffusers: n-1 updates seen -> decay min(0.5, n/(n+9)), the first update copies
        decay = 0.0 if update == 1 else min(0.5, update / (update + 9))
        shadow = decay * shadow + (1 - decay) * model.weight.detach()
        assert torch.allclose(ema.shadow_params[0], shadow), update
    save_ema(ema, tmp_path)
    restored = make_ema(torch.nn.Linear(2, 1, bias=False), decay=0.5)
    load_ema(restored, tmp_path)
    assert torch.equal(restored.shadow_params[0], ema.shadow_params[0])
    assert restored.optimization_step == ema.optimization_step == 5
