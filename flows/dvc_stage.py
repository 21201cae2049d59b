"""Run one DVC stage (`dvc repro --single-item <stage>`) and say whether DVC ran or skipped it.

DVC decides: a stage whose dependencies, params and outputs match dvc.lock is skipped, one
found in the run cache is restored, a frozen one is only verified. The stage's output is kept
in a log file (and echoed when asked), so a failure can name its last lines.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

RAN, SKIPPED, RESTORED, FROZEN, NOT_APPLICABLE = (
    "ran",
    "skipped",
    "restored",
    "frozen",
    "not_applicable",
)
# Environment the stages must not inherit: DVC tracks params.yaml and its declared profile.
DROPPED_ENV = ("SUR_PARAMS", "SUR_PROFILE")
TAIL_LINES = 30


@dataclass
class StageResult:
    """What happened to one stage in a flow run."""

    stage: str
    status: str  # ran | skipped | restored | frozen | not_applicable
    seconds: float = 0.0
    attempts: int = 1
    log: str = ""  # the stage's log file ('' when DVC was not called)

    @property
    def did_work(self) -> bool:
        return self.status == RAN

    def as_dict(self) -> dict:
        return asdict(self)


class StageFailed(RuntimeError):
    """`dvc repro` of a stage exited non-zero; the message holds the exit code and log tail."""


def dvc_executable() -> str:
    """The `dvc` of this environment (its stages call this environment's `sur`)."""
    return str(Path(sys.executable).parent / "dvc")


def stage_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ for a stage: this environment's bin first on PATH, no DVC analytics, `extra`."""
    env = {key: value for key, value in os.environ.items() if key not in DROPPED_ENV}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env.update(extra or {})
    return env


def classify(stage: str, output: str) -> str:
    """RAN, RESTORED, FROZEN or SKIPPED from `dvc repro` output for `stage`."""
    name = re.escape(stage)
    if re.search(rf"Running stage '{name}'", output):
        return RAN
    if re.search(rf"Stage '{name}' is cached - skipping run", output):
        return RESTORED
    if re.search(rf"frozen stage: '{name}'", output):
        return FROZEN
    return SKIPPED


def run_dvc_stage(
    project: Path, stage: str, env: Mapping[str, str], log_path: Path, echo: bool = False
) -> StageResult:
    """Reproduce `stage` alone in `project`; returns its status and duration.

    Raises StageFailed (exit code and the log's last lines) when DVC or the stage fails.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [dvc_executable(), "repro", "--single-item", stage]
    start = time.monotonic()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=project, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert process.stdout is not None
        while chunk := process.stdout.read1(65536):
            log.write(chunk)
            if echo:
                _echo(chunk)
        code = process.wait()
    seconds = time.monotonic() - start
    output = log_path.read_text(errors="replace")
    if code != 0:
        tail = "\n".join(output.replace("\r", "\n").rstrip().splitlines()[-TAIL_LINES:])
        raise StageFailed(
            f"`dvc repro --single-item {stage}` failed (exit {code}) after {seconds:.1f} s; "
            f"log {log_path}, last lines:\n{tail}"
        )
    return StageResult(stage, classify(stage, output), seconds, log=str(log_path))


def _echo(chunk: bytes) -> None:
    stream = getattr(sys.stdout, "buffer", None)
    if stream is None:  # a text-only stdout (captured or redirected)
        sys.stdout.write(chunk.decode(errors="replace"))
        sys.stdout.flush()
        return
    stream.write(chunk)
    stream.flush()
