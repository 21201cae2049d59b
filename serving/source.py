"""Where versions come from: the MLflow model registry (`suradapter.registry`)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from suradapter.config import Params


class VersionSource(Protocol):
    """Resolves an alias to a version and downloads a version (checksums verified)."""

    def resolve(self, alias: str) -> str | None: ...

    def fetch(self, version: str, dest: Path) -> Path: ...


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

    def fetch(self, version: str, dest: Path) -> Path:
        """Download `version` into `dest`, verified; return its root. Raises RegistryError."""
        from suradapter.registry import fetch_version

        return Path(fetch_version(self.params, version, dest).root)
