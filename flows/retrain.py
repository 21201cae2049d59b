"""The retrain flow: every DVC stage in order, then register and promote by policy.

    generate_shapes (shapes world only) > prepare > embed > bootstrap_base > encode > train
        > evaluate > export > register > promote

Each stage is a task that runs `dvc repro --single-item <stage>` in the project, so DVC
decides what is out of date; the task records whether DVC ran, skipped, restored or only
verified (frozen) it. Failed attempts are retried with exponential backoff (flows.settings).
One flow run is one MLflow parent run with a child run per stage attempt (flows.mlflow_runs).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.runtime import flow_run, task_run
from prefect.tasks import exponential_backoff

from flows.dvc_stage import NOT_APPLICABLE, StageResult, run_dvc_stage, stage_env
from flows.mlflow_runs import FlowTracking
from flows.project import planned_stages, project_params, retrain_lock, shared_retrain_slot
from flows.registration import Registration, promote_by_policy, register_or_reuse
from flows.settings import (
    LOG_DIR,
    REGISTRY_RETRIES,
    RETRAIN_FLOW,
    RETRY_BACKOFF_S,
    RETRY_JITTER,
    STAGE_RETRIES,
)
from suradapter.config import Params
from suradapter.stack import apply_client_env
from suradapter.tracking import PARENT_RUN_ENV


@dataclass
class RetrainResult:
    """What one retrain flow run did: per-stage DVC status, the version and its aliases."""

    flow_run_id: str
    flow_run_name: str
    tracking_uri: str
    experiment_id: str
    mlflow_run_id: str
    stages: list[StageResult] = field(default_factory=list)
    registration: Registration | None = None
    seconds: float = 0.0

    @property
    def stages_run(self) -> list[str]:
        return [result.stage for result in self.stages if result.did_work]

    def as_dict(self) -> dict:
        return asdict(self)


def retrying(retries: int) -> dict[str, Any]:
    """Task options of every step: retries with jittered exponential backoff, no caching
    (DVC, not Prefect, decides what is up to date)."""
    return {
        "retries": retries,
        "retry_delay_seconds": exponential_backoff(RETRY_BACKOFF_S),
        "retry_jitter_factor": RETRY_JITTER,
        "cache_policy": NO_CACHE,
        "persist_result": False,
    }


@task(task_run_name="dvc:{stage}", **retrying(STAGE_RETRIES))
def dvc_stage(stage: str, project: Path, tracking: FlowTracking, echo: bool) -> StageResult:
    """Run one DVC stage inside a child MLflow run; raises StageFailed (retried) on failure."""
    logger = get_run_logger()
    attempt = task_run.run_count or 1
    child = tracking.start_stage(stage, attempt)
    env = stage_env({PARENT_RUN_ENV: child, "MLFLOW_TRACKING_URI": tracking.tracking_uri})
    log_path = project / LOG_DIR / flow_run.name / f"{stage}-{attempt}.log"
    try:
        result = run_dvc_stage(project, stage, env, log_path, echo=echo)
    except Exception as err:
        with contextlib.suppress(Exception):  # keep the stage's error, not a tracking one
            tracking.end_stage(child, None, str(err))
        raise
    result.attempts = attempt
    tracking.end_stage(child, result)
    logger.info(
        "%s: %s by DVC in %.1f s (attempt %d)", stage, result.status, result.seconds, attempt
    )
    return result


@task(**retrying(REGISTRY_RETRIES))
def register(params: Params, tracking: FlowTracking) -> Registration:
    """Register the adapter, export and eval report (or reuse the identical version)."""
    start = time.monotonic()
    registration = register_or_reuse(params)
    if registration.run_id:  # the registration run lives in the registry's experiment
        tracking.client.set_tag(registration.run_id, "retrain_run_id", tracking.parent_run_id)
    tags = {
        "model_version": registration.version,
        "reused": str(registration.reused).lower(),
        "gate_verdict": "passed" if registration.passed else "failed",
    }
    tracking.record_step("register", time.monotonic() - start, tags)
    verb = "reused" if registration.reused else "registered"
    verdict = "passed" if registration.passed else "FAILED"
    get_run_logger().info(
        "%s %s version %s (gates %s)", verb, registration.model_name, registration.version, verdict
    )
    return registration


@task(**retrying(REGISTRY_RETRIES))
def promote(params: Params, registration: Registration, tracking: FlowTracking) -> Registration:
    """Promote by `registry.promotion` (auto: a passing version goes to @production)."""
    start = time.monotonic()
    registration = promote_by_policy(params, registration)
    tags = {"policy": params.registry.promotion, "outcome": registration.promotion}
    tags["aliases"] = ",".join(registration.aliases)
    tracking.record_step("promote", time.monotonic() - start, tags)
    get_run_logger().info("version %s: %s", registration.version, registration.promotion)
    return registration


@flow(name=RETRAIN_FLOW, persist_result=False)
def retrain(
    project_dir: str = ".", retry_backoff_s: float = RETRY_BACKOFF_S, echo: bool = False
) -> RetrainResult:
    """Run the pipeline in `project_dir` through DVC, register the result, promote by policy.

    `echo` streams each stage's output to stdout. Returns a RetrainResult; raises when a stage
    still fails after its retries, or when the project or the registry cannot be used.
    """
    logger = get_run_logger()
    project = Path(project_dir).resolve()
    start = time.monotonic()
    backoff = exponential_backoff(retry_backoff_s)
    with (
        contextlib.chdir(project),
        retrain_lock(project, logger.info),
        shared_retrain_slot(logger.info),
    ):
        params = project_params(project)
        apply_client_env(params.stack.state_dir)  # a running `sur stack` is where tracking goes
        stages = planned_stages(project, params)
        tags = {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": flow_run.name}
        tracking = FlowTracking.start(params, flow_run.name, tags)
        result = RetrainResult(
            str(flow_run.id),
            flow_run.name,
            tracking.tracking_uri,
            tracking.experiment_id,
            tracking.parent_run_id,
        )
        try:
            for stage, applies in stages:
                if not applies:
                    logger.info(
                        "%s: not applicable (the SURD source is not the shapes world)", stage
                    )
                    result.stages.append(StageResult(stage, NOT_APPLICABLE))
                    continue
                runner = dvc_stage.with_options(retry_delay_seconds=backoff)
                result.stages.append(runner(stage, project, tracking, echo))
            registration = register.with_options(retry_delay_seconds=backoff)(params, tracking)
            result.registration = promote.with_options(retry_delay_seconds=backoff)(
                params, registration, tracking
            )
        except BaseException:
            with contextlib.suppress(Exception):  # keep the flow's error, not a tracking one
                summary = {"stages_run": ",".join(result.stages_run)}
                tracking.finish(params, ok=False, summary=summary)
            raise
        result.seconds = time.monotonic() - start
        tracking.finish(params, ok=True, summary=summary_tags(result))
    return result


def summary_tags(result: RetrainResult) -> dict[str, str]:
    """Tags of the parent run that say what the flow run did."""
    registration = result.registration
    assert registration is not None
    return {
        "stages_run": ",".join(result.stages_run) or "none",
        "model_version": registration.version,
        "version_reused": str(registration.reused).lower(),
        "gate_verdict": "passed" if registration.passed else "failed",
        "aliases": ",".join(registration.aliases) or "none",
        "promotion": registration.promotion,
    }
