"""The `sur` console script: help, params, adapter info and convert-reference, the main job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from reference_impl import ReferenceAdapter
from suradapter.model.adapter import SURAdapter

SUR = [str(Path(sys.executable).parent / "sur")]


def sur(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    merged = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [*SUR, *args], cwd=cwd, env=merged, capture_output=True, text=True, timeout=300
    )


def test_help_lists_the_commands(repo_root):
    result = sur("--help", cwd=repo_root)
    assert result.returncode == 0
    for command in ("run", "params", "adapter"):
        assert command in result.stdout


def test_params_show_prints_the_merged_profile(repo_root):
    result = sur("--profile", "tiny", "params", "show", cwd=repo_root)
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["profile"] == "tiny" and shown["adapter"]["ff_dim"] == 64


def test_bad_params_exit_nonzero_naming_the_key(tmp_path, repo_root):
    (tmp_path / "params.yaml").write_text("adapter: {depht: 2}\n")
    result = sur("--params", str(tmp_path / "params.yaml"), "params", "show", cwd=repo_root)
    assert result.returncode == 2
    assert "adapter.depht" in result.stdout and "did you mean 'depth'" in result.stdout


def test_adapter_info_for_the_sd15_profile(repo_root):
    result = sur("adapter", "info", "sd15", cwd=repo_root)
    assert result.returncode == 0, result.stderr
    assert "13,980,928" in result.stdout and "fixed" in result.stdout


def test_convert_reference_round_trips_outputs(tmp_path, repo_root):
    torch.manual_seed(0)
    reference = ReferenceAdapter(depth=2, adapter_weight=0.1, width=64, nhead=8, ff_dim=96)
    with torch.no_grad():
        reference.fc.weight.normal_()
    torch.save(reference.state_dict(), tmp_path / "adapter.pt")
    out = tmp_path / "converted"
    result = sur(
        "adapter",
        "convert-reference",
        str(tmp_path / "adapter.pt"),
        str(out),
        "--adapter-weight",
        "0.1",
        cwd=repo_root,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    loaded = SURAdapter.from_pretrained(out).eval()
    x = torch.randn(3, 9, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x).adapted, reference.eval()(x)[0])
    info = sur("adapter", "info", str(out), cwd=repo_root)
    assert "reference" in info.stdout and "0.1" in info.stdout


def test_convert_reference_rejects_a_bad_file(tmp_path, repo_root):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "x.pt")
    result = sur(
        "adapter", "convert-reference", str(tmp_path / "x.pt"), str(tmp_path / "o"), cwd=repo_root
    )
    assert result.returncode == 2 and "not a SUR-adapter state_dict" in result.stdout


def test_main_job_refuses_a_profile_that_dvc_does_not_track(project_copy):
    repo, env = project_copy
    result = sur("--profile", "tiny", "run", cwd=repo, env=env)
    assert result.returncode != 0
    assert "declares 'profile: shapes'" in " ".join((result.stdout + result.stderr).split())
