"""Where versions come from: the MLflow model registry (`suradapter.registry`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from suradapter.config import Params

if TYPE_CHECKING:
    from suradapter.registry.fetch import FetchedVersion


class VersionSource(Protocol):
    """Resolves an alias to a version and downloads a version with its registry tags, every
    file checked against the manifest the registry records (not the copy beside the files)."""

    def resolve(self, alias: str) -> str | None: ...

    def fetch(self, version: str, dest: Path) -> FetchedVersion: ...


class RegistrySource:
    """The registered model `params.registry.model_name` on the tracking server."""

    def __init__(self, params: Params) -> None:
        self.params = params

    @property
    def model_name(self) -> str:
        return self.params.registry.model_name

    def resolve(self, alias: str) -> str | None:
        """The version `alias` points at, or None when no version has it."""
        from suradapter.registry import resolve

        version = resolve(self.params, alias)
        return None if version is None else str(version)

    def fetch(self, version: str, dest: Path) -> FetchedVersion:
        """Download `version` into `dest`, checked against the registry's manifest; return it
        with its tags. Raises RegistryError naming each file that does not match."""
        from suradapter.registry import fetch_version

        return fetch_version(self.params, version, dest)
