"""The MLflow side of a retrain flow run: one parent run, one child run per stage attempt.

The flow's runs live in the training experiment (`train.experiment`), so MLflow's UI nests
them: `retrain <flow run>` > `<stage>` > the stage's own run (`train-adapter`, `evaluate`),
which the stage subprocess attaches through $SUR_PARENT_RUN_ID. Runs are written with an
`MlflowClient` and never made active, so stage code in this process (`register_version`)
can start its own runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from flows.dvc_stage import StageResult
from suradapter.config import Params
from suradapter.evaluate.report import headline_metrics, read_report
from suradapter.provenance import (
    EVAL_REPORT_FILE,
    PIPELINE_STAGES,
    data_lineage_tags,
    git_commit,
)
from suradapter.registry.store import connect
from suradapter.tracking import PARENT_RUN_TAG, ensure_experiment, flatten_params

FINISHED, FAILED = "FINISHED", "FAILED"


@dataclass
class FlowTracking:
    """The parent run of one flow run and the client that writes it."""

    client: MlflowClient
    experiment_id: str
    parent_run_id: str

    @classmethod
    def start(cls, params: Params, flow_run_name: str, tags: dict[str, str]) -> FlowTracking:
        """Create the parent run with the params and the git commit; returns the tracker."""
        client = connect(params)
        experiment = ensure_experiment(client, params.train.experiment)
        run_tags = {"git_commit": git_commit(), "profile": params.profile, **tags}
        run = client.create_run(experiment, run_name=f"retrain {flow_run_name}", tags=run_tags)
        flat = flatten_params(params.model_dump(mode="json"))
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in flat.items()])
        return cls(client, experiment, run.info.run_id)

    @property
    def tracking_uri(self) -> str:
        return self.client.tracking_uri

    def start_stage(self, stage: str, attempt: int) -> str:
        """A child run for `attempt` of `stage`; returns its id (the stage's $SUR_PARENT_RUN_ID)."""
        name = stage if attempt == 1 else f"{stage} (attempt {attempt})"
        tags = {PARENT_RUN_TAG: self.parent_run_id, "stage": stage, "attempt": str(attempt)}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    def end_stage(self, run_id: str, result: StageResult | None, error: str = "") -> None:
        """Record the stage's DVC status and duration (or its error); close the child run."""
        now = int(time.time() * 1000)
        tags = [RunTag("dvc_status", result.status if result else "failed")]
        metrics = [Metric("duration_s", result.seconds, now, 0)] if result else []
        if error:
            tags.append(RunTag("error", error[-4000:]))
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        log = Path(result.log) if result and result.log else None
        if log and log.is_file() and result.did_work:
            self.client.log_artifact(run_id, str(log), "logs")
        self.client.set_terminated(run_id, FINISHED if result else FAILED)

    def record_step(self, name: str, seconds: float, tags: dict[str, str]) -> str:
        """A finished child run for a non-DVC step (register, promote); returns its id."""
        run_id = self.start_stage(name, 1)
        metric = Metric("duration_s", seconds, int(time.time() * 1000), 0)
        self.client.log_batch(
            run_id, metrics=[metric], tags=[RunTag(k, v) for k, v in tags.items()]
        )
        self.client.set_terminated(run_id, FINISHED)
        return run_id

    def finish(self, params: Params, ok: bool, summary: dict[str, str]) -> None:
        """Tag the parent with the data lineage and `summary`, give it the evaluation's gate
        metrics and images (what a user opening the run looks for first); close it FINISHED
        or FAILED."""
        tags = data_lineage_tags(PIPELINE_STAGES, params.prepare.source) | summary
        metrics = []
        evaluation = Path(params.evaluate.output_dir)
        if ok and (evaluation / EVAL_REPORT_FILE).is_file():  # a failed run may predate it
            now = int(time.time() * 1000)
            figures = headline_metrics(read_report(evaluation))
            metrics = [Metric(name, value, now, 0) for name, value in figures.items()]
            for image in sorted(evaluation.glob("*.png")):
                self.client.log_artifact(self.parent_run_id, str(image), "eval")
        self.client.log_batch(
            self.parent_run_id,
            metrics=metrics,
            tags=[RunTag(k, str(v)[:4000]) for k, v in tags.items()],
        )
        self.client.set_terminated(self.parent_run_id, FINISHED if ok else FAILED)
