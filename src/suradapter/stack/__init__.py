"""The local stack (`sur stack up|down|status`): Prefect, MLflow and an S3 server on loopback.

Import-light (no boto3, MLflow or Prefect at import time), so the CLI can call
`apply_client_env()` at start-up for free.
"""

from suradapter.stack.client import apply_client_env, client_env
from suradapter.stack.lifecycle import ServiceStatus, down, status, up
from suradapter.stack.services import StackError
from suradapter.stack.settings import SERVICE_NAMES, StackParams, StackPaths

__all__ = [
    "SERVICE_NAMES",
    "ServiceStatus",
    "StackError",
    "StackParams",
    "StackPaths",
    "apply_client_env",
    "client_env",
    "down",
    "status",
    "up",
]
