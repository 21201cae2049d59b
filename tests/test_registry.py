"""The model registry on a real MLflow server whose artifacts live on a real S3 server.

Register (passing, failing and self-contradicting reports), promote, roll back, refusals,
the margin a promotion over production needs, an S3 outage during registration, tampered
files (and files rewritten together with SHA256SUMS) on fetch and in the pyfunc, and the
pyfunc flavour against the ONNX text path.
"""

from __future__ import annotations

import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import servers
import yaml
from conftest import REPO_ROOT
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image
from test_export import exported
from typer.testing import CliRunner

from suradapter.config import load_params
from suradapter.evaluate.gates import gated_report
from suradapter.export.runtime import OnnxTextPath
from suradapter.model.text_path import AdaptedTextPath
from suradapter.provenance import ADAPTER_WEIGHTS, sha256_file, verify_checksums
from suradapter.registry import (
    ProductionNotImproved,
    RegistryError,
    fetch_version,
    judge_report,
    promote,
    register_version,
    registry_status,
    resolve,
    rollback,
)

WEIGHTS = ADAPTER_WEIGHTS
GATES = load_params(REPO_ROOT / "params.yaml", profile="tiny").evaluate.gates
PASSING_METRICS = servers.PASSING_METRICS
FAILING_METRICS = PASSING_METRICS | {  # retrieval does not rise: retrieval_gain 0 fails
    "alignment": {
        "cosine": {"base": 0.6, "adapter": 0.8},
        "retrieval_top1": {"base": 0.2, "adapter": 0.2},
    }
}
RETRIEVAL_FAILED = f"gate retrieval_gain failed (value 0, needs >= {GATES.min_retrieval_gain:g})"
RETRIEVAL_FORGED = (
    f"gate retrieval_gain says passed=true, but 0.0 >= {GATES.min_retrieval_gain} is false"
)


@dataclass
class Artefacts:
    path: AdaptedTextPath
    adapter: Path
    export: Path
    passing: Path  # eval folder whose report passes for `adapter`
    failing: Path  # eval folder whose report has a failed gate

    def folders(self, eval_dir: Path | None = None) -> tuple[Path, Path, Path]:
        return self.adapter, self.export, eval_dir or self.passing


@dataclass
class Servers:
    url: str
    s3: servers.S3Server


def make_report(adapter_sha256: str, metrics: dict = PASSING_METRICS, gates=GATES) -> dict:
    """A report as `sur evaluate` writes it: gates and verdict derived from `metrics`."""
    return gated_report(metrics, gates, adapter_sha256)


def write_eval(folder: Path, report: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    (folder / "report.md").write_text(f"# Evaluation: {report['passed']}\n")
    Image.new("RGB", (8, 8), "red").save(folder / "grid.png")
    return folder


def stored_keys(s3: servers.S3Server, source: str) -> dict[str, str]:
    """`{path under artifacts/: S3 key}` of the files of the logged model `source`."""
    model_id = source.removeprefix("models:/")
    pages = s3.client.get_paginator("list_objects_v2").paginate(Bucket="mlflow")
    keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
    marker = f"/models/{model_id}/artifacts/artifacts/"
    return {key.split(marker, 1)[1]: key for key in keys if marker in key}


def rewrite_consistently(s3: servers.S3Server, source: str, path: str, body: bytes) -> None:
    """Replace `artifacts/<path>` of a logged model in the bucket, and its SHA256SUMS line to
    match: the rewrite an attacker with write access to the bucket would make."""
    keys = stored_keys(s3, source)
    s3.client.put_object(Bucket="mlflow", Key=keys[path], Body=body)
    sums = s3.client.get_object(Bucket="mlflow", Key=keys["SHA256SUMS"])["Body"].read().decode()
    digest = hashlib.sha256(body).hexdigest()
    lines = [
        f"{digest}  {path}" if line.endswith(f"  {path}") else line for line in sums.split("\n")
    ]
    s3.client.put_object(Bucket="mlflow", Key=keys["SHA256SUMS"], Body="\n".join(lines).encode())


@pytest.fixture(scope="module")
def artefacts(tiny_pipeline, tiny_params, tmp_path_factory) -> Artefacts:
    root = tmp_path_factory.mktemp("registry-artefacts")
    path, adapter_dir, result = exported(tiny_pipeline, tiny_params.export, root, "fixed")
    sha = sha256_file(adapter_dir / WEIGHTS)
    passing = write_eval(root / "eval-pass", make_report(sha))
    failing = write_eval(root / "eval-fail", make_report(sha, FAILING_METRICS))
    return Artefacts(path, adapter_dir, result.folder, passing, failing)


@pytest.fixture(scope="module")
def registry_servers(request, tmp_path_factory):
    """One S3 server and one MLflow server (artifacts on S3) for the module, on a SQLite
    store (one user); tests marked `ON_BOTH_STORES` run on PostgreSQL (the team stack) too."""
    store = request.param
    root = tmp_path_factory.mktemp(f"registry-servers-{store}")
    database = request.getfixturevalue("postgres_url") if store == "postgresql" else None
    with (
        pytest.MonkeyPatch.context() as patch,
        servers.registry_servers(root, patch.setenv, database) as (url, s3),
    ):
        yield Servers(url, s3)


@pytest.fixture
def registry_env(registry_servers, monkeypatch, repo_root) -> Servers:
    for key, value in servers.s3_env(registry_servers.s3.endpoint).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry_servers.url)
    monkeypatch.chdir(repo_root)  # git commit and dvc.lock of this repo
    return registry_servers


