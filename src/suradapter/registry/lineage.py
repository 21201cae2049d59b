"""Lineage tags of a registered version: code, data, base model, teacher, adapter, verdict."""

from __future__ import annotations

from suradapter.config import Params
from suradapter.provenance import TRAINING_DATA_STAGES, data_lineage_tags, git_commit
from suradapter.registry.report import ReportVerdict

MAX_TAG_CHARS = 4000


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
    }
    if params.base_model.revision:
        tags["base_model_revision"] = params.base_model.revision
    tags |= data_lineage_tags(TRAINING_DATA_STAGES, params.prepare.source)
    if verdict.reasons:
        tags["gate_failures"] = "; ".join(verdict.reasons)[:MAX_TAG_CHARS]
    return tags
