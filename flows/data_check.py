"""The SURD data-change trigger: retrain only when the SURD source changed.

The current DVC hash of `prepare.source` (as `dvc.lock` records it: `<md5>.dir`) is compared
with the `surd_source_hash` tag of the version behind @production. The source counts as
changed when it differs from that tag and also from the tag of the newest registered version:
a version already trained on this data (one waiting at @candidate under the manual policy, or
one whose gates failed) is not retrained over and over. Without any version it counts as new.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from flows.dvc_stage import project_stage
from flows.project import project_params
from flows.retrain import RetrainResult, retrain
from flows.settings import CHECK_FLOW, RETRY_BACKOFF_S
from suradapter.config import Params
from suradapter.data.prepare import resolve_source
from suradapter.registry.store import PRODUCTION, aliases_of, connect
from suradapter.stack import apply_client_env

SOURCE_TAG = "surd_source_hash"


@dataclass
class DataCheck:
    """The check's inputs and verdict (and the retrain it started, if any)."""

    source: str
    current_hash: str  # '' when the source does not exist yet
    references: dict[str, str]  # e.g. {'version 3 (@production)': '<md5>.dir'}
    changed: bool
    retrain: RetrainResult | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def source_hash(project: Path, params: Params) -> str:
    """DVC's hash of `prepare.source` in the workspace, as dvc.lock records it ('' if missing).

    Raises PrepareError when the profile names no source.
    """
    from dvc.repo import Repo

    source = resolve_source(params.prepare)
    if not (project / source).exists():
        return ""
    with Repo(str(project)) as repo:
        for dep in project_stage(repo, "prepare").deps:
            if Path(dep.def_path) == source:
                return str(dep.get_hash().value or "")
    raise ValueError(f"dvc.yaml stage 'prepare' has no dependency on {source} (prepare.source)")


def reference_hashes(params: Params) -> dict[str, str]:
    """`{which version: its surd_source_hash tag}` for @production and the newest version."""
    client = connect(params)
    name = params.registry.model_name
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        return {}
    by_number = {str(version.version): version for version in versions}
    production = aliases_of(client, name).get(PRODUCTION)
    newest = max(by_number, key=int)
    references = {}
    if production in by_number:
        references[f"version {production} (@{PRODUCTION})"] = by_number[production]
    if newest != production:
        references[f"version {newest} (newest)"] = by_number[newest]
    return {label: (v.tags or {}).get(SOURCE_TAG, "") for label, v in references.items()}


@task(cache_policy=NO_CACHE, persist_result=False)
def compare_source(project: Path) -> DataCheck:
    """Hash the SURD source and compare it with the reference version's tag."""
    params = project_params(project)
    apply_client_env(params.stack.state_dir)
    current = source_hash(project, params)
    references = reference_hashes(params)
    changed = not current or current not in references.values()
    return DataCheck(params.prepare.source, current, references, changed)


@flow(name=CHECK_FLOW, persist_result=False)
def data_check(
    project_dir: str = ".", retry_backoff_s: float = RETRY_BACKOFF_S, echo: bool = False
) -> DataCheck:
    """Start the retrain flow (as a subflow) when the SURD source changed; returns the check."""
    logger = get_run_logger()
    project = Path(project_dir).resolve()
    with contextlib.chdir(project):
        check = compare_source(project)
    current = check.current_hash or "(missing)"
    against = ", ".join(f"{label}: {value or '-'}" for label, value in check.references.items())
    against = against or "no registered version"
    if not check.changed:
        logger.info(
            "SURD source %s unchanged (%s; recorded: %s); no retrain",
            check.source,
            current,
            against,
        )
        return check
    logger.info(
        "SURD source %s changed (%s; recorded: %s); retraining", check.source, current, against
    )
    check.retrain = retrain(project_dir=str(project), retry_backoff_s=retry_backoff_s, echo=echo)
    return check