# register, promote, rollback and the CLI run on both stores; concurrent promotes (a team's
# case) on PostgreSQL; the rest on SQLite
ON_BOTH_STORES = pytest.mark.stores("sqlite", "postgresql")


def pytest_generate_tests(metafunc):
    """Each test on the registry servers runs on the stores its `stores` mark names (default
    SQLite), with one server pair per store for the module."""
    if "registry_servers" in metafunc.fixturenames:
        marked = metafunc.definition.get_closest_marker("stores")
        stores = list(marked.args) if marked else ["sqlite"]
        metafunc.parametrize("registry_servers", stores, indirect=True, scope="module")


def named(params, name: str):
    """`params` with registry.model_name set to `name`."""
    registry = params.registry.model_copy(update={"model_name": name})
    return params.model_copy(update={"registry": registry})


def with_gates(params, **thresholds):
    """`params` with these `evaluate.gates` thresholds."""
    gates = params.evaluate.gates.model_copy(update=thresholds)
    evaluate = params.evaluate.model_copy(update={"gates": gates})
    return params.model_copy(update={"evaluate": evaluate})


@pytest.fixture
def params(registry_env, tiny_params, request):
    """Tiny params with a registered model name of this test's own."""
    return named(tiny_params, re.sub(r"[^\w-]", "-", f"sur-{request.node.name}"))


def versions_of(url: str, name: str) -> list[str]:
    return [v.version for v in MlflowClient(url).search_model_versions(f"name = '{name}'")]


def version_tags(url: str, name: str, version: str) -> dict[str, str]:
    return MlflowClient(url).get_model_version(name, version).tags


def lock_dependency_md5(repo_root: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((repo_root / "dvc.lock").read_text())["stages"][stage]
    return next(dep["md5"] for dep in lock["deps"] if dep["path"] == path)


# ---------------------------------------------------------------- report verdicts (no server)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({}, None),
        ({"passed": False}, "contradicts itself: it says passed=false, but every gate it"),
        ({"gates": []}, "contradicts itself: it lists gates [], but its metrics call for"),
        ({"adapter_sha256": "0" * 64}, "not for this adapter"),
        ({"metrics": None}, "malformed"),
        ({"passed": 1}, "report is malformed: passed: Input should be a valid boolean"),
        ({"gates": [{"name": "x", "passed": True, "value": True}]}, "gates.0.value: Input"),
        ({"gates": [{"name": "x", "passed": True, "rule": ">"}]}, "gates.0.rule: Value error"),
        ({"metrics": {"alignment": {}}}, "metrics.denoise is missing"),
    ],
)
def test_a_report_passes_only_when_its_metrics_pass_for_the_same_adapter(change, reason):
    report = make_report("a" * 64) | change
    verdict = judge_report(report, "a" * 64, GATES)
    assert verdict.passed is (reason is None)
    assert reason is None or reason in "; ".join(verdict.reasons), verdict.reasons
    failed = judge_report(make_report("a" * 64, FAILING_METRICS), "a" * 64, GATES)
    assert not failed.passed and not failed.contradictions
    assert failed.reasons == [RETRIEVAL_FAILED]


