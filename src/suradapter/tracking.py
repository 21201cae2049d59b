"""MLflow helpers that stay optional: stages log to a run only when one is active."""

from __future__ import annotations


def log_to_active_run(metrics: dict[str, float]) -> None:
    """Log `metrics` to the active MLflow run, if there is one (and MLflow is installed)."""
    try:
        import mlflow
    except ImportError:
        return
    if mlflow.active_run() is not None:
        mlflow.log_metrics(metrics)
