"""Settings of the local stack (`sur stack`) and where its state lives on disk.

`StackParams` is the `stack:` section of params.yaml. It depends on pydantic only, so that
`suradapter.config` can import it without a cycle.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

LOOPBACK = "127.0.0.1"
SERVICE_NAMES = ("s3", "mlflow", "prefect")  # start order; `down` stops in reverse
BUCKET_PATTERN = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"


class StackParams(BaseModel):
    """The local stack: Prefect server, MLflow tracking server and an S3 server, on loopback."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    state_dir: str = Field(
        ".sur/stack",
        description="Databases, S3 objects, logs, pid files and credentials (kept across down/up).",
    )
    prefect_port: int = Field(4200, ge=1, le=65535, description="Prefect server port.")
    mlflow_port: int = Field(5000, ge=1, le=65535, description="MLflow tracking server port.")
    s3_port: int = Field(9000, ge=1, le=65535, description="S3 server (rclone) port.")
    artifacts_bucket: str = Field(
        "mlflow", pattern=BUCKET_PATTERN, description="S3 bucket of the MLflow artifacts."
    )
    artifacts_prefix: str = Field(
        "artifacts", description="Key prefix of the MLflow artifacts inside their bucket."
    )
    dvc_bucket: str = Field(
        "dvc", pattern=BUCKET_PATTERN, description="S3 bucket of the DVC remote."
    )
    mlflow_workers: int = Field(
        1, ge=1, description="MLflow server workers (each one costs about 150 MB)."
    )
    auth: bool = Field(
        False, description="Start MLflow with basic-auth (admin password in a 0600 file)."
    )
    startup_timeout: float = Field(
        120.0, gt=0, description="Seconds `sur stack up` waits for each service to be healthy."
    )

    @model_validator(mode="after")
    def _distinct_ports(self) -> StackParams:
        ports = {"s3_port": self.s3_port, "mlflow_port": self.mlflow_port}
        ports["prefect_port"] = self.prefect_port
        if len(set(ports.values())) != len(ports):
            raise ValueError(f"stack ports must differ, got {ports}")
        return self

    def port(self, service: str) -> int:
        """The configured port of `service` ('s3', 'mlflow' or 'prefect')."""
        return getattr(self, f"{service}_port")


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
