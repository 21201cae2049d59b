"""Register the pipeline's result (or reuse the version that already holds it) and promote it.

A version is reused when its SHA256SUMS lists exactly the files of the local adapter, export
and eval folders: a re-run that changed nothing registers nothing. Promotion follows
`registry.promotion`: `auto` moves @production to a version whose report passed; `manual`
leaves it at @candidate for a person (`sur promote`).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from suradapter.config import Params
from suradapter.provenance import (
    ADAPTER_DIR,
    ADAPTER_WEIGHTS,
    ARTIFACTS_DIR,
    CHECKSUMS_FILE,
    EVAL_DIR,
    EXPORT_DIR,
    file_checksums,
    parse_checksums,
    sha256_file,
)
from suradapter.registry import ProductionNotImproved, promote, register_version
from suradapter.registry.store import aliases_of, connect, download_version_file


@dataclass
class Registration:
    """The registered version holding this run's result, and what happened to it."""

    model_name: str
    version: str
    passed: bool
    reused: bool  # True: an existing version already held exactly these files
    run_id: str = ""  # the registration run ('' when reused)
    reasons: list[str] = field(default_factory=list)  # why the gates failed
    aliases: list[str] = field(default_factory=list)  # aliases on the version after promotion
    promotion: str = ""  # what the promotion step did, in words

    def as_dict(self) -> dict:
        return asdict(self)


def result_folders(params: Params) -> dict[str, Path]:
    """The adapter, export and eval folders the stages wrote (as `sur register` reads them)."""
    return {
        ADAPTER_DIR: Path(params.evaluate.adapter_dir),
        EXPORT_DIR: Path(params.export.output_dir),
        EVAL_DIR: Path(params.evaluate.output_dir),
    }


def local_checksums(folders: dict[str, Path]) -> dict[str, str]:
    """`{part/relative path: sha256}` of every file, as a version's SHA256SUMS lists them."""
    return {
        f"{part}/{name}": digest
        for part, folder in folders.items()
        for name, digest in file_checksums(folder).items()
    }


def versions_with_adapter(client: MlflowClient, name: str, adapter_sha256: str) -> list:
    """Versions of `name` tagged with `adapter_sha256`, newest first."""
    query = f"name = '{name}' and tags.adapter_sha256 = '{adapter_sha256}'"
    found = client.search_model_versions(query)
    return sorted(found, key=lambda version: int(version.version), reverse=True)


def find_registered_copy(params: Params, folders: dict[str, Path]) -> ModelVersion | None:
    """The newest version whose SHA256SUMS matches the local folders file for file, or None."""
    weights = folders[ADAPTER_DIR] / ADAPTER_WEIGHTS
    if not weights.is_file():
        return None
    client = connect(params)
    name = params.registry.model_name
    candidates = versions_with_adapter(client, name, sha256_file(weights))
    if not candidates:
        return None
    wanted = local_checksums(folders)
    for version in candidates:
        with tempfile.TemporaryDirectory(prefix="sur-reuse-") as scratch:
            try:
                sums = download_version_file(
                    name, str(version.version), f"{ARTIFACTS_DIR}/{CHECKSUMS_FILE}", Path(scratch)
                )
            except Exception:  # an unreadable version is simply not reused
                continue
            if parse_checksums(sums.read_text()) == wanted:
                return version
    return None


def register_or_reuse(params: Params) -> Registration:
    """Reuse the version that holds exactly this result, else register a new one.

    Raises RegistryError (missing inputs, upload or registry failure).
    """
    folders = result_folders(params)
    name = params.registry.model_name
    existing = find_registered_copy(params, folders)
    if existing is not None:
        tags = existing.tags or {}
        failures = tags.get("gate_failures", "")
        return Registration(
            name,
            str(existing.version),
            passed=tags.get("gate_verdict") == "passed",
            reused=True,
            reasons=[reason for reason in failures.split("; ") if reason],
        )
    result = register_version(params, folders[ADAPTER_DIR], folders[EXPORT_DIR], folders[EVAL_DIR])
    return Registration(
        name, result.version, result.passed, False, result.run_id, list(result.reasons)
    )


def promote_by_policy(params: Params, registration: Registration) -> Registration:
    """Apply `registry.promotion` to the version; returns it with its aliases and what happened.

    Raises RegistryError when an allowed promotion fails.
    """
    policy = params.registry.promotion
    if not registration.passed:
        registration.promotion = "not promoted: the gates failed (no @candidate)"
    elif policy != "auto":
        registration.promotion = (
            f"not promoted: registry.promotion is '{policy}'; it stays @candidate until "
            f"`sur promote {registration.version}`"
        )
    else:
        try:
            moved = promote(params, version=registration.version)
        except ProductionNotImproved as err:  # production stays: the job still succeeds
            registration.promotion = f"not promoted: {err}"
        else:
            registration.promotion = (
                f"promoted to @production (previous: {moved.previous or 'none'})"
                if moved.changed
                else "already @production"
            )
    registration.aliases = version_aliases(params, registration.version)
    return registration


def version_aliases(params: Params, version: str) -> list[str]:
    """The aliases that name `version`, sorted."""
    aliases = aliases_of(connect(params), params.registry.model_name)
    return sorted(alias for alias, number in aliases.items() if number == str(version))
