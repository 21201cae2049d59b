"""`sur evaluate` end to end: find @production, evaluate, write the report, log to MLflow.

The DVC `evaluate` stage runs it with `--no-production`: its report must be a function of the
stage's inputs, and which version is in production is not one. The pipeline compares with
production when it promotes (`suradapter.registry.challenge`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow

from suradapter.config import Params
from suradapter.evaluate.report import headline_metrics, write_report
from suradapter.evaluate.run import EvaluationResult, evaluate_adapter, load_adapter
from suradapter.model.adapter import SURAdapter
from suradapter.provenance import ADAPTER_DIR, git_commit
from suradapter.tracking import flatten_params, start_stage_run, tracking_uri


def production_baseline(params: Params, workdir: Path) -> tuple[str, SURAdapter] | None:
    """(version, adapter) behind @production, or None when nothing is in production."""
    from suradapter.registry import fetch_version, resolve

    version = resolve(params, "production")
    if version is None:
        return None
    fetched = fetch_version(params, version, workdir / "production")
    return version, load_adapter(fetched.artifacts / ADAPTER_DIR)


def evaluate_with_tracking(
    params: Params, adapter_dir: Path | None = None, use_production: bool = True
) -> EvaluationResult:
    """Evaluate inside an MLflow run; write evaluate.output_dir; log report, plots, metrics."""
    mlflow.set_tracking_uri(tracking_uri(params))  # the production baseline's registry
    with tempfile.TemporaryDirectory(prefix="sur-production-") as workdir:
        production = production_baseline(params, Path(workdir)) if use_production else None
        result = evaluate_adapter(params, adapter_dir, production)
    output = Path(params.evaluate.output_dir)
    write_report(output, result.report, result.grid)
    with start_stage_run(params, "evaluate"):
        mlflow.log_params(flatten_params({"evaluate": params.evaluate.model_dump(mode="json")}))
        mlflow.set_tags(
            {
                "git_commit": git_commit(),
                "adapter_sha256": result.report["adapter_sha256"],
                "gate_verdict": "passed" if result.passed else "failed",
            }
        )
        mlflow.log_metrics(headline_metrics(result.report))
        mlflow.log_metrics({"seconds": result.seconds, "load_seconds": result.load_seconds})
        mlflow.log_artifacts(str(output), "eval")
    return result
