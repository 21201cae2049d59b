"""`up`, `down` and `status` of the local stack; every service gets a pid record and a log.

`up` is idempotent (healthy services it started before are left alone), waits on health
with a deadline and reports the log tail of a service that fails. `down` stops only
processes whose pid record still matches. State survives `down`/`up`.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Literal, NoReturn

import psutil

from suradapter.stack import postgres
from suradapter.stack import services as svc
from suradapter.stack.credentials import mlflow_admin, s3_credentials
from suradapter.stack.process import (
    PidRecord,
    log_tail,
    owned_process,
    port_in_use,
    port_owner,
    read_record,
    settled_identity,
    start_detached,
    stop_process_tree,
    write_record,
)
from suradapter.stack.services import Service, StackError
from suradapter.stack.settings import SERVICE_NAMES, StackParams, StackPaths
from suradapter.waiting import wait_until

POLL_S = 0.5

State = Literal["running", "unhealthy", "dead", "stopped"]
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ServiceStatus:
    """One service as `status` sees it; `dead` means its pid record outlived the process."""

    name: str
    state: State
    url: str
    pid: int | None = None
    auth: bool = False
    note: str = ""

    @property
    def ok(self) -> bool:
        """False when something `up` started is not healthy."""
        return self.state in ("running", "stopped")


def configured(params: StackParams) -> list[str]:
    """The services this stack has: all but postgres, which needs `stack.postgres_port`."""
    local_database = params.postgres_port is not None
    return [name for name in SERVICE_NAMES if name != "postgres" or local_database]


def dependencies(params: StackParams, name: str) -> set[str]:
    """What `name` needs running: MLflow's artifacts live on S3, and with a local
    PostgreSQL, MLflow's and Prefect's state lives there."""
    needs = {"s3"} if name == "mlflow" else set()
    if name in ("mlflow", "prefect") and params.postgres_port is not None:
        needs.add("postgres")
    return needs


def select(
    params: StackParams, names: Iterable[str] | None, with_dependencies: bool = True
) -> list[str]:
    """`names` (default: the configured services) plus what they need, in start order;
    raises StackError on typos and on postgres without `stack.postgres_port`."""
    chosen = set(configured(params) if names is None else names)
    unknown = chosen - set(SERVICE_NAMES)
    if unknown:
        raise StackError(
            f"unknown stack service(s) {sorted(unknown)}; known: {', '.join(SERVICE_NAMES)}"
        )
    if "postgres" in chosen - set(configured(params)):
        raise StackError("this stack has no local PostgreSQL: set stack.postgres_port")
    if with_dependencies:
        for name in list(chosen):
            chosen.update(dependencies(params, name))
    return [name for name in SERVICE_NAMES if name in chosen]


def build_services(
    params: StackParams, paths: StackPaths, auth: bool, names: list[str], database: str | None
) -> list[Service]:
    """The `Service` for each of `names`, creating missing credentials on the way; MLflow
    and Prefect keep their state on the PostgreSQL server `database` (None: SQLite)."""
    credentials = s3_credentials(paths, create=True)
    admin = mlflow_admin(paths, create=True) if auth else None
    builders = {
        "postgres": lambda: svc.postgres_service(params, paths),
        "s3": lambda: svc.s3_service(params, paths, credentials),
        "mlflow": lambda: svc.mlflow_service(params, paths, credentials, admin, database),
        "prefect": lambda: svc.prefect_service(params, paths, database),
    }
    return [builders[name]() for name in names]


def up(
    params: StackParams,
    only: Iterable[str] | None = None,
    *,
    auth: bool | None = None,
    on_progress: Progress | None = None,
) -> list[ServiceStatus]:
    """Start the stack's services (or `only` those, plus dependencies) and wait until healthy.

    `auth` None keeps a running MLflow's auth setting, else uses `params.auth`.

    Returns their statuses. Raises StackError when a port is taken, a service runs with
    other settings, or a service is not healthy in time (with the tail of its log).
    """
    report = on_progress or (lambda message: None)
    names = select(params, only)
    paths = StackPaths.of(params.state_dir)
    local_database = params.postgres_port is not None
    paths.ensure(traversable=local_database and postgres.runs_as_other_user())
    if auth is None:  # keep what a running MLflow has, else params
        running = running_record(paths, "mlflow")
        auth = running.auth if running else params.auth
    database = svc.database_server(params, paths)
    wanted = build_services(params, paths, auth, names, database)
    pending: dict[str, Launch] = {}
    # the database first: MLflow and Prefect migrate their schema into it as they start
    for group in (
        [s for s in wanted if s.name == "postgres"],
        [s for s in wanted if s.name != "postgres"],
    ):
        if database and {"mlflow", "prefect"} & {service.name for service in group}:
            svc.ensure_databases(database)
        launches = [_launch(service, paths, report) for service in group]
        _wait_healthy(launches, paths, params.startup_timeout, report)
        pending.update((launch.service.name, launch) for launch in launches)
    if "s3" in pending:
        credentials = s3_credentials(paths)
        assert credentials is not None
        svc.ensure_buckets(
            pending["s3"].service.url, credentials, [params.artifacts_bucket, params.dvc_bucket]
        )
    return [
        replace(state, note="started" if pending[state.name].process else "already running")
        for state in status(params, list(pending))
    ]


def _launch(service: Service, paths: StackPaths, report: Progress) -> Launch:
    """Adopt `service` when it already runs with the same settings, else start it."""
    record = read_record(paths.pid_file(service.name))
    if record and owned_process(record):
        if record.fingerprint != service.fingerprint:
            raise StackError(
                f"{service.name} is already running (pid {record.pid}, {record.url}) with "
                "other settings (ports, buckets or --auth); run `sur stack down` first"
            )
        return Launch(service, record)  # adopted: wait for its health
    paths.pid_file(service.name).unlink(missing_ok=True)
    if port_in_use(service.port):
        owner = port_owner(service.port)
        raise StackError(
            f"port {service.port} ({service.name}) is already in use"
            f"{f' by {owner}' if owner else ''}; stop that process or set "
            f"stack.{service.name}_port in params.yaml"
        )
    if service.prepare is not None:
        service.prepare()
    report(f"starting {service.name} on {service.url}")
    return _start(service, paths)


@dataclass
class Launch:
    """A service `up` waits on: started by this call (`process` set) or found running."""

    service: Service
    record: PidRecord
    process: subprocess.Popen | None = None

    def exit_reason(self) -> str | None:
        """Why the service is no longer running, or None while it runs."""
        if self.process is not None:
            code = self.process.poll()
            return None if code is None else f"exited during start-up (exit code {code})"
        return None if owned_process(self.record) else "exited during start-up"

    def stop(self) -> None:
        leader_signal = svc.STOP_SIGNAL.get(self.service.name)
        if self.process is not None and self.process.poll() is None:
            stop_process_tree(psutil.Process(self.process.pid), leader_signal=leader_signal)
        elif (process := owned_process(self.record)) is not None:
            stop_process_tree(process, leader_signal=leader_signal)


def _start(service: Service, paths: StackPaths) -> Launch:
    log_path = paths.log_file(service.name)
    process, offset = start_detached(service.command, service.env, log_path, paths.root)
    shows = service.shows or service.command
    identity = settled_identity(process.pid, shows)
    record = PidRecord(
        service=service.name,
        pid=process.pid,
        create_time=identity[0] if identity else 0.0,
        cmdline=identity[1] if identity else shows,
        url=service.url,
        fingerprint=service.fingerprint,
        log=str(log_path),
        log_offset=offset,
        auth=service.auth,
    )
    write_record(paths.pid_file(service.name), record)
    return Launch(service, record, process)


def _wait_healthy(
    launches: list[Launch], paths: StackPaths, timeout: float, report: Progress
) -> None:
    start = time.monotonic()
    waiting = list(launches)

    def all_healthy() -> bool:
        for launch in list(waiting):
            if svc.healthy(launch.service.name, launch.service.url, paths):
                waiting.remove(launch)
            elif reason := launch.exit_reason():
                _fail(launch, paths, reason)
        if waiting:
            names = ", ".join(launch.service.name for launch in waiting)
            report(f"waiting for {names} to be healthy ({time.monotonic() - start:.0f} s)")
        return not waiting

    try:
        wait_until(all_healthy, timeout, "healthy services", interval_s=POLL_S)
    except TimeoutError:
        _fail(waiting[0], paths, f"not healthy after {timeout:.0f} s")


def _fail(launch: Launch, paths: StackPaths, reason: str) -> NoReturn:
    launch.stop()
    name = launch.service.name
    paths.pid_file(name).unlink(missing_ok=True)
    tail = log_tail(paths.log_file(name), launch.record.log_offset)
    raise StackError(
        f"{name} ({launch.service.url}) {reason}; last lines of {launch.record.log}:\n{tail}"
    )


def down(params: StackParams, only: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """Stop the services `up` started (or `only` those); returns (service, what happened).

    By default that includes a service params no longer configure but whose pid record
    remains (a local PostgreSQL after `stack.postgres_port` was unset, say)."""
    paths = StackPaths.of(params.state_dir)
    names = select(params, only, with_dependencies=False)
    if only is None:
        names = [n for n in SERVICE_NAMES if n in names or paths.pid_file(n).is_file()]
    outcome = []
    for name in reversed(names):
        pid_file = paths.pid_file(name)
        record = read_record(pid_file)
        if record is None:
            outcome.append((name, "not running"))
            continue
        process = owned_process(record)
        if process is None:
            outcome.append((name, f"stale pid file removed (pid {record.pid} is not ours)"))
        else:
            stop_process_tree(process, leader_signal=svc.STOP_SIGNAL.get(name))
            outcome.append((name, f"stopped (pid {record.pid})"))
        pid_file.unlink(missing_ok=True)
    return outcome


def status(params: StackParams, only: Iterable[str] | None = None) -> list[ServiceStatus]:
    """Each service's state, URL and pid, with a live health check of running ones."""
    paths = StackPaths.of(params.state_dir)
    statuses = []
    for name in select(params, only, with_dependencies=False):
        record = read_record(paths.pid_file(name))
        if record is None:
            url = svc.service_url(params.port(name), name)
            statuses.append(ServiceStatus(name, "stopped", url))
        elif owned_process(record) is None:
            gone = "is gone" if not psutil.pid_exists(record.pid) else "is another process now"
            note = f"pid {record.pid} {gone}; see {record.log}"
            statuses.append(ServiceStatus(name, "dead", record.url, record.pid, record.auth, note))
        else:
            state: State = "running" if svc.healthy(name, record.url, paths) else "unhealthy"
            statuses.append(ServiceStatus(name, state, record.url, record.pid, record.auth))
    return statuses


def running_record(paths: StackPaths, name: str) -> PidRecord | None:
    """The pid record of `name` when its process is still ours, else None (no health check)."""
    record = read_record(paths.pid_file(name))
    return record if record and owned_process(record) else None
