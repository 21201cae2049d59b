"""The real `dvc` CLI on the real dvc.yaml, in a temporary git repo: repro, no-op re-runs,
param-scoped re-runs, and a push/pull round trip through a local S3 server (rclone serve s3)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import servers
from conftest import make_project_copy, set_param

BIN = Path(sys.executable).parent


def run(*args: str, cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory, repo_root):
    """One project for the module, reproduced once: (repo, env, what the first repro ran)."""
    repo, env = make_project_copy(tmp_path_factory.mktemp("dvc") / "repo", repo_root)
    return repo, env, stages_run(run("dvc", "repro", cwd=repo, env=env))


STAGES = (
    "generate_shapes", "prepare", "embed", "bootstrap_base", "encode", "train", "export", "evaluate"
)  # fmt: skip


def stages_run(output: str) -> set[str]:
    return {name for name in STAGES if f"Running stage '{name}'" in output}


def test_repro_noop_and_param_scoped_reruns(dvc_repo):
    repo, env, first = dvc_repo
    every = {
        "generate_shapes",
        "prepare",
        "embed",
        "encode",
        "train",
        "export",
        "evaluate",
    }  # no bootstrap
    assert first == every
    assert (repo / "data/prepared/manifest.parquet").is_file()
    assert list((repo / "data/teacher_cache").glob("*/shards/*.safetensors"))
    assert (repo / "outputs/adapter/diffusion_pytorch_model.safetensors").is_file()
    assert (repo / "outputs/export/text_path.onnx").is_file()
    assert (repo / "outputs/eval/report.json").is_file()  # written whatever the verdict
    assert stages_run(run("dvc", "repro", cwd=repo, env=env)) == set()
    assert "up to date" in run("dvc", "status", cwd=repo, env=env)
    set_param(repo, "train", "learning_rate", 0.002)
    assert stages_run(run("dvc", "repro", cwd=repo, env=env)) == {"train", "export", "evaluate"}
    set_param(repo, "export", "fp32_tolerance", 0.001)
    assert stages_run(run("dvc", "repro", cwd=repo, env=env)) == {"export"}
    set_param(repo, "embed", "batch_size", 32)  # the same features: train's inputs unchanged
    assert stages_run(run("dvc", "repro", cwd=repo, env=env)) == {"embed"}
    set_param(repo, "prepare", "val_fraction", 0.2)  # a new manifest: embed and train re-run
    assert stages_run(run("dvc", "repro", cwd=repo, env=env)) == every - {"generate_shapes"}


@pytest.fixture
def s3_server(tmp_path):
    """A real S3 endpoint on loopback: `rclone serve s3`, storing objects as files on disk."""
    with servers.s3_server(tmp_path / "s3root", ("dvc-store",)) as server:
        yield server.endpoint, server.client


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_push_pull_round_trip_through_s3(dvc_repo, s3_server):
    repo, env, _ = dvc_repo
    endpoint, client = s3_server
    env = {**env, "AWS_ACCESS_KEY_ID": "testkey", "AWS_SECRET_ACCESS_KEY": "testsecret"}
    run("dvc", "remote", "add", "-d", "store", "s3://dvc-store/cache", cwd=repo, env=env)
    run("dvc", "remote", "modify", "store", "endpointurl", endpoint, cwd=repo, env=env)
    run("dvc", "repro", cwd=repo, env=env)  # whatever the module's other test changed last
    prepared = _digests(repo / "data/prepared")
    features = _digests(repo / "data/teacher_cache")
    run("dvc", "push", cwd=repo, env=env)
    stored = client.list_objects_v2(Bucket="dvc-store", Prefix="cache/")
    assert stored.get("KeyCount", 0) > 0
    shutil.rmtree(repo / ".dvc/cache")
    shutil.rmtree(repo / "data")
    run("dvc", "pull", cwd=repo, env=env)
    assert _digests(repo / "data/prepared") == prepared
    assert _digests(repo / "data/teacher_cache") == features