def test_the_verdict_is_re_derived_from_the_metrics_not_taken_on_trust():
    sha = "a" * 64
    # hand-written: every gate marked passed, over metrics whose retrieval did not rise
    forged = make_report(sha, FAILING_METRICS)
    forged["passed"] = True
    for gate in forged["gates"]:
        gate["passed"] = True
    verdict = judge_report(forged, sha, GATES)
    assert not verdict.passed
    assert verdict.contradictions == [RETRIEVAL_FORGED]
    # a value that is not the one the metrics give
    inflated = make_report(sha, FAILING_METRICS)
    gate = next(g for g in inflated["gates"] if g["name"] == "retrieval_gain")
    gate.update(value=0.4, passed=True)
    inflated["passed"] = True
    reasons = "; ".join(judge_report(inflated, sha, GATES).reasons)
    assert "gate retrieval_gain records value 0.4, its metrics give 0.0" in reasons
    # a laxer threshold written into the report: consistent, but judged by the profile's
    lax = make_report(sha, FAILING_METRICS, GATES.model_copy(update={"min_retrieval_gain": 0.0}))
    assert lax["passed"] is True
    verdict = judge_report(lax, sha, GATES)
    assert not verdict.passed and not verdict.contradictions
    assert verdict.reasons == [
        f"gate retrieval_gain failed (value 0, needs >= {GATES.min_retrieval_gain:g}; "
        "the report used 0.0)"
    ]
    stricter = GATES.model_copy(update={"min_alignment_gain": 0.5})
    assert "gate alignment_gain failed" in judge_report(make_report(sha), sha, stricter).reasons[0]


# ---------------------------------------------------------------------------- registration


@ON_BOTH_STORES
def test_a_passing_version_gets_candidate_lineage_tags_and_verifiable_files(
    params, artefacts, registry_env, repo_root, tmp_path
):
    result = register_version(params, *artefacts.folders())
    name = params.registry.model_name
    assert result.passed and result.aliases == ["candidate"] and not result.reasons
    assert resolve(params, "candidate") == result.version

    tags = version_tags(registry_env.url, name, result.version)
    assert tags["adapter_sha256"] == sha256_file(artefacts.adapter / WEIGHTS)
    assert tags["gate_verdict"] == "passed"
    assert tags["base_model"] == "tiny" and tags["teacher"] == params.embed.model
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", tags["git_commit"])
    assert tags["surd_source_hash"] == lock_dependency_md5(
        repo_root, "prepare", params.prepare.source
    )
    assert any(key.startswith("dvc.prepare/") for key in tags)

    root = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{name}@candidate", dst_path=str(tmp_path / "download")
        )
    )
    files = root / "artifacts"
    for expected in (
        "adapter/config.json",
        f"adapter/{WEIGHTS}",
        "export/text_path.onnx",
        "export/export.json",
        "export/tokenizer/tokenizer_config.json",
        "eval/report.json",
        "eval/report.md",
        "eval/grid.png",
        "SHA256SUMS",
    ):
        assert (files / expected).is_file(), expected
    assert verify_checksums(files) == []
    # the manifest is also in the registry: the trust anchor outside the bucket
    assert tags["sha256sums"] == (files / "SHA256SUMS").read_text()

    fetched = fetch_version(params, "candidate", tmp_path / "fetched")
    assert fetched.version == result.version and fetched.tags["gate_verdict"] == "passed"
    assert (fetched.artifacts / "export" / "text_path.onnx").is_file()


def test_a_failing_version_is_registered_without_an_alias(params, artefacts, registry_env):
    first = register_version(params, *artefacts.folders())
    failed = register_version(params, *artefacts.folders(artefacts.failing))
    assert not failed.passed and failed.aliases == []
    assert failed.reasons == [RETRIEVAL_FAILED]
    assert registry_status(params) == {"candidate": first.version}  # candidate did not move
    tags = version_tags(registry_env.url, params.registry.model_name, failed.version)
    assert tags["gate_verdict"] == "failed" and "retrieval_gain" in tags["gate_failures"]


