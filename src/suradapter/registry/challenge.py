"""Promotion can only improve production: a version's head-to-head with `@production`.

Why here and not in the DVC `evaluate` stage: that stage's report must be a function of the
stage's declared inputs (adapter, data, base model, params), so DVC can cache it and a
version's lineage says exactly what produced it. Which version is in production is registry
state, which no DVC stage declares, and it changes under the stage. So the stage compares the
adapter with the base model only (`sur evaluate --no-production`), and the comparison with
production happens where that state is read: in `promote`, just before `@production` moves.

Both versions are fetched (checked against the registry's record), then scored on this
project's held-out data with the evaluation's fixed seed by `evaluate_adapter`, the candidate
as the adapter and production as the baseline; its `margin_over_production` gate (threshold
`evaluate.gates.min_margin_over_production`) decides. The outcome goes on the candidate
version's `challenge.*` tags and, with the full report, into a `challenge` run of the
registry experiment.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Metric
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from suradapter.config import Params
from suradapter.provenance import ADAPTER_DIR, parse_checksums
from suradapter.registry.errors import RegistryError
from suradapter.registry.fetch import fetch_version
from suradapter.registry.manifest import MANIFEST_TAG
from suradapter.tracking import ensure_experiment

MARGIN_GATE = "margin_over_production"


class ProductionNotImproved(RegistryError):
    """The version does not beat the one in production by the required margin."""


@dataclass(frozen=True)
class Challenge:
    """The head-to-head of `candidate` with `production`, as the margin gate judged it."""

    candidate: str
    production: str
    margin: float | None  # candidate minus production (None: nothing to compare with)
    threshold: float
    passed: bool
    note: str  # how the margin was found
    run_id: str = ""  # the `challenge` run holding the report ('' when none ran)

    def describe(self) -> str:
        shown = "n/a" if self.margin is None else f"{self.margin:+.4f}"
        verdict = "beats" if self.passed else "does not beat"
        return (
            f"version {self.candidate} {verdict} production version {self.production}: margin "
            f"{shown}, needs >= {self.threshold:g} ({self.note})"
        )

    def tags(self) -> dict[str, str]:
        """The `challenge.*` tags recorded on the candidate version."""
        return {
            "challenge.production_version": self.production,
            "challenge.margin": "n/a" if self.margin is None else repr(self.margin),
            "challenge.threshold": repr(self.threshold),
            "challenge.verdict": "passed" if self.passed else "failed",
            "challenge.note": self.note[:500],
            "challenge.run_id": self.run_id,
        }


def adapter_files(version: ModelVersion) -> dict[str, str]:
    """`{path: sha256}` of the adapter's files as the registry records them."""
    listed = parse_checksums((version.tags or {}).get(MANIFEST_TAG) or "")
    return {path: digest for path, digest in listed.items() if path.startswith(f"{ADAPTER_DIR}/")}


def challenge_production(
    params: Params, client: MlflowClient, candidate: ModelVersion, production: ModelVersion
) -> Challenge:
    """Compare `candidate` with `production` and record the outcome on the candidate.

    Raises RegistryError when they cannot be compared (another base model, no held-out data)
    or the outcome cannot be recorded.
    """
    name = params.registry.model_name
    mine, theirs = str(candidate.version), str(production.version)
    threshold = params.evaluate.gates.min_margin_over_production
    same = adapter_files(candidate)
    if same and same == adapter_files(production):
        note = "the same adapter files: a margin of 0 by construction, nothing evaluated"
        result = Challenge(mine, theirs, 0.0, threshold, threshold <= 0.0, note)
    else:
        result = head_to_head(params, client, candidate, production, threshold)
    for key, value in result.tags().items():
        client.set_model_version_tag(name, mine, key, value)
    return result


def check_base_models(params: Params, *versions: ModelVersion) -> None:
    """Raise RegistryError unless every version adapts the base model this project runs."""
    name, wanted = params.registry.model_name, params.base_model.id
    for version in versions:
        base = (version.tags or {}).get("base_model", wanted)
        if base != wanted:
            raise RegistryError(
                f"version {version.version} of {name} adapts base model {base!r}, but this "
                f"project evaluates on {wanted!r} (base_model.id): the head-to-head with "
                "production needs both on the base it runs"
            )


def head_to_head(
    params: Params,
    client: MlflowClient,
    candidate: ModelVersion,
    production: ModelVersion,
    threshold: float,
) -> Challenge:
    """Evaluate `candidate` against `production` on this project's held-out data."""
    from suradapter.evaluate.run import evaluate_adapter, load_adapter

    name = params.registry.model_name
    mine, theirs = str(candidate.version), str(production.version)
    check_base_models(params, candidate, production)
    with tempfile.TemporaryDirectory(prefix="sur-challenge-") as scratch:
        fetched = fetch_version(params, mine, Path(scratch) / "candidate")
        try:
            baseline = fetch_version(params, theirs, Path(scratch) / "production")
        except RegistryError as err:
            note = f"production fails its own checks, so nothing to compare with: {err}"
            return Challenge(mine, theirs, None, threshold, True, note)
        try:
            pair = (theirs, load_adapter(baseline.artifacts / ADAPTER_DIR))
            result = evaluate_adapter(params, fetched.artifacts / ADAPTER_DIR, pair, grid=False)
        except Exception as err:
            raise RegistryError(
                f"cannot compare version {mine} of {name} with production version {theirs} "
                f"on this project's held-out data ({type(err).__name__}: {err}); the "
                "head-to-head runs where the pipeline's data stages ran (embed.manifest)"
            ) from err
        gate = next((g for g in result.gates if g.name == MARGIN_GATE), None)
        if gate is None:
            raise RegistryError(f"the head-to-head of version {mine} gave no {MARGIN_GATE} gate")
        try:
            run_id = log_challenge(params, client, result.report, mine, theirs, Path(scratch))
        except Exception as err:
            raise RegistryError(
                f"could not record the head-to-head of version {mine} with production "
                f"version {theirs} in the registry experiment: {err}"
            ) from err
    note = "evaluated head to head on this project's held-out data"
    return Challenge(mine, theirs, gate.value, threshold, gate.passed, note, run_id)


def log_challenge(
    params: Params,
    client: MlflowClient,
    report: dict,
    candidate: str,
    production: str,
    scratch: Path,
) -> str:
    """A `challenge` run in the registry experiment with the report and headline figures."""
    from suradapter.evaluate.report import headline_metrics, write_report

    experiment = ensure_experiment(client, params.registry.experiment)
    tags = {
        "model_name": params.registry.model_name,
        "candidate_version": candidate,
        "production_version": production,
        "gate_verdict": "passed" if report["passed"] else "failed",
    }
    run = client.create_run(experiment, run_name="challenge", tags=tags)
    run_id = run.info.run_id
    try:
        figures = headline_metrics(report)
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in figures.items() if math.isfinite(v)]
        client.log_batch(run_id, metrics=metrics)
        folder = write_report(scratch / "challenge-report", report, None).parent
        client.log_artifacts(run_id, str(folder), "challenge")
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id)
    return run_id
