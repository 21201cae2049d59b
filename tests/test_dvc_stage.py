"""`flows.dvc_stage`: DVC's own API says what `dvc repro` does to a stage, on a real project."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from flows.dvc_stage import (
    FROZEN,
    RAN,
    RESTORED,
    SKIPPED,
    StageFailed,
    dvc_executable,
    planned_status,
    run_dvc_stage,
    stage_env,
)

# The stage copies its input, so its output is a function of the input's bytes.
COPY = f"{sys.executable} -c \"import shutil; shutil.copy('in.txt', 'out.txt')\""


@pytest.fixture
def project(tmp_path):
    """A git + DVC project with one stage `copy`: in.txt -> out.txt."""
    env = stage_env({"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid"})
    env |= {"GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    (tmp_path / "in.txt").write_text("first\n")
    stages = {"copy": {"cmd": COPY, "deps": ["in.txt"], "outs": ["out.txt"]}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, env=env, check=True)
    subprocess.run([dvc_executable(), "init", "-q"], cwd=tmp_path, env=env, check=True)
    return tmp_path, env


def test_the_status_follows_what_dvc_repro_does(project):
    root, env = project
    logs = root / "logs"

    assert planned_status(root, "copy") == RAN  # never run
    first = run_dvc_stage(root, "copy", env, logs / "1.log")
    assert first.status == RAN and (root / "out.txt").read_text() == "first\n"
    assert "Running stage 'copy'" in (logs / "1.log").read_text()  # DVC agrees

    again = run_dvc_stage(root, "copy", env, logs / "2.log")
    assert again.status == SKIPPED and not again.log and not (logs / "2.log").exists()

    (root / "in.txt").write_text("second\n")
    assert run_dvc_stage(root, "copy", env, logs / "3.log").status == RAN
    (root / "in.txt").write_text("first\n")  # inputs of a run the run cache holds
    restored = run_dvc_stage(root, "copy", env, logs / "4.log")
    assert restored.status == RESTORED and (root / "out.txt").read_text() == "first\n"
    assert "is cached - skipping run" in (logs / "4.log").read_text()
    (root / "out.txt").unlink()  # an output lost: DVC checks it out again, without a run
    assert run_dvc_stage(root, "copy", env, logs / "5.log").status == RESTORED
    assert (root / "out.txt").read_text() == "first\n"

    subprocess.run([dvc_executable(), "freeze", "copy"], cwd=root, env=env, check=True)
    (root / "in.txt").write_text("third\n")
    assert run_dvc_stage(root, "copy", env, logs / "6.log").status == FROZEN
    assert (root / "out.txt").read_text() == "first\n"  # a frozen stage does not run


def test_a_failing_stage_names_its_exit_code_and_last_lines(project):
    root, env = project
    (root / "in.txt").unlink()
    with pytest.raises(StageFailed, match=r"failed \(exit \d+\).*last lines:"):
        run_dvc_stage(root, "copy", env, root / "logs" / "1.log")
