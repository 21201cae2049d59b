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


PARENT_RUN_ENV = "SUR_PARENT_RUN_ID"  # set by the retrain flow for the stages it runs
PARENT_RUN_TAG = "mlflow.parentRunId"


def parent_run_tags() -> dict[str, str]:
    """`{"mlflow.parentRunId": id}` from $SUR_PARENT_RUN_ID (the flow's stage run), else {}.

    Passed as `tags=` to `mlflow.start_run`, it nests a stage's own run under the run of the
    flow that started the stage; with an active run MLflow's own nesting takes precedence.
    """
    parent = os.environ.get(PARENT_RUN_ENV, "").strip()
    return {PARENT_RUN_TAG: parent} if parent else {}


def flatten_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """`{"a": {"b": 1}}` -> `{"a.b": "1"}` (MLflow params are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat
