"""Light MLflow helpers (no torch import): where tracking goes, and optional logging."""

from __future__ import annotations

import os
from pathlib import Path

from suradapter.config import Params

LOCAL_STORE = Path(".sur/mlflow.db")
LOCAL_ARTIFACTS = Path(".sur/mlartifacts")


def tracking_uri(params: Params) -> str:
    """The MLflow tracking URI: params, then $MLFLOW_TRACKING_URI, then the local store."""
    if params.train.tracking_uri:
        return params.train.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    LOCAL_STORE.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{LOCAL_STORE.resolve()}"


def log_to_active_run(metrics: dict[str, float]) -> None:
    """Log `metrics` to the active MLflow run, if there is one (and MLflow is installed)."""
    try:
        import mlflow
    except ImportError:
        return
    if mlflow.active_run() is not None:
        mlflow.log_metrics(metrics)