def test_a_report_that_contradicts_itself_is_not_registered(
    params, artefacts, registry_env, tmp_path
):
    forged = make_report(sha256_file(artefacts.adapter / WEIGHTS), FAILING_METRICS)
    forged["passed"] = True
    for gate in forged["gates"]:
        gate["passed"] = True
    folder = write_eval(tmp_path / "eval", forged)
    with pytest.raises(RegistryError, match=r"contradicts its own values") as err:
        register_version(params, *artefacts.folders(folder))
    assert RETRIEVAL_FORGED in str(err.value)
    assert "Nothing was registered" in str(err.value)
    assert versions_of(registry_env.url, params.registry.model_name) == []


def test_a_report_for_another_adapter_does_not_pass(params, artefacts, tmp_path):
    other = write_eval(tmp_path / "eval", make_report("0" * 64))
    result = register_version(params, *artefacts.folders(other))
    assert not result.passed and result.aliases == []
    assert "not for this adapter" in result.reasons[0]


def test_missing_inputs_are_named_before_anything_is_logged(params, artefacts, tmp_path):
    with pytest.raises(RegistryError, match=r"eval folder .* lacks report.json.*sur evaluate"):
        register_version(params, artefacts.adapter, artefacts.export, tmp_path)


def test_an_s3_outage_during_register_leaves_no_version(
    artefacts, tiny_params, tmp_path, monkeypatch, repo_root
):
    params = named(tiny_params, "sur-outage")
    monkeypatch.chdir(repo_root)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast, no 4-minute backoff
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # nor boto3 retries inside the server
    with ExitStack() as s3_stack:
        s3 = s3_stack.enter_context(servers.s3_server(tmp_path / "s3", ("mlflow",)))
        for key, value in servers.s3_env(s3.endpoint).items():
            monkeypatch.setenv(key, value)
        with servers.mlflow_server(tmp_path / "mlflow", "s3://mlflow/artifacts") as url:
            monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
            s3_stack.close()  # the S3 server behind the MLflow server goes down
            with pytest.raises(RegistryError, match=r"artifact upload failed.*S3 endpoint") as err:
                register_version(params, *artefacts.folders())
            assert "mlflow-artifacts" in str(err.value)  # the request that failed
            assert versions_of(url, "sur-outage") == []
            with pytest.raises(MlflowException, match="not found"):
                MlflowClient(url).get_registered_model("sur-outage")


def test_a_version_is_deleted_when_its_alias_cannot_be_set(
    params, artefacts, registry_env, monkeypatch
):
    # The registry cannot be made to fail between two calls for real; only here is a fake used.
    def refuse(self, name, alias, version):
        raise MlflowException(f"alias service unavailable for {alias}")

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "set_registered_model_alias", refuse)
        with pytest.raises(RegistryError, match="half-made version was deleted"):
            register_version(params, *artefacts.folders())
    assert versions_of(registry_env.url, params.registry.model_name) == []
    assert registry_status(params) == {}


# ------------------------------------------------------------------ promotion and rollback


@ON_BOTH_STORES
def test_promote_promote_and_rollback_move_production_and_previous(params, artefacts, registry_env):
    first = register_version(params, *artefacts.folders()).version
    second = register_version(params, *artefacts.folders()).version

    promoted = promote(params, first)
    assert (promoted.production, promoted.previous, promoted.changed) == (first, None, True)
    assert promoted.challenge is None  # nothing in production to beat
    assert registry_status(params) == {"candidate": second, "production": first}
    assert not promote(params, first).changed  # promoting production again changes nothing

    promoted = promote(params, from_alias="candidate")
    assert (promoted.production, promoted.previous) == (second, first)
    # the same adapter files as production: a margin of 0 without an evaluation
    assert promoted.challenge.margin == 0.0 and promoted.challenge.passed
    assert "same adapter files" in promoted.challenge.note
    tags = version_tags(registry_env.url, params.registry.model_name, second)
    assert tags["challenge.production_version"] == first
    assert tags["challenge.verdict"] == "passed"
    assert registry_status(params) == {
        "candidate": second,
        "previous": first,
        "production": second,
    }

    rolled = rollback(params)
    assert (rolled.production, rolled.previous) == (first, second)
    assert resolve(params, "production") == first and resolve(params, "previous") == second
    rolled = rollback(params)  # a second rollback undoes the first
    assert (rolled.production, rolled.previous) == (second, first)


