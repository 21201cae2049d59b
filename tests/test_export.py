"""ONNX export of the adapted text path: parity, dynamic batch, bad inputs, providers, MLflow."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import servers
import torch

from suradapter.config import load_params
from suradapter.export.onnx_export import LOAD_OPTIONS, ExportParityError, export_text_path
from suradapter.export.runtime import (
    PROVIDERS,
    OnnxTextPath,
    ProviderError,
    candidate_providers,
    create_session,
    gpu_present,
)
from suradapter.model.adapter import SURAdapter
from suradapter.model.text_path import AdaptedTextPath, token_embeddings
from suradapter.model.token_mixer import MIXER_INPUT
from suradapter.model.zoo import load_base_pipeline
from suradapter.provenance import TEXT_PATH_MODEL, sha256_file

PROMPTS = ["", "a red circle", "three blue squares on a kitchen table", "purple triangles"]


@pytest.fixture(scope="module")
def settings(repo_root):
    return load_params(repo_root / "params.yaml", profile="tiny").export


@pytest.fixture(scope="module")
def pipeline():
    return load_base_pipeline("tiny")


def trained_like_adapter(pipeline, mode: str, folder: Path) -> SURAdapter:
    """A saved adapter whose zero-initialised parts have moved (so it changes the output).

    In fixed mode it has a token mixer standardised on the token embeddings of prompts, where
    the first token (BOS) is constant and zeroed.
    """
    width = pipeline.text_encoder.config.hidden_size
    mixer = None
    if mode == "fixed":
        tokens = pipeline.tokenizer.model_max_length
        mixer = {"tokens": tokens, "hidden": 16, "token_hidden": 8, "depth": 1}
        mixer["reads"] = MIXER_INPUT
    adapter = SURAdapter(
        width=width,
        depth=2,
        num_heads=2,
        ff_dim=64,
        mode=mode,
        teacher_dim=16 if mode == "fixed" else None,
        token_mixer=mixer,
    ).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        adapter.fc.weight.normal_(0.0, 0.2, generator=generator)
        if mixer is not None:
            path = AdaptedTextPath.from_pipeline(pipeline, adapter)
            fitting = [f"{n} {c} shapes on a table" for n in "123" for c in ("red", "blue", "a")]
            ids = path.tokenize(PROMPTS + fitting).input_ids
            adapter.mixer.fit_statistics([token_embeddings(pipeline.text_encoder, ids)])
            assert not adapter.mixer.input_scale[0].any()  # the constant first token
            adapter.mixer.output.weight.normal_(0.0, 0.2, generator=generator)
    adapter.save_pretrained(folder)
    return adapter


def exported(pipeline, settings, root: Path, mode: str):
    adapter_dir = root / f"adapter-{mode}"
    adapter = trained_like_adapter(pipeline, mode, adapter_dir)
    path = AdaptedTextPath.from_pipeline(pipeline, adapter)
    result = export_text_path(path, settings, root / f"export-{mode}", adapter_dir, "tiny")
    return path, adapter_dir, result


@pytest.fixture(scope="module")
def fixed_export(pipeline, settings, tmp_path_factory):
    return exported(pipeline, settings, tmp_path_factory.mktemp("fixed"), "fixed")


def test_fixed_mode_parity_at_several_batch_sizes_and_stamped_metadata(fixed_export):
    path, adapter_dir, result = fixed_export
    assert result.report["parity_max_abs_diff"] <= 1e-4
    onnx_path = OnnxTextPath.load(result.folder)
    assert onnx_path.provider == "cpu"
    assert onnx_path.input_names == ["input_ids", "attention_mask"]
    weights = adapter_dir / "diffusion_pytorch_model.safetensors"
    assert onnx_path.metadata["adapter_sha256"] == sha256_file(weights)
    assert onnx_path.metadata["exporter"] == "torch.onnx.export(dynamo=True)"
    assert onnx_path.metadata["opset"] == "18"
    graph = (result.folder / "text_path.onnx").read_bytes()  # no machine paths in the bytes
    assert b"stack_trace" not in graph and str(Path.cwd()).encode() not in graph
    expected = path.encode(PROMPTS).numpy()
    tokens = path.tokenize(PROMPTS)
    for size in (1, 3, 4):  # dynamic batch
        got = onnx_path.run(tokens.input_ids[:size], tokens.attention_mask[:size])
        assert got.shape == expected[:size].shape
        assert np.abs(got - expected[:size]).max() <= 1e-4
    assert np.abs(expected - path.encode(["", "x", "y", "z"]).numpy()).max() > 1e-3


def test_reference_mode_takes_ids_only_and_matches(pipeline, settings, tmp_path):
    path, _, result = exported(pipeline, settings, tmp_path, "reference")
    onnx_path = OnnxTextPath.load(result.folder)
    assert onnx_path.input_names == ["input_ids"]
    assert result.report["parity_max_abs_diff"] <= 1e-4
    tokens = path.tokenize(PROMPTS[:2])
    with torch.no_grad():
        expected = path(tokens.input_ids).numpy()
    assert np.abs(onnx_path.run(tokens.input_ids) - expected).max() <= 1e-4


def test_fp16_export_meets_its_own_tolerance(pipeline, settings, tmp_path):
    fp16 = settings.model_copy(update={"fp16": True})
    _, _, result = exported(pipeline, fp16, tmp_path, "fixed")
    assert result.report["dtype"] == "float16"
    assert result.report["parity_max_abs_diff"] <= settings.fp16_tolerance


def test_failed_parity_names_the_figure_and_keeps_the_previous_export(
    fixed_export, settings, tmp_path
):
    import shutil

    path, adapter_dir, result = fixed_export
    target = tmp_path / "export"
    shutil.copytree(result.folder, target)
    before = sha256_file(target / TEXT_PATH_MODEL)
    strict = settings.model_copy(update={"fp32_tolerance": 1e-12})
    with torch.no_grad():
        path.adapter.fc.weight.mul_(1.5)  # a different adapter, so the file would change
    try:
        with pytest.raises(ExportParityError, match=r"differs from PyTorch by .* above"):
            export_text_path(path, strict, target, adapter_dir, "tiny")
    finally:
        with torch.no_grad():
            path.adapter.fc.weight.div_(1.5)
    assert sha256_file(target / TEXT_PATH_MODEL) == before
    assert not list(tmp_path.glob("export.*"))  # no staging folder left behind


@pytest.mark.parametrize(
    ("ids", "mask", "message"),
    [
        (np.zeros((2, 32), dtype=np.float32), np.ones((2, 32)), "integer token ids"),
        (np.zeros(32, dtype=np.int64), np.ones(32, dtype=np.int64), "rank 1"),
        (np.zeros((1, 40), dtype=np.int64), np.ones((1, 40), dtype=np.int64), "too long"),
        (np.zeros((1, 32), dtype=np.int64), None, "attention_mask is required"),
        (np.full((1, 32), 10**7, dtype=np.int64), np.ones((1, 32), dtype=np.int64), "vocab"),
        (np.zeros((2, 32), dtype=np.int64), np.ones((3, 32), dtype=np.int64), "differs"),
    ],
)
def test_bad_inputs_get_a_clear_error(fixed_export, ids, mask, message):
    onnx_path = OnnxTextPath.load(fixed_export[2].folder)
    with pytest.raises(ValueError, match=message):
        onnx_path.run(ids, mask)


def test_the_factory_skips_gpu_providers_it_cannot_use_and_says_so(fixed_export, caplog):
    """On a machine without a usable GPU provider it runs on the CPU and says why each GPU
    provider was skipped; where one is usable (a lent GPU) it runs there."""
    model = fixed_export[2].folder / TEXT_PATH_MODEL
    with caplog.at_level(logging.INFO, logger="suradapter.export.runtime"):
        session, provider = create_session(model, ["tensorrt", "cuda", "cpu"])
    usable = candidate_providers(["tensorrt", "cuda", "cpu"])
    if not gpu_present() or "CUDAExecutionProvider" not in ort.get_available_providers():
        assert usable == ["cpu"]
        assert provider == "cpu" and session.get_providers() == ["CPUExecutionProvider"]
        with pytest.raises(ProviderError, match="no execution provider"):
            create_session(model, ["cuda"])
    assert provider in usable and session.get_providers()[0] == PROVIDERS[provider]
    for skipped in {"tensorrt", "cuda"} - set(usable):
        assert f"provider {skipped}: " in caplog.text and "skipped" in caplog.text
    assert f"runs on {PROVIDERS[provider]}" in caplog.text
    with pytest.raises(ValueError, match="unknown execution provider"):
        candidate_providers(["rocm"])


def test_the_export_round_trips_through_mlflow_on_s3(fixed_export, tmp_path, monkeypatch):
    import mlflow

    path, _, result = fixed_export
    with servers.s3_server(tmp_path / "s3", ("mlflow",)) as s3:
        for key, value in servers.s3_env(s3.endpoint).items():
            monkeypatch.setenv(key, value)
        with servers.mlflow_server(tmp_path / "mlflow", "s3://mlflow/artifacts") as url:
            mlflow.set_tracking_uri(url)
            try:
                mlflow.set_experiment("export-test")
                with mlflow.start_run() as run:
                    mlflow.log_artifacts(str(result.folder), "text_path")
                local = mlflow.artifacts.download_artifacts(
                    run_id=run.info.run_id, artifact_path="text_path", dst_path=str(tmp_path)
                )
            finally:
                mlflow.set_tracking_uri(None)
        stored = s3.client.list_objects_v2(Bucket="mlflow")["Contents"]
        assert any(obj["Key"].endswith(TEXT_PATH_MODEL) for obj in stored)
    downloaded = Path(local)
    for name in (TEXT_PATH_MODEL, "export.json"):
        assert sha256_file(downloaded / name) == sha256_file(result.folder / name)
    tokens = path.tokenize(PROMPTS)
    again = OnnxTextPath.load(downloaded).run(tokens.input_ids, tokens.attention_mask)
    assert np.abs(again - path.encode(PROMPTS).numpy()).max() <= 1e-4


def test_the_embedded_default_exports_within_1e5_with_a_tokenizer_free_of_load_options(
    tmp_path, repo_root
):
    """On the shipped shapes base, with a mixer that moves the output: parity <= 1e-5, and
    the saved tokenizer holds no trace of how this machine loaded it (HF_HUB_OFFLINE)."""
    params = load_params(repo_root / "params.yaml")
    pipeline = load_base_pipeline(str(repo_root / params.base_model.id))
    assert "local_files_only" in pipeline.tokenizer.init_kwargs  # what loading records
    adapter = trained_like_adapter(pipeline, "fixed", tmp_path / "adapter")
    path = AdaptedTextPath.from_pipeline(pipeline, adapter)
    result = export_text_path(path, params.export, tmp_path / "export", tmp_path / "adapter")
    assert result.report["parity_max_abs_diff"] <= 1e-5
    saved = json.loads((tmp_path / "export/tokenizer/tokenizer_config.json").read_text())
    assert not set(saved) & set(LOAD_OPTIONS)
    assert "local_files_only" in pipeline.tokenizer.init_kwargs  # the caller's is untouched
