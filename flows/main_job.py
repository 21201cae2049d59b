"""The main job (`sur run`): the local stack, the retrain flow against it, then where to look.

1. `sur stack up` (idempotent): Prefect server, MLflow server and S3 on loopback.
2. The retrain flow (`flows.retrain`): every DVC stage (DVC skips unchanged ones), register
   (an identical version is reused), promote by `registry.promotion`.
3. A summary: the MLflow and Prefect UI links, the version, its gate verdict and aliases, also
   written to `<out_dir>/summary.json`.

A version whose gates fail is still registered (without @candidate) and the job still succeeds:
the pipeline ran; the verdict is reported, not raised.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from suradapter.checks import profile_mistakes
from suradapter.config import Params
from suradapter.tracking import experiment_page

if TYPE_CHECKING:
    from flows.retrain import RetrainResult

# Offline settings for an in-process (ephemeral) Prefect API, used by `sur run --no-stack`.
EPHEMERAL_PREFECT_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def run_main_job(params: Params, out_dir: Path, console: Console, use_stack: bool = True) -> str:
    """Run the retrain flow in the current project; write `out_dir`/summary.json.

    Returns a one-line summary. Raises RuntimeError when the stack cannot start or a stage
    still fails after its retries (the message says which and why).
    """
    check_dvc_profile(params)
    mistakes = profile_mistakes(params)
    if mistakes:
        listed = "\n  - ".join(mistakes)
        raise RuntimeError(f"profile '{params.profile}' would fail:\n  - {listed}")
    if use_stack:
        ensure_stack(params, console)
    else:
        for key, value in EPHEMERAL_PREFECT_ENV.items():
            os.environ.setdefault(key, value)
    result = run_retrain_flow(Path.cwd())
    summary = describe_result(result)
    print_summary(summary, console)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return f"main job done on profile '{params.profile}': {out_dir / 'summary.json'}"


def ensure_stack(params: Params, console: Console) -> None:
    """Start the local stack if needed and point this process's clients at it.

    Explicit MLFLOW_* / AWS_* / PREFECT_API_URL settings win. Raises RuntimeError (StackError).
    """
    from suradapter.stack import StackError, up
    from suradapter.stack.client import client_env_groups

    try:
        with console.status("local stack (Prefect, MLflow, S3)") as progress:
            statuses = up(params.stack, on_progress=progress.update)
    except StackError as err:
        hint = "check `sur stack status`; `sur run --no-stack` runs without the stack"
        raise RuntimeError(f"{err}\n({hint})") from None
    for item in statuses:
        console.print(f"[green]✓[/] {item.name}: {item.url} ({item.note})", highlight=False)
    for group in client_env_groups(params.stack.state_dir):
        if not any(key in os.environ for key in group):
            os.environ.update(group)


def run_retrain_flow(project: Path) -> RetrainResult:
    """The retrain flow on `project`, against $PREFECT_API_URL when set. Raises RuntimeError."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.retrain import retrain

    updates = (
        {PREFECT_API_URL: os.environ["PREFECT_API_URL"]} if "PREFECT_API_URL" in os.environ else {}
    )
    try:
        with temporary_settings(updates=updates):
            return retrain(project_dir=str(project), echo=True)
    except Exception as err:
        raise RuntimeError(f"the retrain flow failed: {err}") from err


def ui_links(result: RetrainResult) -> dict[str, str]:
    """MLflow (parent run, registered model) and Prefect (flow run) UI addresses."""
    links = {}
    tracking = result.tracking_uri
    if tracking.startswith("http"):
        base = tracking.rstrip("/")
        links["mlflow_experiment"] = experiment_page(base, result.experiment_id)
        links["mlflow_run"] = experiment_page(base, result.experiment_id, result.mlflow_run_id)
        if result.registration:
            name = result.registration.model_name
            links["mlflow_model"] = f"{base}/#/models/{name}/versions/{result.registration.version}"
    else:
        links["mlflow_run"] = (
            f"`mlflow ui --backend-store-uri {tracking}`, run {result.mlflow_run_id}"
        )
    api = os.environ.get("PREFECT_API_URL", "")
    if api:
        links["prefect_flow_run"] = (
            f"{api.removesuffix('/').removesuffix('/api')}/runs/flow-run/{result.flow_run_id}"
        )
    return links


def describe_result(result: RetrainResult) -> dict:
    """The JSON summary of a retrain flow run (what summary.json holds)."""
    registration = result.registration
    return {
        "flow_run": {"id": result.flow_run_id, "name": result.flow_run_name},
        "seconds": round(result.seconds, 1),
        "stages": [stage.as_dict() for stage in result.stages],
        "registration": registration.as_dict() if registration else None,
        "links": ui_links(result),
    }


def print_summary(summary: dict, console: Console) -> None:
    """Print the stages, the version, its verdict, aliases and the UI links (never truncated)."""
    stages = Table("stage", "DVC", "seconds", "attempts", title="retrain flow")
    for stage in summary["stages"]:
        colour = "green" if stage["status"] == "ran" else "dim"
        stages.add_row(
            stage["stage"],
            f"[{colour}]{stage['status']}[/]",
            f"{stage['seconds']:.1f}",
            str(stage["attempts"]),
        )
    console.print(stages)
    registration = summary["registration"]
    how = "reused: these exact files were registered before" if registration["reused"] else "new"
    verdict = "[bold green]passed[/]"
    if not registration["passed"]:
        verdict = "[bold red]FAILED[/] (the pipeline ran; this version may not serve)"
    rows = [
        ("model", f"{registration['model_name']} version {registration['version']} ({how})"),
        ("gates", verdict),
        *[("", f"- {reason}") for reason in registration["reasons"]],
        ("aliases", ", ".join(f"@{alias}" for alias in registration["aliases"]) or "none"),
        ("promotion", registration["promotion"]),
    ]
    labels = {
        "mlflow_experiment": "MLflow runs",
        "mlflow_run": "MLflow run",
        "mlflow_model": "MLflow model",
        "prefect_flow_run": "Prefect",
    }
    rows += [(labels[key], link) for key, link in summary["links"].items()]
    lines = [f"{label + ':' if label else '':<14}{text}" for label, text in rows]
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)


def check_dvc_profile(params: Params, params_file: Path = Path("params.yaml")) -> None:
    """DVC resolves `configs/${profile}.yaml` from params.yaml; refuse a different profile."""
    import yaml

    declared = None
    if params_file.is_file():
        declared = yaml.safe_load(params_file.read_text()).get("profile")
    if declared != params.profile:
        raise RuntimeError(
            f"profile '{params.profile}' was asked for, but {params_file} declares "
            f"'profile: {declared}', which is what DVC tracks; set `profile: {params.profile}` "
            f"in {params_file} to run the main job on it"
        )
