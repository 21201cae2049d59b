"""Where the local stack (`sur stack`) keeps its state on disk, and its fixed facts.

`StackParams`, the `stack:` section of params.yaml, lives in `suradapter.config` with every
other section (the config imports no service module).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from suradapter.config import StackParams

LOOPBACK = "127.0.0.1"
SERVICE_NAMES = ("postgres", "s3", "mlflow", "prefect")  # start order; `down` stops in reverse

__all__ = ["LOOPBACK", "SERVICE_NAMES", "StackParams", "StackPaths"]


@dataclass(frozen=True)
class StackPaths:
    """The layout of a stack's state dir."""

    root: Path

    @classmethod
    def of(cls, state_dir: str | os.PathLike[str]) -> StackPaths:
        return cls(Path(state_dir).expanduser().resolve())

    @property
    def s3_root(self) -> Path:
        return self.root / "s3"

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    @property
    def postgres_data(self) -> Path:
        return self.root / "postgres"

    @property
    def postgres_login(self) -> Path:
        return self.root / "postgres_login.json"

    @property
    def s3_credentials(self) -> Path:
        return self.root / "s3_credentials.json"

    @property
    def mlflow_admin(self) -> Path:
        return self.root / "mlflow_admin.json"

    @property
    def mlflow_auth_ini(self) -> Path:
        return self.root / "mlflow_auth.ini"

    def pid_file(self, service: str) -> Path:
        return self.root / "run" / f"{service}.json"

    def log_file(self, service: str) -> Path:
        return self.root / "logs" / f"{service}.log"

    def ensure(self, traversable: bool = False) -> None:
        """Create the layout (owner-only) with a .gitignore, so nothing in it gets committed.

        `traversable` lets other users pass through the root (0711, for a PostgreSQL server
        that runs as its own user); every folder and secret in it stays owner-only.
        """
        folders = [self.s3_root, self.mlflow_dir, self.prefect_home]
        folders += [self.root / "run", self.root / "logs"]
        for folder in (self.root, *folders):
            folder.mkdir(parents=True, exist_ok=True)
        for folder in folders:
            folder.chmod(stat.S_IRWXU)
        self.root.chmod(0o711 if traversable else stat.S_IRWXU)
        ignore = self.root / ".gitignore"
        if not ignore.exists():
            ignore.write_text("# local stack state: databases, objects, credentials\n*\n")