@pytest.mark.stores("postgresql")
def test_concurrent_promotes_leave_production_on_a_validated_version(params, artefacts):
    """Four promotions at once (two passing versions, one failing, each twice): every
    passing one is promoted or loses the race cleanly, the failing one never is, and the
    aliases end on validated versions."""
    passing = [register_version(params, *artefacts.folders()).version for _ in range(2)]
    failing = register_version(params, *artefacts.folders(artefacts.failing)).version

    def attempt(version: str) -> str:
        try:
            return promote(params, version).production
        except RegistryError as err:
            return f"refused: {err}"

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(attempt, [*passing, failing, *passing]))
    assert all(outcome in passing or outcome.startswith("refused") for outcome in outcomes)
    assert "gate_verdict is 'failed'" in outcomes[2]
    aliases = registry_status(params)
    assert aliases["production"] in passing and aliases.get("previous") in (None, *passing)


def test_promote_refuses_a_failed_version_and_keeps_production(params, artefacts):
    good = register_version(params, *artefacts.folders()).version
    promote(params, good)
    failed = register_version(params, *artefacts.folders(artefacts.failing)).version
    with pytest.raises(RegistryError, match=rf"version {failed} of .* cannot be promoted") as err:
        promote(params, failed)
    assert "gate_verdict is 'failed'" in str(err.value)
    assert RETRIEVAL_FAILED in str(err.value)
    assert registry_status(params) == {"candidate": good, "production": good}


def test_promote_refuses_a_version_that_does_not_beat_production_by_the_margin(
    params, artefacts, registry_env
):
    name = params.registry.model_name
    first = register_version(params, *artefacts.folders()).version
    second = register_version(params, *artefacts.folders()).version
    promote(params, first)
    demanding = with_gates(params, min_margin_over_production=0.05)
    with pytest.raises(ProductionNotImproved) as err:
        promote(demanding, second)
    assert str(err.value) == (
        f"version {second} of {name} cannot be promoted: version {second} does not beat "
        f"production version {first}: margin +0.0000, needs >= 0.05 (the same adapter files: "
        f"a margin of 0 by construction, nothing evaluated); @production stays at version {first}"
    )
    assert registry_status(params) == {"candidate": second, "production": first}
    tags = version_tags(registry_env.url, name, second)
    assert (tags["challenge.verdict"], tags["challenge.margin"]) == ("failed", "0.0")


def test_promote_refuses_missing_versions_and_aliases(params, artefacts):
    name = params.registry.model_name
    register_version(params, *artefacts.folders())
    with pytest.raises(RegistryError, match=rf"^version 99 of {name} does not exist$"):
        promote(params, "99")
    with pytest.raises(RegistryError, match=r"alias @staging of .* is not set"):
        promote(params, from_alias="staging")
    with pytest.raises(RegistryError, match="no @previous version to roll back to"):
        rollback(params)
    assert resolve(params, "production") is None


def test_production_stays_when_moving_it_fails(params, artefacts, monkeypatch):
    first = register_version(params, *artefacts.folders()).version
    second = register_version(params, *artefacts.folders()).version
    promote(params, first)
    real = MlflowClient.set_registered_model_alias

    def production_unavailable(self, name, alias, version):  # a fault between the two calls
        if alias == "production":
            raise MlflowException("registry went away")
        return real(self, name, alias, version)

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "set_registered_model_alias", production_unavailable)
        with pytest.raises(RegistryError, match=r"@production was left as it was") as err:
            promote(params, second)
    assert f"(version {first})" in str(err.value)
    assert registry_status(params) == {"candidate": second, "production": first}


# ------------------------------------------------------------------------- fetch and serve


def test_fetch_version_names_each_tampered_or_missing_file(
    params, artefacts, registry_env, tmp_path
):
    version = register_version(params, *artefacts.folders()).version
    source = MlflowClient(registry_env.url).get_model_version(params.registry.model_name, version)
    keys = stored_keys(registry_env.s3, source.source)
    client = registry_env.s3.client
    client.put_object(Bucket="mlflow", Key=keys["export/export.json"], Body=b'{"forged": 1}')
    client.delete_object(Bucket="mlflow", Key=keys["eval/report.md"])

    dest = tmp_path / "fetched"
    with pytest.raises(RegistryError, match="failed its checksum check") as err:
        fetch_version(params, version, dest)
    assert "artifacts/export/export.json: sha256 differs" in str(err.value)
    assert "artifacts/eval/report.md: missing" in str(err.value)
    assert not dest.exists() and not list(tmp_path.glob("fetched.*"))


