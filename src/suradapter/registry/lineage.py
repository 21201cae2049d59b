"""Lineage tags of a registered version: code, data, base model, teacher, adapter, verdict."""

from __future__ import annotations

from pathlib import Path

import yaml

from suradapter.config import Params
from suradapter.provenance import DVC_LOCK, dvc_output_hashes, git_commit
from suradapter.registry.report import ReportVerdict

DATA_STAGES = ("prepare", "embed")
MAX_TAG_CHARS = 4000


def dvc_dependency_hash(stage: str, path: str, lock: Path = DVC_LOCK) -> str:
    """The md5 dvc.lock records for dependency `path` of `stage` ('' when unknown)."""
    if not lock.is_file():
        return ""
    recorded = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    wanted = Path(path).as_posix()
    for dep in recorded.get(stage, {}).get("deps", []):
        if Path(dep.get("path", "")).as_posix() == wanted:
            return str(dep.get("md5", ""))
    return ""


def lineage_tags(params: Params, adapter_sha256: str, verdict: ReportVerdict) -> dict[str, str]:
    """Tags set on the registration run and on the model version.

    DVC output hashes use the training run's keys (`dvc.<stage>/<path>`), so a version and
    the run that trained its adapter can be matched on them.
    """
    tags = {
        "git_commit": git_commit(),
        "base_model": params.base_model.id,
        "teacher": params.embed.model,
        "adapter_sha256": adapter_sha256,
        "gate_verdict": "passed" if verdict.passed else "failed",
        "surd_source_hash": dvc_dependency_hash("prepare", params.prepare.source),
    }
    if params.base_model.revision:
        tags["base_model_revision"] = params.base_model.revision
    tags |= {f"dvc.{key}": value for key, value in dvc_output_hashes(DATA_STAGES).items()}
    if verdict.reasons:
        tags["gate_failures"] = "; ".join(verdict.reasons)[:MAX_TAG_CHARS]
    return tags
