"""Real local servers for tests: an S3 endpoint (rclone serve s3), PostgreSQL, and an MLflow
server on SQLite or PostgreSQL."""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3

from suradapter.stack import postgres
from suradapter.stack.process import http_ok
from suradapter.waiting import ready_process, wait_until

BIN = Path(sys.executable).parent
S3_KEY, S3_SECRET = "testkey", "testsecret"
# The metrics of a version registered on these servers in tests and benches, as `sur evaluate`
# writes them outside the shapes world (no oracle figures): every gate passes on them.
PASSING_METRICS = {
    "gap_closure_measured": False,
    "denoise": {"keyword": {"base": 1.0, "adapter": 1.01, "relative_increase": 0.01}},
    "alignment": {
        "cosine": {"base": 0.6, "adapter": 0.8},
        "retrieval_top1": {"base": 0.2, "adapter": 0.6},
    },
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    client: object


@contextmanager
def s3_server(root: Path, buckets: tuple[str, ...]) -> Iterator[S3Server]:
    """`rclone serve s3` on loopback, storing objects as files under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [str(BIN / "rclone"), "serve", "s3", "--addr", f"127.0.0.1:{port}"]
    command += ["--auth-key", f"{S3_KEY},{S3_SECRET}", str(root)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
        region_name="us-east-1",
    )
    pending = list(buckets)

    def buckets_created() -> bool:
        while pending:
            client.create_bucket(Bucket=pending[0])
            pending.pop(0)
        return True

    def exited() -> str | None:
        if process.poll() is None:
            return None
        log = process.stderr.read().decode(errors="replace")[-3000:]
        return f"rclone exited with code {process.returncode}:\n{log}"

    try:
        wait_until(
            buckets_created,
            20,
            f"the S3 server at {endpoint} to create {buckets}",
            retry_on=(Exception,),  # connection refused while it starts
            give_up=exited,
        )
        yield S3Server(endpoint, client)
    finally:
        process.terminate()
        process.wait(timeout=10)


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment for boto3 clients (and MLflow) to reach the local S3 server."""
    return {
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


@contextmanager
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server on loopback (`suradapter.stack.postgres`), its cluster in a fresh
    folder under the system temp dir (which the `postgres` user can reach when tests run as
    root); yields its `postgresql://sur:<password>@127.0.0.1:<port>` URL. Raises
    PostgresNotFound when PostgreSQL is not installed."""
    root = Path(tempfile.mkdtemp(prefix="sur-test-pg-"))
    root.chmod(0o755)
    password, port = "test-Pa55/word", free_port()
    try:
        postgres.init_cluster(root / "data", password)
        url = postgres.server_url(password, port)
        command = postgres.server_command(root / "data", port)

        def up() -> bool:
            return postgres.accepts_connections(url)

        with ready_process(command, root / "postgres.log", up, 60, f"PostgreSQL on {port}"):
            yield url
    finally:
        shutil.rmtree(root, ignore_errors=True)


def own_database(server: str, name: str, driver: str) -> str:
    """Database `name` on the PostgreSQL `server` (made when missing), as the SQLAlchemy URL
    through `driver`: each test module's servers keep their own database."""
    postgres.ensure_database(server, name)
    return postgres.database_url(server, name, driver)


@contextmanager
def mlflow_server(root: Path, artifacts: str, backend: str | None = None) -> Iterator[str]:
    """`mlflow server` on loopback with a SQLite store (or the SQLAlchemy URL `backend`, a
    PostgreSQL database say); yields its URL.

    `artifacts` is the artifact destination (an s3:// URI on the local S3 server); the
    server proxies artifact traffic, so clients only talk HTTP to it.
    """
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", backend or f"sqlite:///{root / 'mlflow.db'}"]
    command += ["--artifacts-destination", artifacts, "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    healthy = functools.partial(http_ok, f"{url}/health")
    with ready_process(command, root / "server.log", healthy, 120, f"mlflow at {url}", env=env):
        yield url


@contextmanager
def prefect_server(root: Path, database: str | None = None) -> Iterator[str]:
    """`prefect server start` on loopback with PREFECT_HOME `root` and its database there
    (SQLite) or in the database `flow_tests` of the PostgreSQL server URL `database`; yields
    its API URL."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    store = f"sqlite+aiosqlite:///{root / 'prefect.db'}"
    if database is not None:
        store = own_database(database, "flow_tests", "asyncpg")
    env = {
        **os.environ,
        "PREFECT_HOME": str(root),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": store,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--analytics-off"]
    url = f"http://127.0.0.1:{port}/api"
    healthy = functools.partial(http_ok, f"{url}/health")
    with ready_process(command, root / "server.log", healthy, 180, f"prefect at {url}", env=env):
        yield url


@contextmanager
def registry_servers(
    root: Path, setenv: Callable[[str, str], None], database: str | None = None
) -> Iterator[tuple[str, S3Server]]:
    """An S3 server and an MLflow server (SQLite store, or the PostgreSQL server URL
    `database`; artifacts on that S3) under `root`; yields (MLflow URL, S3 server). The S3
    environment is set with `setenv` first (e.g. a MonkeyPatch's), so the MLflow server and
    this process's clients inherit it."""
    backend = None
    if database is not None:  # a database of its own: the stack tests use `mlflow`
        backend = own_database(database, "registry_tests", "psycopg")
    with s3_server(root / "s3", ("mlflow",)) as s3:
        for key, value in s3_env(s3.endpoint).items():
            setenv(key, value)
        with mlflow_server(root / "mlflow", "s3://mlflow/artifacts", backend) as url:
            yield url, s3


def optional_postgres(request) -> str | None:
    """The session's PostgreSQL server URL (the `postgres_url` fixture), or None where
    PostgreSQL is not installed: a test that also runs on SQLite runs there instead."""
    import pytest

    try:
        return request.getfixturevalue("postgres_url")
    except pytest.skip.Exception:
        return None


def move_production(model_name: str, version: str) -> None:
    """Point @production at `version` by hand (and @previous at the old one), bypassing
    `promote`'s checks, as an operator with write access to the registry can."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    current = client.get_registered_model(model_name).aliases["production"]
    client.set_registered_model_alias(model_name, "previous", str(current))
    client.set_registered_model_alias(model_name, "production", version)