def test_files_rewritten_with_their_sha256sums_are_refused_by_fetch_pyfunc_and_promote(
    params, artefacts, registry_env, tmp_path
):
    name = params.registry.model_name
    version = register_version(params, *artefacts.folders()).version
    source = MlflowClient(registry_env.url).get_model_version(name, version).source
    forged = json.dumps({"base_model": "tiny", "forged": True}).encode()
    rewrite_consistently(registry_env.s3, source, "export/export.json", forged)
    bucket_copy = Path(
        mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(tmp_path))
    )
    assert verify_checksums(bucket_copy / "artifacts") == []  # the bucket agrees with itself

    with pytest.raises(RegistryError, match="failed its checksum check") as err:
        fetch_version(params, version, tmp_path / "fetched")
    assert str(err.value) == (
        f"version {version} of {name} failed its checksum check: artifacts/export/export.json: "
        "sha256 differs from the registry's record; artifacts/SHA256SUMS: differs from the "
        "registry's record"
    )
    with pytest.raises(RegistryError, match=r"fail the registry's record") as err:
        mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    assert "export/export.json: sha256 differs from the registry's record" in str(err.value)
    with pytest.raises(RegistryError, match="cannot be promoted") as err:
        promote(params, version)
    assert "its SHA256SUMS differs from the registry's record" in str(err.value)
    assert registry_status(params) == {"candidate": version}


def test_a_version_without_the_registry_manifest_is_not_fetched(
    params, artefacts, registry_env, tmp_path
):
    name = params.registry.model_name
    version = register_version(params, *artefacts.folders()).version
    MlflowClient(registry_env.url).delete_model_version_tag(name, version, "sha256sums")
    with pytest.raises(RegistryError, match=r"has no 'sha256sums' tag.*register its adapter"):
        fetch_version(params, version, tmp_path / "fetched")
    with pytest.raises(RegistryError, match=r"has no 'sha256sums' tag"):
        mlflow.pyfunc.load_model(f"models:/{name}/{version}")


def test_pyfunc_production_predicts_the_onnx_text_path_embeddings(
    registry_env, tiny_params, artefacts
):
    name = tiny_params.registry.model_name
    assert name == "sur-adapter"
    promote(tiny_params, register_version(tiny_params, *artefacts.folders()).version)
    model = mlflow.pyfunc.load_model(f"models:/{name}@production")
    prompts = ["a prompt", "three blue squares on a kitchen table"]
    got = model.predict(prompts)
    tokens = artefacts.path.tokenize(prompts)
    expected = OnnxTextPath.load(artefacts.export).run(tokens.input_ids, tokens.attention_mask)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    assert got.shape == expected.shape == (2, artefacts.path.max_length, expected.shape[-1])
    assert np.abs(got - expected).max() <= 1e-5
    one = model.predict(["a prompt"])
    assert one.shape[0] == 1 and np.abs(one[0] - expected[0]).max() <= 1e-5


# ------------------------------------------------------------------------------------ CLI


@ON_BOTH_STORES
def test_cli_register_promote_status_and_refusals(registry_env, artefacts, repo_root, tmp_path):
    from suradapter.cli import app

    settings = yaml.safe_load((repo_root / "params.yaml").read_text())
    settings["registry"]["model_name"] = "sur-cli"
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(settings))
    runner = CliRunner()

    def sur(*args: str):
        result = runner.invoke(app, ["--params", str(params_file), *args])
        return result.exit_code, " ".join(result.output.split())

    adapter, export, passing = (str(folder) for folder in artefacts.folders())
    code, out = sur("register", "--adapter", adapter, "--export", export, "--eval", passing)
    assert code == 0 and "sur-cli version 1: gates passed; aliases: @candidate" in out, out
    code, out = sur("promote")
    assert code == 0 and "@production -> version 1" in out, out
    code, out = sur("registry", "status")
    assert code == 0 and "@candidate" in out and "@production" in out, out
    code, out = sur("promote", "99")
    assert code == 1 and "version 99 of sur-cli does not exist" in out, out
    code, out = sur("rollback")
    assert code == 1 and "no @previous version" in out, out
    code, out = sur("register", "--adapter", adapter, "--export", export, "--eval", str(tmp_path))
    assert code == 1 and "lacks report.json" in out, out
