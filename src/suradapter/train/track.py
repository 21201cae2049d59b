"""`sur train` with MLflow: params, per-step losses, loss curves, an image grid, lineage tags.

Only the main process talks to MLflow. The tracking URI comes from params, else from
`MLFLOW_TRACKING_URI`, else a local SQLite store (`.sur/mlflow.db`) until the stack's
tracking server is up.
"""

from __future__ import annotations

import os
from dataclasses import fields

import mlflow
from matplotlib.figure import Figure

from suradapter.comparison import comparison_grid
from suradapter.config import Params
from suradapter.model.adapter import SURAdapter
from suradapter.model.losses import LossTerms
from suradapter.provenance import TRAINING_DATA_STAGES, data_lineage_tags, git_commit
from suradapter.tracking import flatten_params, start_stage_run
from suradapter.train.adapter import TrainResult, train_adapter

LOSS_TERMS = tuple(field.name for field in fields(LossTerms))  # what each log record holds


def loss_figure(log: list[dict]) -> Figure:
    """A figure with one curve per loss term against the step (no GUI backend needed)."""
    figure = Figure(figsize=(4 * len(LOSS_TERMS), 3))
    axes = figure.subplots(1, len(LOSS_TERMS))
    steps = [record["step"] for record in log]
    for axis, term in zip(axes, LOSS_TERMS, strict=True):
        axis.plot(steps, [record[term] for record in log])
        axis.set_title(term)
        axis.set_xlabel("step")
    figure.tight_layout()
    return figure


def train_with_tracking(params: Params, grid_prompts: list[str]) -> TrainResult:
    """Train the adapter inside an MLflow run (main process) and log what people look at."""
    # RANK is set by every distributed launcher; PartialState() here would initialise the
    # distributed state before the Accelerator (and without its CPU flag).
    if os.environ.get("RANK", "0") != "0":
        return train_adapter(params)
    with start_stage_run(params, "train-adapter"):
        mlflow.log_params(flatten_params(params.model_dump(mode="json")))
        tags = {"git_commit": git_commit(), "base_model": params.base_model.id}
        tags |= data_lineage_tags(TRAINING_DATA_STAGES, params.prepare.source)
        tags["teacher"] = params.embed.model
        mlflow.set_tags(tags)

        def log_step(record: dict) -> None:
            metrics = {f"loss_{term}": record[term] for term in LOSS_TERMS} | {"lr": record["lr"]}
            mlflow.log_metrics(metrics, step=record["step"])

        result = train_adapter(params, on_log=log_step)
        if result.log:
            mlflow.log_figure(loss_figure(result.log), "plots/loss_curves.png")
        adapter = SURAdapter.from_pretrained(result.output_dir)
        mlflow.log_image(
            comparison_grid(params, adapter, grid_prompts), "plots/base_vs_adapter.png"
        )
        mlflow.log_artifacts(str(result.output_dir), "adapter")
        mlflow.log_metric("train_seconds", result.seconds)
    return result
