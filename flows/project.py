"""The DVC project a flow runs in: its params (as DVC sees them), its stages and its locks.

Two locks keep retrains one at a time: `retrain_lock`, a file lock on the checkout (its DVC
workspace), and `shared_retrain_slot`, a one-slot global concurrency limit on the Prefect
server, which every checkout and machine that shares the server takes before it trains,
registers or promotes.
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from flows.settings import LOCK_FILE, RETRAIN_SLOT, SHAPES_STAGE, STAGES
from suradapter.config import Params, load_params


class ProjectError(RuntimeError):
    """The project cannot be run by the flow (missing file or stage); the message says why."""


def project_params(project: Path) -> Params:
    """Params of `project`/params.yaml on the profile it declares: what DVC tracks.

    SUR_PROFILE is ignored on purpose (DVC resolves `configs/${profile}.yaml` from the file).
    Raises ProjectError when params.yaml is missing; ParamsError when it is invalid.
    """
    path = project / "params.yaml"
    if not path.is_file():
        raise ProjectError(f"{path} not found: pass the project root as project_dir")
    declared = (yaml.safe_load(path.read_text()) or {}).get("profile")
    return load_params(path, profile=declared)


def planned_stages(project: Path, params: Params) -> list[tuple[str, bool]]:
    """`(stage, applies)` for each of STAGES in order; raises ProjectError if dvc.yaml lacks one."""
    dvc_yaml = project / "dvc.yaml"
    declared = {}
    if dvc_yaml.is_file():
        declared = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    missing = [stage for stage in STAGES if stage not in declared]
    if missing:
        raise ProjectError(
            f"{dvc_yaml} has no stage(s) {', '.join(missing)}: the retrain flow runs "
            f"{', '.join(STAGES)} (is project_dir the repository root?)"
        )
    return [(stage, stage != SHAPES_STAGE or params.uses_shapes_world) for stage in STAGES]


@contextmanager
def retrain_lock(project: Path, on_wait: Callable[[str], None]) -> Iterator[None]:
    """Hold the project's retrain lock (a flock on LOCK_FILE); wait while another run holds it."""
    path = project / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait(f"another retrain holds {path}; waiting for it to finish")
            start = time.monotonic()
            fcntl.flock(handle, fcntl.LOCK_EX)
            on_wait(f"lock acquired after {time.monotonic() - start:.0f} s")
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def shared_retrain_slot(
    on_wait: Callable[[str], None], timeout_s: float | None = None
) -> Iterator[None]:
    """Hold the one retrain slot of the Prefect server (global concurrency limit
    RETRAIN_SLOT, made with 1 slot on first use); wait while another retrain holds it.

    The slot is a lease the holder renews while it runs, so a holder that dies frees it when
    its lease lapses. Raises TimeoutError when `timeout_s` passes first (None: wait on).
    """
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(RETRAIN_SLOT, 1)
    on_wait(f"taking the shared retrain slot (Prefect concurrency limit '{RETRAIN_SLOT}')")
    with concurrency(RETRAIN_SLOT, occupy=1, timeout_seconds=timeout_s, strict=True):
        yield
