"""A local PostgreSQL server (Debian's `postgresql` package) on loopback.

The team stack keeps MLflow's backend store and Prefect's database on PostgreSQL; when no
server URL is given, `sur stack up` runs this one, and the tests start one the same way.
PostgreSQL refuses to run as root: when this process is root, the server's commands run as
the `postgres` system user (`setpriv`, which execs, so signals reach the server itself), and
that user owns the data folder.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote

from suradapter.stack.settings import LOOPBACK

SERVER_USER = "postgres"  # the system account Debian's package creates
DATABASE_USER = "sur"
INSTALL_HINT = "install PostgreSQL (Debian: `apt-get install postgresql`)"


class PostgresNotFound(RuntimeError):
    """No PostgreSQL server binaries on this machine (the message says how to get them)."""


def postgres_bin(name: str) -> Path:
    """The PostgreSQL program `name` (initdb, postgres): from `pg_config --bindir`, else
    Debian's newest /usr/lib/postgresql/<version>/bin. Raises PostgresNotFound."""
    candidates = []
    if pg_config := shutil.which("pg_config"):
        found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        candidates.append(Path(found.stdout.strip()))
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(versions, key=lambda p: int(p.parent.name), reverse=True)
    for folder in candidates:
        if (folder / name).is_file():
            return folder / name
    raise PostgresNotFound(f"PostgreSQL's {name} not found: {INSTALL_HINT}")


def runs_as_other_user() -> bool:
    """Whether the server runs as the `postgres` user rather than as this process's (root)."""
    return os.geteuid() == 0


def _as_server_user(command: list[str]) -> list[str]:
    """`command` as the server user when this process is root (PostgreSQL refuses root)."""
    if not runs_as_other_user():
        return command
    switch = ["setpriv", f"--reuid={SERVER_USER}", f"--regid={SERVER_USER}", "--init-groups"]
    return [*switch, "--", *command]


def _give_to_server_user(path: Path) -> None:
    if runs_as_other_user():
        account = pwd.getpwnam(SERVER_USER)
        os.chown(path, account.pw_uid, account.pw_gid)


def init_cluster(data: Path, password: str) -> None:
    """Create the database cluster in `data` (owner `sur`, scram-sha-256 passwords) unless it
    exists. Raises RuntimeError with initdb's output when it fails."""
    if (data / "PG_VERSION").is_file():
        return
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    _give_to_server_user(data)
    with tempfile.NamedTemporaryFile("w", dir=data.parent, delete=False) as secret:
        secret.write(password + "\n")
    try:
        _give_to_server_user(Path(secret.name))
        command = [str(postgres_bin("initdb")), "-D", str(data), "-U", DATABASE_USER]
        command += ["-A", "scram-sha-256", f"--pwfile={secret.name}", "-E", "UTF8"]
        result = subprocess.run(
            _as_server_user([*command, "--no-instructions"]), capture_output=True, text=True
        )
    finally:
        Path(secret.name).unlink(missing_ok=True)
    if result.returncode != 0:
        raise RuntimeError(f"initdb of {data} failed: {result.stdout}{result.stderr}")


def server_command(data: Path, port: int) -> list[str]:
    """`postgres` serving the cluster in `data` on loopback TCP `port` only (no Unix socket,
    whose path length is bounded: a deep state folder would not fit)."""
    command = [str(postgres_bin("postgres")), "-D", str(data), "-h", LOOPBACK, "-p", str(port)]
    return _as_server_user([*command, "-k", ""])


def blocking_folder(data: Path) -> Path | None:
    """The first folder above `data` that the server's user cannot pass through (not
    searchable by others) when the server runs as another user (root); else None."""
    if not runs_as_other_user():
        return None
    for folder in reversed(data.resolve().parents):
        if not folder.stat().st_mode & stat.S_IXOTH:
            return folder
    return None


def launched_command(command: list[str]) -> list[str]:
    """What `command` (from `server_command`) runs once the user switch has exec'd it."""
    return command[command.index("--") + 1 :] if command[0] == "setpriv" else command


def server_url(password: str, port: int, host: str = LOOPBACK) -> str:
    """`postgresql://sur:<password>@host:port`: the server, no database (credentials in it)."""
    return f"postgresql://{DATABASE_USER}:{quote(password, safe='')}@{host}:{port}"


def database_url(server: str, database: str, driver: str) -> str:
    """The SQLAlchemy URL of `database` on `server` (a `postgresql://user:pw@host:port` URL)
    through `driver`: psycopg for MLflow, asyncpg for Prefect."""
    scheme, _, rest = server.rstrip("/").partition("://")
    if scheme not in ("postgresql", "postgres"):
        raise ValueError(f"not a PostgreSQL server URL (postgresql://...): {scheme}://...")
    return f"postgresql+{driver}://{rest}/{database}"


def ensure_database(server: str, database: str) -> None:
    """Create `database` on `server` unless it exists."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(f"{server.rstrip('/')}/postgres", autocommit=True) as connection:
        found = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
        if found.fetchone() is None:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))


def accepts_connections(server: str) -> bool:
    """Whether `server` answers a login (False while it starts, or when it is down)."""
    import psycopg

    try:
        with psycopg.connect(f"{server.rstrip('/')}/postgres", connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False
