"""Connection to the MLflow registry and the lookups every command shares.

Aliases: `candidate` (passed the gates), `production` (served), `previous` (for rollback).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from suradapter.config import Params
from suradapter.registry.errors import RegistryError
from suradapter.tracking import tracking_uri

CANDIDATE = "candidate"
PRODUCTION = "production"
PREVIOUS = "previous"
NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"


def connect(params: Params) -> MlflowClient:
    """Point MLflow at the project's tracking server (`tracking_uri(params)`); return a client."""
    uri = tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def aliases_of(client: MlflowClient, name: str) -> dict[str, str]:
    """`{alias: version}` of registered model `name` ({} when it does not exist yet)."""
    try:
        aliases = client.get_registered_model(name).aliases  # a SQL store gives int versions
        return {alias: str(version) for alias, version in aliases.items()}
    except MlflowException as err:
        if err.error_code == NOT_FOUND:
            return {}
        raise RegistryError(f"cannot read registered model {name}: {err.message}") from err


def get_version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    """Model version `version` of `name`. Raises RegistryError when it does not exist."""
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        if err.error_code == NOT_FOUND or "not found" in err.message.lower():
            raise RegistryError(f"version {version} of {name} does not exist") from None
        raise RegistryError(f"cannot read version {version} of {name}: {err.message}") from err


def version_for_ref(client: MlflowClient, name: str, ref: str) -> ModelVersion:
    """The version a reference names: a number ('3') or an alias ('production', '@production')."""
    ref = ref.removeprefix("@")
    if ref.isdigit():
        return get_version(client, name, ref)
    aliases = aliases_of(client, name)
    if ref not in aliases:
        known = ", ".join(f"@{alias}={version}" for alias, version in sorted(aliases.items()))
        raise RegistryError(f"alias @{ref} of {name} is not set (aliases: {known or 'none'})")
    return get_version(client, name, aliases[ref])


def download_version_file(name: str, version: str, path: str, dest: Path) -> Path:
    """Download one file of a version (`path` relative to the version root) into `dest`."""
    uri = f"models:/{name}/{version}/{path}"
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))


def resolve(params: Params, alias: str) -> str | None:
    """The version number `alias` points at, or None when it is not set."""
    client = connect(params)
    return aliases_of(client, params.registry.model_name).get(alias.removeprefix("@"))


def registry_status(params: Params) -> dict[str, str]:
    """`{alias: version}` of the registered model, sorted by alias."""
    client = connect(params)
    return dict(sorted(aliases_of(client, params.registry.model_name).items()))
