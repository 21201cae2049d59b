"""`sur deploy`: the retrain and data-check deployments on a process work pool.

Both deployments load the flows from this project folder (local storage: the worker's flow
run starts in it) and run on a Prefect *process* work pool, so a worker on this machine
executes them as subprocesses, offline. Start one with `worker_command()` (what `sur deploy
--worker` runs). Re-running `sur deploy` updates the deployments in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flows.settings import (
    CHECK_CRON,
    CHECK_DEPLOYMENT,
    CHECK_FLOW,
    RETRAIN_CRON,
    RETRAIN_DEPLOYMENT,
    RETRAIN_FLOW,
    WORK_POOL,
)

ENTRYPOINTS = {
    RETRAIN_FLOW: "flows/retrain.py:retrain",
    CHECK_FLOW: "flows/data_check.py:data_check",
}


@dataclass(frozen=True)
class DeployedFlow:
    """One deployment as registered: `<flow>/<deployment>`, its id, schedule and pool."""

    name: str
    deployment_id: str
    cron: str
    work_pool: str


def ensure_process_pool(name: str) -> bool:
    """Create process work pool `name` unless it exists; True when it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(
                WorkPoolCreate(name=name, type="process", base_job_template=template)
            )
            return True


def deploy_flows(
    project: Path,
    retrain_cron: str = RETRAIN_CRON,
    check_cron: str = CHECK_CRON,
    timezone: str | None = None,
    pool: str = WORK_POOL,
) -> list[DeployedFlow]:
    """Register (or update) both deployments with the current Prefect API; returns them."""
    from prefect import Flow
    from prefect.schedules import Cron

    project = project.resolve()
    ensure_process_pool(pool)
    plans = {
        RETRAIN_FLOW: (
            RETRAIN_DEPLOYMENT,
            retrain_cron,
            "Retrain on a schedule (DVC skips unchanged stages).",
        ),
        CHECK_FLOW: (
            CHECK_DEPLOYMENT,
            check_cron,
            "Retrain when the SURD source's DVC hash "
            "differs from the one @production was trained on.",
        ),
    }
    deployed = []
    for flow_name, (name, cron, description) in plans.items():
        loaded = Flow.from_source(source=str(project), entrypoint=ENTRYPOINTS[flow_name])
        deployment = loaded.to_deployment(
            name=name,
            schedules=[Cron(cron, timezone=timezone)],
            parameters={"project_dir": str(project)},
            concurrency_limit=1,
            description=description,
            tags=["sur"],
            work_pool_name=pool,
        )
        deployment_id = deployment.apply(work_pool_name=pool)
        deployed.append(DeployedFlow(f"{flow_name}/{name}", str(deployment_id), cron, pool))
    return deployed


def worker_command(prefect_bin: str, pool: str = WORK_POOL) -> list[str]:
    """The command that runs a process worker for `pool` (flow runs become subprocesses)."""
    return [prefect_bin, "worker", "start", "--pool", pool, "--type", "process"]
