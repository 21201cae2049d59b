"""Run one DVC stage (`dvc repro --single-item <stage>`) and say whether DVC ran or skipped it.

DVC decides: a stage whose dependencies, params and outputs match dvc.lock is skipped, one
found in the run cache is restored, a frozen one is only verified. `planned_status` asks
DVC's Python API which of these `repro` will do (the checks `repro` itself makes); an
up-to-date stage is then not started at all. The stage's output is kept in a log file (and
echoed when asked), so a failure can name its last lines.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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


def project_stage(repo: Any, stage: str) -> Any:
    """Stage `stage` of the dvc.yaml at the root of `repo` (a `dvc.repo.Repo`).

    A bare stage name would be looked up in the dvc.yaml of the current directory, which is
    another project's whenever the process runs elsewhere (a worker, a test)."""
    (found,) = repo.stage.collect(f"{Path(repo.root_dir) / 'dvc.yaml'}:{stage}")
    return found


def planned_status(project: Path, stage: str) -> str:
    """What `dvc repro --single-item <stage>` will do in `project`, by DVC's API: FROZEN,
    SKIPPED (dependencies, params and outputs match dvc.lock), RESTORED (a run with these
    inputs is in the run cache) or RAN."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.stage.cache import RunCacheNotFoundError
    from dvc_data.hashfile.hash_info import HashInfo

    # DVC resolves stage paths against the working directory, and reads under its repo lock.
    with contextlib.chdir(project), Repo(str(project)) as repo, repo.lock:
        found = project_stage(repo, stage)
        if found.frozen:
            return FROZEN
        try:
            if not found.changed():
                return SKIPPED
            if found.changed_stage() or not found.deps_cached():
                # as `repro` does: the run cache is keyed by the dependencies' current hashes
                # (set in memory here), and the outputs dvc.lock records do not apply
                found.save_deps()
                for out in found.outs:
                    out.hash_info = HashInfo()
            repo.stage_cache.restore(found, dry=True)
        except RunCacheNotFoundError:
            return RAN
        except DvcException:  # a missing dependency, say: `repro` runs it and reports why
            return RAN
        return RESTORED


def run_dvc_stage(
    project: Path, stage: str, env: Mapping[str, str], log_path: Path, echo: bool = False
) -> StageResult:
    """Reproduce `stage` alone in `project`; returns its status and duration.

    An up-to-date stage is not started (no log). Raises StageFailed (exit code and the log's
    last lines) when DVC or the stage fails.
    """
    start = time.monotonic()
    status = planned_status(project, stage)
    if status == SKIPPED:
        return StageResult(stage, SKIPPED, time.monotonic() - start)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [dvc_executable(), "repro", "--single-item", stage]
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
    if code != 0:
        output = log_path.read_text(errors="replace")
        tail = "\n".join(output.replace("\r", "\n").rstrip().splitlines()[-TAIL_LINES:])
        raise StageFailed(
            f"`dvc repro --single-item {stage}` failed (exit {code}) after {seconds:.1f} s; "
            f"log {log_path}, last lines:\n{tail}"
        )
    return StageResult(stage, status, seconds, log=str(log_path))


def _echo(chunk: bytes) -> None:
    stream = getattr(sys.stdout, "buffer", None)
    if stream is None:  # a text-only stdout (captured or redirected)
        sys.stdout.write(chunk.decode(errors="replace"))
        sys.stdout.flush()
        return
    stream.write(chunk)
    stream.flush()
