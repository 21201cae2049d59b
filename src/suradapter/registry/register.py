"""`sur register`: log the adapter, its ONNX export and eval report as a new registered version.

Order: check the inputs, judge the report (re-deriving its gates; a report that contradicts
itself is refused), stage the files with SHA256SUMS, upload them as a pyfunc model, create the
version with its lineage tags and the manifest (`sha256sums`, the files' trust anchor), and
only then set `@candidate` (when the report passes). Nothing is registered if the upload
fails; if anything fails after the version exists, the version is deleted again, so a
half-made version never carries an alias.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import mlflow
from mlflow.models.model import ModelInfo
from mlflow.tracking import MlflowClient

from suradapter.config import Params
from suradapter.provenance import (
    ADAPTER_DIR,
    ADAPTER_WEIGHTS,
    EVAL_DIR,
    EVAL_REPORT_FILE,
    EXPORT_DIR,
    sha256_file,
)
from suradapter.registry.errors import RegistryError
from suradapter.registry.layout import check_inputs, stage_payload
from suradapter.registry.lineage import lineage_tags
from suradapter.registry.manifest import MANIFEST_TAG, manifest_tag
from suradapter.registry.report import judge_report, load_report
from suradapter.registry.store import CANDIDATE, connect
from suradapter.tracking import ensure_experiment

PYFUNC_ENTRY = Path(__file__).with_name("pyfunc_entry.py")
RUNTIME_PACKAGES = ("suradapter", "mlflow", "onnx", "onnxruntime-gpu", "transformers", "numpy")
ALREADY_EXISTS = ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS")


@dataclass
class RegisteredVersion:
    """A new version of the registered model, its registration run, verdict and aliases."""

    version: str
    run_id: str
    passed: bool
    aliases: list[str]
    model_name: str = ""
    reasons: list[str] = field(default_factory=list)  # why the report did not pass


def pip_requirements() -> list[str]:
    """Exact pins of what loading the pyfunc needs (no slow pip inference at log time)."""
    pins = []
    for package in RUNTIME_PACKAGES:
        try:
            pins.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pins.append(package)
    return pins


def check_export_matches(export_dir: Path, adapter_sha256: str) -> None:
    """Raise RegistryError when export.json names a different adapter than the one given."""
    from suradapter.export.runtime import read_report

    exported_from = read_report(export_dir).get("adapter_sha256", "")
    if exported_from and exported_from != adapter_sha256:
        raise RegistryError(
            f"export {export_dir} was made from adapter sha256 {exported_from[:12]}..., not "
            f"from this adapter ({adapter_sha256[:12]}...): run `sur export` again"
        )


def exception_messages(err: BaseException) -> list[str]:
    """Messages of `err` and every exception chained to it (causes and contexts)."""
    pending, seen, messages = [err], set(), []
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        messages.append(f"{type(current).__name__}: {current}")
        pending += [e for e in (current.__cause__, current.__context__) if e is not None]
    return messages


def upload_failure(err: BaseException, tracking: str) -> RegistryError:
    """A RegistryError for a failed artifact upload, naming the request that failed."""
    messages = exception_messages(err)
    upload = [m for m in messages if "artifact" in m.lower() or "s3" in m.lower()]
    detail = (upload or messages)[0]
    return RegistryError(
        f"artifact upload failed, nothing was registered: {detail[:600]}. The MLflow server "
        f"at {tracking} could not store the version's files; when its artifact store is an "
        "S3 bucket, a 500 from its artifact proxy means that S3 endpoint is down or "
        "unreachable. Fix the store, then run `sur register` again."
    )


def withdraw_versions(client: MlflowClient, name: str, run_id: str) -> list[str]:
    """Delete every version of `name` created by run `run_id`; return the ones left behind."""
    left = []
    try:
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except Exception:
        return ["(could not list them)"]
    for version in versions:
        try:
            client.delete_model_version(name, version.version)
        except Exception:
            left.append(version.version)
    return left


def register_version(
    params: Params, adapter_dir: Path, export_dir: Path, eval_dir: Path
) -> RegisteredVersion:
    """Register a new version of `params.registry.model_name`; `@candidate` if its report passes.

    Returns the version, run, verdict and aliases. Raises RegistryError (inputs, a report that
    contradicts itself, upload, registry).
    """
    folders = {ADAPTER_DIR: adapter_dir, EXPORT_DIR: export_dir, EVAL_DIR: eval_dir}
    folders = {part: Path(folder) for part, folder in folders.items()}
    check_inputs(folders)
    adapter_sha256 = sha256_file(folders[ADAPTER_DIR] / ADAPTER_WEIGHTS)
    check_export_matches(folders[EXPORT_DIR], adapter_sha256)
    report_path = folders[EVAL_DIR] / EVAL_REPORT_FILE
    verdict = judge_report(load_report(report_path), adapter_sha256, params.evaluate.gates)
    if verdict.contradictions:
        raise RegistryError(
            f"{report_path} contradicts its own values, so it was not written as it is by "
            f"`sur evaluate`: {'; '.join(verdict.contradictions)}. Nothing was registered; "
            "run `sur evaluate` again"
        )
    tags = lineage_tags(params, adapter_sha256, verdict)
    name = params.registry.model_name
    client = connect(params)
    try:
        experiment = ensure_experiment(client, params.registry.experiment)
    except mlflow.exceptions.MlflowException as err:
        raise RegistryError(
            f"cannot reach the MLflow tracking server at {client.tracking_uri}: {err.message}"
        ) from err
    with tempfile.TemporaryDirectory(prefix="sur-register-") as staging:
        artifacts = stage_payload(Path(staging), folders)
        version_tags = tags | {MANIFEST_TAG: manifest_tag(artifacts["checksums"])}
        with mlflow.start_run(experiment_id=experiment, run_name="register", tags=tags) as run:
            run_id = run.info.run_id
            info = _log_pyfunc(params, artifacts, client.tracking_uri)
            try:
                version = _create_version(client, name, info, run_id, version_tags)
                aliases = []
                if verdict.passed:
                    client.set_registered_model_alias(name, CANDIDATE, version)
                    aliases.append(CANDIDATE)
            except BaseException as err:
                left = withdraw_versions(client, name, run_id)
                if not isinstance(err, Exception):
                    raise
                note = f"; could not delete version(s) {', '.join(left)}" if left else ""
                raise RegistryError(
                    f"registering {name} failed after the upload ({err}); the half-made "
                    f"version was deleted{note}"
                ) from err
    return RegisteredVersion(version, run_id, verdict.passed, aliases, name, verdict.reasons)


def _log_pyfunc(params: Params, artifacts: dict[str, Path], tracking: str) -> ModelInfo:
    try:
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_ENTRY),
            artifacts={key: str(path) for key, path in artifacts.items()},
            pip_requirements=pip_requirements(),
            model_config={
                "providers": list(params.export.providers),
                "trt_cache_dir": params.export.trt_cache_dir,
                "verify_checksums": True,
                "registered_model": params.registry.model_name,
            },
        )
    except Exception as err:
        raise upload_failure(err, tracking) from err


def _create_version(
    client: MlflowClient, name: str, info: ModelInfo, run_id: str, tags: dict[str, str]
) -> str:
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException as err:
        if err.error_code not in ALREADY_EXISTS:
            raise
    verdict = tags["gate_verdict"]
    created = client.create_model_version(
        name,
        source=info.model_uri,
        run_id=run_id,
        tags=tags,
        description=f"adapter {tags['adapter_sha256'][:12]}, gates {verdict}",
        model_id=info.model_id,
    )
    return str(created.version)
