"""The shipped shapes base model (models/shapes-base): intact, loadable, and as documented."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from suradapter.config import load_params
from suradapter.model.zoo import load_base_pipeline
from suradapter.provenance import CHECKSUMS_FILE, verify_checksums

MAX_BYTES = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def base_dir(repo_root) -> Path:
    return repo_root / load_params(repo_root / "params.yaml").bootstrap.output_dir


def test_every_file_matches_its_sha256_and_the_folder_fits_the_budget(base_dir):
    assert (base_dir / CHECKSUMS_FILE).is_file()
    assert verify_checksums(base_dir) == []
    assert sum(p.stat().st_size for p in base_dir.rglob("*") if p.is_file()) <= MAX_BYTES


def test_a_tampered_file_is_reported(base_dir, tmp_path):
    import shutil

    copy = tmp_path / "base"
    shutil.copytree(base_dir, copy)
    with (copy / "unet/config.json").open("a") as handle:
        handle.write(" ")
    (copy / "metrics.json").unlink()
    assert sorted(verify_checksums(copy)) == [
        "metrics.json: missing",
        "unet/config.json: sha256 differs",
    ]


def test_the_standard_pipeline_loads_it_with_the_documented_architecture(base_dir, repo_root):
    params = load_params(repo_root / "params.yaml")
    pipeline = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None)
    boot = params.bootstrap
    text = pipeline.text_encoder.config
    assert (text.hidden_size, text.num_hidden_layers) == (boot.text_hidden_size, boot.text_layers)
    assert text.max_position_embeddings == boot.text_max_length
    assert list(pipeline.unet.config.block_out_channels) == boot.unet_channels
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    assert len(pipeline.tokenizer) == 49408  # the real CLIP BPE vocabulary
    assert pipeline.tokenizer.tokenize("fire-truck")[:2] == ["fire</w>", "-</w>"]
    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    assert size == params.shapes.image_size


def test_provenance_records_command_params_log_and_metrics_meeting_the_targets(base_dir):
    provenance = json.loads((base_dir / "provenance.json").read_text())
    assert provenance["command"] == "sur bootstrap-base"
    assert len(provenance["git_commit"]) == 40
    assert provenance["params"]["bootstrap"]["steps"] == provenance["steps"]
    log = [json.loads(line) for line in (base_dir / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == provenance["steps"]
    metrics = json.loads((base_dir / "metrics.json").read_text())
    keyword, narrative = metrics["test_keyword_heldout"], metrics["test_narrative_heldout"]
    assert keyword["colour"] >= 0.90 and keyword["shape"] >= 0.80 and keyword["count"] >= 0.70
    gaps = [keyword[a] - narrative[a] for a in ("count", "colour", "shape")]
    assert sum(gap >= 0.30 for gap in gaps) >= 2
    assert str(metrics["guidance"]) in metrics["validation_keyword_seen"]


def test_the_params_default_resolves_to_the_shipped_folder(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    params = load_params(repo_root / "params.yaml")
    assert params.base_model.id == params.bootstrap.output_dir
    pipeline = load_base_pipeline(params.base_model.id)
    assert not any(p.requires_grad for p in pipeline.unet.parameters())
    ids = pipeline.tokenizer(["3 red circles"], return_tensors="pt").input_ids
    with torch.no_grad():
        states = pipeline.text_encoder(ids)[0]
    assert states.shape[-1] == params.bootstrap.text_hidden_size
