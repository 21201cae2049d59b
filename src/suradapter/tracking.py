"""Light MLflow helpers (no torch import): where tracking goes, the experiment, stage runs."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from suradapter.config import Params

if TYPE_CHECKING:
    from mlflow import ActiveRun, MlflowClient

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


# The experiment kind MLflow's UI reads to open the model-training view (runs, metric charts,
# models) rather than the GenAI overview (traces).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created if needed (a local store keeps its files under
    .sur/), with the tag that opens it in MLflow's model-training view."""
    found = client.get_experiment_by_name(name)
    if found is None:
        local = client.tracking_uri.startswith("sqlite:")
        location = LOCAL_ARTIFACTS.resolve().as_uri() if local else None
        return client.create_experiment(
            name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    if found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made before the tag existed
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return found.experiment_id


# MLflow 3's UI chooses the view by its GenAI/Model-training switch (remembered per browser,
# GenAI at first), which the `workflowType` query parameter sets; older UIs read the tag above.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def experiment_page(tracking: str, experiment_id: str, run_id: str | None = None) -> str:
    """The UI address of an experiment's runs (or of one run), in the model-training view."""
    page = f"{tracking.rstrip('/')}/#/experiments/{experiment_id}/runs"
    return f"{page}/{run_id}?{MODEL_TRAINING_VIEW}" if run_id else f"{page}?{MODEL_TRAINING_VIEW}"


def tracking_configured(params: Params) -> bool:
    """Whether a tracking store was chosen: params, $MLFLOW_TRACKING_URI, or a retrain flow
    that started this stage (not the local fallback store)."""
    return bool(
        params.train.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or os.environ.get(PARENT_RUN_ENV, "").strip()
    )


def start_stage_run(params: Params, name: str) -> ActiveRun:
    """`mlflow.start_run` for stage `name` in the training experiment (tagged for the
    model-training view): nested under the active run if there is one, else under the flow's
    stage run when a flow started this stage."""
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    experiment = ensure_experiment(MlflowClient(uri), params.train.experiment)
    nested = mlflow.active_run() is not None
    return mlflow.start_run(
        experiment_id=experiment, run_name=name, nested=nested, tags=parent_run_tags()
    )


def log_stage_run(params: Params, name: str, metrics: dict[str, float]) -> str:
    """Log `metrics` as a finished run `name` of the training experiment, nested under the
    retrain flow's stage run when a flow started this stage; returns the run id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri(params))
    experiment = ensure_experiment(client, params.train.experiment)
    run = client.create_run(experiment, run_name=name, tags=parent_run_tags())
    now = int(time.time() * 1000)
    figures = [Metric(key, float(value), now, 0) for key, value in metrics.items()]
    client.log_batch(run.info.run_id, metrics=figures)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


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
