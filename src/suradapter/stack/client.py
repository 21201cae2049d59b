"""Client environment for a running stack, so `sur` commands talk to it automatically.

`client_env()` reads the pid records and credential files of the state dir; only
services that are running contribute. `apply_client_env()` puts that into os.environ,
one client at a time (S3, MLflow, Prefect) and only for clients the user has not
configured: an explicit MLFLOW_TRACKING_URI (or AWS key, or PREFECT_API_URL) wins.
"""

from __future__ import annotations

import os

from suradapter.stack.credentials import mlflow_admin, s3_credentials
from suradapter.stack.lifecycle import running_record
from suradapter.stack.settings import StackParams, StackPaths

DISABLE_ENV = "SUR_NO_STACK_ENV"  # set to 1 to keep `sur` away from a running stack


def default_state_dir() -> str:
    return StackParams.model_fields["state_dir"].default


def client_env_groups(state_dir: str | os.PathLike[str] | None = None) -> list[dict[str, str]]:
    """The environment of each running service's clients (S3, MLflow, Prefect), in that order."""
    paths = StackPaths.of(state_dir or default_state_dir())
    if not paths.root.is_dir():
        return []
    groups = []
    s3 = running_record(paths, "s3")
    credentials = s3_credentials(paths)
    if s3 and credentials:
        groups.append(
            {
                "MLFLOW_S3_ENDPOINT_URL": s3.url,
                "AWS_ACCESS_KEY_ID": credentials.access_key_id,
                "AWS_SECRET_ACCESS_KEY": credentials.secret_access_key,
                "AWS_DEFAULT_REGION": credentials.region,
            }
        )
    mlflow = running_record(paths, "mlflow")
    if mlflow:
        # artifact downloads go through the server too (not presigned URLs to S3)
        group = {
            "MLFLOW_TRACKING_URI": mlflow.url,
            "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
        }
        admin = mlflow_admin(paths) if mlflow.auth else None
        if admin:
            group |= {"MLFLOW_TRACKING_USERNAME": admin.username}
            group |= {"MLFLOW_TRACKING_PASSWORD": admin.password}
        groups.append(group)
    prefect = running_record(paths, "prefect")
    if prefect:
        groups.append({"PREFECT_API_URL": f"{prefect.url}/api"})
    return groups


def client_env(state_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """MLFLOW_*, AWS_* and PREFECT_API_URL for the stack running under `state_dir`.

    Returns {} when nothing runs there; never raises for a missing or partial state dir.
    """
    env: dict[str, str] = {}
    for group in client_env_groups(state_dir):
        env |= group
    return env


def apply_client_env(state_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Set the running stack's client env in os.environ; returns what it set.

    A client's group is set whole, and only when none of its keys is set already. Does
    nothing when $SUR_NO_STACK_ENV is 1.
    """
    if os.environ.get(DISABLE_ENV, "").lower() in ("1", "true", "yes"):
        return {}
    applied: dict[str, str] = {}
    for group in client_env_groups(state_dir):
        if not any(key in os.environ for key in group):
            os.environ.update(group)
            applied |= group
    return applied
