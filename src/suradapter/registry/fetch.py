"""Download a registered version and check every file against the registry's manifest.

The files are checked against the version's `sha256sums` tag (`manifest`), not against the
SHA256SUMS stored beside them, so a rewrite of files and SHA256SUMS together in the bucket is
refused. The download goes to a staging folder beside `dest` and is moved into place only
once every checksum matches, so `dest` never holds a partial or tampered copy.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow

from suradapter.atomic import recover_dir, replace_dir, staging_dir
from suradapter.config import Params
from suradapter.provenance import ARTIFACTS_DIR
from suradapter.registry.errors import RegistryError
from suradapter.registry.manifest import manifest_problems, recorded_manifest
from suradapter.registry.store import connect, version_for_ref


@dataclass
class FetchedVersion:
    """A verified local copy of a registered version."""

    root: Path  # the model root: MLmodel, artifacts/...
    version: str
    tags: dict[str, str]

    @property
    def artifacts(self) -> Path:
        return self.root / ARTIFACTS_DIR


def fetch_version(params: Params, ref: str, dest: Path) -> FetchedVersion:
    """Download version `ref` (a number or an alias) of the registered model to `dest`.

    The alias is resolved first, so the files are those of one version even if the alias
    moves meanwhile. Raises RegistryError naming each file whose sha256 differs from the
    registry's record or that is missing or unlisted; `dest` is then left as it was.
    """
    client = connect(params)
    name = params.registry.model_name
    version = version_for_ref(client, name, ref)
    number, tags = str(version.version), dict(version.tags or {})
    recorded = recorded_manifest(tags, name, number)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(dest)
    staging = staging_dir(dest)
    try:
        uri = f"models:/{name}/{number}"
        mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(staging))
        problems = manifest_problems(staging / ARTIFACTS_DIR, recorded)
        if problems:
            listed = "; ".join(f"{ARTIFACTS_DIR}/{problem}" for problem in problems)
            raise RegistryError(f"version {number} of {name} failed its checksum check: {listed}")
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, RegistryError) or not isinstance(err, Exception):
            raise
        message = f"could not download version {number} of {name}: {err}"
        raise RegistryError(message) from err
    replace_dir(staging, dest)
    return FetchedVersion(dest, number, tags)
