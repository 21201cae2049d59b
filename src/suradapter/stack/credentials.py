"""Generated stack secrets, kept in owner-only (0600) files under the state dir.

Secrets are made once and reused, so the S3 objects, the MLflow admin user, the Flask
session key and the local PostgreSQL cluster stay valid across `sur stack down` / `up`.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from suradapter.atomic import atomic_write_bytes
from suradapter.stack.postgres import DATABASE_USER
from suradapter.stack.settings import StackPaths

S3_REGION = "us-east-1"
ADMIN_USERNAME = "admin"


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, readable and writable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode(), mode=0o600)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass(frozen=True)
class S3Credentials:
    access_key_id: str
    secret_access_key: str
    region: str = S3_REGION


@dataclass(frozen=True)
class MlflowAdmin:
    username: str
    password: str
    secret_key: str  # Flask session/CSRF key of the basic-auth app


def s3_credentials(paths: StackPaths, create: bool = False) -> S3Credentials | None:
    """The S3 access keys of the stack; made (when `create`) on first use, else None."""
    data = _read_json(paths.s3_credentials)
    if data is None and create:
        credentials = S3Credentials(f"sur{secrets.token_hex(8)}", secrets.token_urlsafe(30))
        write_private(paths.s3_credentials, json.dumps(asdict(credentials), indent=2))
        return credentials
    return S3Credentials(**data) if data else None


def mlflow_admin(paths: StackPaths, create: bool = False) -> MlflowAdmin | None:
    """The MLflow basic-auth admin; made (when `create`) on first use, else None."""
    data = _read_json(paths.mlflow_admin)
    if data is None and create:
        admin = MlflowAdmin(ADMIN_USERNAME, secrets.token_urlsafe(24), secrets.token_hex(32))
        write_private(paths.mlflow_admin, json.dumps(asdict(admin), indent=2))
        return admin
    return MlflowAdmin(**data) if data else None


@dataclass(frozen=True)
class PostgresLogin:
    """The local PostgreSQL server's login (`stack.postgres_port`)."""

    user: str
    password: str


def postgres_login(paths: StackPaths, create: bool = False) -> PostgresLogin | None:
    """The login of the stack's own PostgreSQL server; made (when `create`) on first use,
    else None. The server's cluster is made with it, so it must outlive `down`."""
    data = _read_json(paths.postgres_login)
    if data is None and create:
        login = PostgresLogin(DATABASE_USER, secrets.token_urlsafe(24))
        write_private(paths.postgres_login, json.dumps(asdict(login), indent=2))
        return login
    return PostgresLogin(**data) if data else None


def write_mlflow_auth_ini(paths: StackPaths, admin: MlflowAdmin) -> Path:
    """Write the basic-auth app's config (users DB, admin, default permission); returns it."""
    users_db = paths.mlflow_dir / "basic_auth.db"
    text = (
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{users_db}\n"
        f"admin_username = {admin.username}\n"
        f"admin_password = {admin.password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    write_private(paths.mlflow_auth_ini, text)
    return paths.mlflow_auth_ini
