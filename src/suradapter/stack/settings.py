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
SERVICE_NAMES = ("s3", "mlflow", "prefect")  # start order; `down` stops in reverse

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

    def ensure(self) -> None:
        """Create the layout (owner-only) with a .gitignore, so nothing in it gets committed."""
        for folder in (self.root, self.s3_root, self.mlflow_dir, self.prefect_home):
            folder.mkdir(parents=True, exist_ok=True)
        for folder in (self.root / "run", self.root / "logs"):
            folder.mkdir(exist_ok=True)
        self.root.chmod(stat.S_IRWXU)
        ignore = self.root / ".gitignore"
        if not ignore.exists():
            ignore.write_text("# local stack state: databases, objects, credentials\n*\n")
