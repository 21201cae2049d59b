"""The Prefect flows on a real DVC project, a real MLflow server (S3 artifacts) and a Prefect
test server: retrain end to end with a retried stage, a no-op re-run, the SURD data-change
trigger, the deployments run by a process worker, and `sur run` with failing gates.

One project is shared by the module (built like `project_copy`: the shipped base, 120
samples, 4 train steps, evaluation shrunk) because each test continues from the state the
previous one left: a whole pipeline costs a minute or more on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import servers
import yaml
from conftest import OFFLINE_ENV, copy_into, pipeline_files
from mlflow.tracking import MlflowClient

BIN = Path(sys.executable).parent
FAIL_ONCE = "fail-once"  # while this file exists, the prepare stage's command fails (once)
SURD_SOURCE = "data/surd"
TEST_POOL = "sur-test"
BACKOFF_S = 0.2


def edit_params(repo: Path, **sections: dict) -> None:
    """Update params.yaml sections of the project (nested keys merged one level deep)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in sections.items():
        for key, value in values.items():
            if isinstance(value, dict):
                params[section][key].update(value)
            else:
                params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def make_project(repo: Path, repo_root: Path) -> None:
    """A git + DVC project whose SURD source is a plain folder (so rows can be added to it)."""
    copy_into(repo, repo_root, [*pipeline_files(repo_root), "flows"])
    edit_params(
        repo,
        shapes={"num_samples": 120},
        prepare={"source": SURD_SOURCE},
        train={"max_steps": 4, "warmup_steps": 1, "checkpoint_every": 2, "grid_prompts": 1},
        sampling={"steps": 2},
        evaluate={
            "images_per_combination": 4,
            "denoise_batches": 1,
            "alignment_rows": 16,
            "grid_prompts": 1,
            # a 4-step adapter fails real gates; these let it pass, to exercise promotion
            "gates": {
                "max_denoise_increase": 100.0,
                "min_alignment_gain": 0.001,
                "min_retrieval_gain": 0.0,
            },
        },
        registry={"promotion": "auto"},
    )
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    stage = dvc_yaml["stages"]["prepare"]
    stage["cmd"] = (
        f"test ! -e {FAIL_ONCE} || {{ rm {FAIL_ONCE}; echo 'injected failure' >&2; exit 75; }}"
        f" && {stage['cmd']}"
    )
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    add_surd_rows(repo, 120, seed=0, prefix="base")
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.invalid",
    }
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(command, cwd=repo, env=env, check=True, capture_output=True)


def add_surd_rows(repo: Path, count: int, seed: int, prefix: str) -> None:
    """Render `count` shapes scenes and append them to the SURD source as new rows."""
    from suradapter.config import load_params
    from suradapter.data.shapes import generate_shapes_dataset

    shapes = load_params(repo / "params.yaml").shapes.model_copy(update={"seed": seed})
    staging = repo.parent / f"render-{prefix}"
    generate_shapes_dataset(shapes, staging, count)
    source = repo / SURD_SOURCE
    (source / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for line in (staging / "metadata.jsonl").read_text().splitlines():
        row = json.loads(line)
        name = f"images/{prefix}_{Path(row['file_name']).name}"
        shutil.copy(staging / row["file_name"], source / name)
        lines.append(json.dumps({**row, "file_name": name}))
    with (source / "metadata.jsonl").open("a") as handle:
        handle.write("\n".join(lines) + "\n")
    shutil.rmtree(staging)


@pytest.fixture(scope="module")
def database(request) -> str | None:
    """The flows' servers keep their state in PostgreSQL (the team stack) where it is
    installed, else in SQLite."""
    return servers.optional_postgres(request)


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory, database):
    """A real Prefect server (`prefect server start`, on `database`); this process's client
    pointed at it, with its own PREFECT_HOME and result storage."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_LOCAL_STORAGE_PATH,
        temporary_settings,
    )

    home = tmp_path_factory.mktemp("prefect")
    with servers.prefect_server(home / "server", database) as url:
        updates = {
            PREFECT_API_URL: url,
            PREFECT_HOME: str(home / "client"),
            PREFECT_LOCAL_STORAGE_PATH: str(home / "storage"),
        }
        with temporary_settings(updates=updates):
            yield url


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory, database):
    """A real MLflow server (on `database`) whose artifacts go to a real S3 server; clients
    pointed at it."""
    root = tmp_path_factory.mktemp("mlflow")
    backend = None
    if database is not None:
        backend = servers.own_database(database, "flow_tests_mlflow", "psycopg")
    with (
        servers.s3_server(root / "s3", ("mlflow",)) as s3,
        pytest.MonkeyPatch.context() as patch,
    ):
        for key, value in servers.s3_env(s3.endpoint).items():
            patch.setenv(key, value)
        with servers.mlflow_server(root / "server", "s3://mlflow/artifacts", backend) as url:
            patch.setenv("MLFLOW_TRACKING_URI", url)
            yield url


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root, prefect_api, mlflow_url):
    """The shared project after its first retrain (prepare failed once and was retried)."""
    from flows.retrain import retrain

    repo = tmp_path_factory.mktemp("flows") / "repo"
    make_project(repo, repo_root)
    (repo / FAIL_ONCE).touch()
    first = retrain(project_dir=str(repo), retry_backoff_s=BACKOFF_S)
    return repo, first


def status_of(result) -> dict[str, str]:
    return {stage.stage: stage.status for stage in result.stages}


def child_runs(client: MlflowClient, result, parent: str | None = None) -> dict[str, object]:
    """`{run name: run}` of the runs whose parent is `parent` (default: the flow's run)."""
    query = f"tags.mlflow.parentRunId = '{parent or result.mlflow_run_id}'"
    runs = client.search_runs([result.experiment_id], query)
    return {run.info.run_name: run for run in runs}


def test_retrain_runs_every_stage_registers_and_promotes(project, mlflow_url):
    repo, first = project
    assert status_of(first) == {
        "generate_shapes": "not_applicable",  # the SURD source is a folder, not the renderer
        "prepare": "ran",
        "embed": "ran",
        "bootstrap_base": "frozen",
        "encode": "ran",
        "train": "ran",
        "evaluate": "ran",
        "export": "ran",
    }
    registration = first.registration
    assert registration.version == "1" and not registration.reused and registration.passed
    assert registration.aliases == ["candidate", "production"]
    client = MlflowClient(mlflow_url)
    parent = client.get_run(first.mlflow_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["model_version"] == "1" and parent.data.tags["gate_verdict"] == "passed"
    assert parent.data.tags["surd_source_hash"].endswith(".dir")
    assert parent.data.params["train.max_steps"] == "4"
    # what a user opening the flow's run looks for first: the evaluation's gate figures
    report = json.loads((repo / "outputs/eval/report.json").read_text())
    gates = {f"gate_{gate['name']}": gate["value"] for gate in report["gates"]}
    assert gates and {name: parent.data.metrics[name] for name in gates} == gates
    assert parent.data.metrics["passed"] == 1.0
    children = child_runs(client, first)
    expected = {"embed", "bootstrap_base", "train", "evaluate", "export", "register", "promote"}
    assert expected <= set(children)
    assert children["train"].data.tags["dvc_status"] == "ran"
    assert children["bootstrap_base"].data.tags["dvc_status"] == "frozen"
    # the stage subprocesses nest their own runs under the flow's stage run
    assert set(child_runs(client, first, children["train"].info.run_id)) == {"train-adapter"}
    assert set(child_runs(client, first, children["evaluate"].info.run_id)) == {"evaluate"}
    version = client.get_model_version("sur-adapter", "1")
    assert version.tags["surd_source_hash"] == parent.data.tags["surd_source_hash"]


def test_a_stage_that_fails_once_is_retried_and_the_run_completes(project, mlflow_url):
    repo, first = project
    prepare = next(stage for stage in first.stages if stage.stage == "prepare")
    assert prepare.attempts == 2 and prepare.status == "ran"
    assert not (repo / FAIL_ONCE).exists()
    children = child_runs(MlflowClient(mlflow_url), first)
    failed, retried = children["prepare"], children["prepare (attempt 2)"]
    assert failed.info.status == "FAILED" and "exit 75" in failed.data.tags["error"]
    assert "injected failure" in failed.data.tags["error"]
    assert retried.info.status == "FINISHED" and retried.data.tags["dvc_status"] == "ran"


def test_an_unchanged_rerun_skips_every_stage_and_reuses_the_version(project):
    from flows.retrain import retrain

    repo, _ = project
    again = retrain(project_dir=str(repo), retry_backoff_s=BACKOFF_S)
    assert again.stages_run == []
    assert status_of(again)["train"] == "skipped" and status_of(again)["export"] == "skipped"
    assert again.registration.reused and again.registration.version == "1"
    assert again.registration.promotion == "already @production"


def test_data_check_starts_no_run_when_the_surd_source_is_unchanged(project, prefect_api):
    from flows.data_check import data_check

    repo, _ = project
    before = retrain_run_count()
    check = data_check(project_dir=str(repo))
    assert not check.changed and check.retrain is None
    assert check.current_hash == check.references["version 1 (@production)"]
    assert retrain_run_count() == before


def test_data_check_retrains_when_surd_rows_are_added(project, mlflow_url):
    from flows.data_check import data_check

    repo, _ = project
    edit_params(repo, registry={"promotion": "manual"})  # v2 waits at @candidate
    add_surd_rows(repo, 24, seed=7, prefix="extra")
    check = data_check(project_dir=str(repo), retry_backoff_s=BACKOFF_S)
    assert check.changed and check.retrain is not None
    assert {"prepare", "embed", "train", "evaluate", "export"} <= set(check.retrain.stages_run)
    registration = check.retrain.registration
    assert registration.version == "2" and not registration.reused
    assert registration.aliases == ["candidate"]  # manual policy: not promoted
    assert "manual" in registration.promotion
    version = MlflowClient(mlflow_url).get_model_version("sur-adapter", "2")
    assert version.tags["surd_source_hash"] == check.current_hash
    assert version.tags["surd_source_hash"] != check.references["version 1 (@production)"]
    # the newest version already holds this data: no second retrain for it
    assert not data_check(project_dir=str(repo)).changed


def worker_machine_env(home: Path, prefect_api: str, mlflow_url: str) -> dict[str, str]:
    """What a worker on another machine has: the shared Prefect and MLflow URLs, the shared
    S3's endpoint and keys, a home of its own (no PREFECT_HOME or state folder of the
    server's), and the machine's own settings (PATH, the offline switches)."""
    own = ("PATH", "LANG", "LC_ALL", *OFFLINE_ENV)
    env = {key: os.environ[key] for key in own if key in os.environ}
    env |= {key: os.environ[key] for key in servers.s3_env("") if key in os.environ}
    env |= {"HOME": str(home), "PREFECT_HOME": str(home / ".prefect")}
    return env | {"PREFECT_API_URL": prefect_api, "MLFLOW_TRACKING_URI": mlflow_url}


def test_deployments_run_on_a_process_worker(project, prefect_api, mlflow_url, tmp_path):
    """The worker runs as its own process with only the shared services' URLs and the S3
    credentials (as on a GPU machine), and completes a deployment's run."""
    from prefect import get_client
    from prefect.deployments import run_deployment

    from flows.deploy import deploy_flows, worker_command

    repo, _ = project
    yearly = {"retrain_cron": "0 3 1 1 *", "check_cron": "0 4 1 1 *"}  # nothing due meanwhile
    deployed = deploy_flows(repo, pool=TEST_POOL, **yearly)
    assert [item.name for item in deployed] == [
        "retrain/scheduled",
        "surd-data-check/on-data-change",
    ]
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("retrain/scheduled")
        assert deployment.work_pool_name == TEST_POOL
        assert deployment.parameters == {"project_dir": str(repo)}
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 1 1 *"]
        assert deployment.pull_steps[0]["prefect.deployments.steps.set_working_directory"]
    flow_run = run_deployment("surd-data-check/on-data-change", timeout=0)
    command = [*worker_command(str(BIN / "prefect"), TEST_POOL), "--run-once"]
    env = worker_machine_env(tmp_path / "worker-home", prefect_api, mlflow_url)
    worker = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert worker.returncode == 0, worker.stdout + worker.stderr
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run.id).state
    assert state.is_completed(), f"{state}\n{worker.stdout}\n{worker.stderr}"


def test_two_retrains_at_once_from_two_checkouts_register_whole_versions(
    project, prefect_api, mlflow_url, tmp_path
):
    """Two `sur run`s started together in two checkouts that share only the services (as on
    two machines): they take the retrain slot in turn, each registers a whole version (every
    file matches the registry's record) and the aliases end on validated versions."""
    from suradapter.config import load_params
    from suradapter.registry import fetch_version

    repo, _ = project
    client = MlflowClient(mlflow_url)
    before = {v.version for v in client.search_model_versions("name = 'sur-adapter'")}
    checkouts = []
    prompts = yaml.safe_load((repo / "params.yaml").read_text())["export"]["parity_prompts"]
    for name, kept in (("first", 2), ("second", 3)):  # each exports anew: its own version
        checkout = tmp_path / name
        shutil.copytree(repo, checkout, symlinks=True)  # with its DVC cache: the rest skips
        edit_params(
            checkout,
            export={"parity_prompts": prompts[:kept]},
            registry={"promotion": "manual"},  # concurrent promotions: test_registry.py
        )
        checkouts.append(checkout)
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    command = [str(BIN / "sur"), "run", "--no-stack"]
    runs = [
        subprocess.Popen(command, cwd=c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for c in checkouts
    ]
    outputs = [run.communicate(timeout=900)[0].decode(errors="replace") for run in runs]
    assert [run.returncode for run in runs] == [0, 0], "\n".join(outputs)

    summaries = [json.loads((c / "outputs/run/summary.json").read_text()) for c in checkouts]
    new = {s["registration"]["version"] for s in summaries}
    assert len(new) == 2 and not new & before
    after = {v.version for v in client.search_model_versions("name = 'sur-adapter'")}
    assert after == before | new  # no third, half-registered version
    params = load_params(checkouts[0] / "params.yaml")
    for version in sorted(new):  # every file of each version matches the registry's record
        fetched = fetch_version(params, version, tmp_path / "fetched" / version)
        assert fetched.tags["gate_verdict"] == "passed"
    aliases = client.get_registered_model("sur-adapter").aliases
    for alias, version in aliases.items():
        tags = client.get_model_version("sur-adapter", str(version)).tags
        assert tags["gate_verdict"] == "passed", (alias, version)
    assert str(aliases["candidate"]) in new  # the later of the two, by the slot's order
    # the slot: one flow's MLflow run (opened inside it) ended before the other's began
    experiment = client.get_experiment_by_name(params.train.experiment).experiment_id
    parents = sorted(
        (
            client.search_runs(
                [experiment], f"tags.`prefect.flow_run_id` = '{s['flow_run']['id']}'"
            )[0].info
            for s in summaries
        ),
        key=lambda info: info.start_time,
    )
    assert parents[0].end_time <= parents[1].start_time


def test_sur_run_with_failing_gates_exits_zero_and_says_why(project, prefect_api, mlflow_url):
    repo, _ = project
    client = MlflowClient(mlflow_url)
    aliases_before = client.get_registered_model("sur-adapter").aliases
    newest = max(int(v.version) for v in client.search_model_versions("name = 'sur-adapter'"))
    strict = {"max_denoise_increase": 0.0, "min_retrieval_gain": 1.0}  # a 4-step adapter fails
    edit_params(repo, registry={"promotion": "auto"}, evaluate={"gates": strict})
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    done = subprocess.run(
        [str(BIN / "sur"), "run", "--no-stack"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = " ".join(done.stdout.split())
    assert "FAILED" in out and "gate " in out
    summary = json.loads((repo / "outputs/run/summary.json").read_text())
    registration = summary["registration"]
    assert registration["version"] == str(newest + 1) and registration["passed"] is False
    assert registration["aliases"] == [] and "gates failed" in registration["promotion"]
    ran = {stage["stage"] for stage in summary["stages"] if stage["status"] == "ran"}
    assert ran == {"evaluate"}
    assert summary["links"]["mlflow_run"].startswith(mlflow_url)
    runs_page = summary["links"]["mlflow_experiment"]
    assert runs_page.startswith(mlflow_url) and runs_page.endswith("workflowType=machine_learning")
    assert summary["links"]["prefect_flow_run"].endswith(summary["flow_run"]["id"])
    aliases = client.get_registered_model("sur-adapter").aliases
    assert aliases == aliases_before and str(aliases["production"]) == "1"  # none moved


def retrain_run_count() -> int:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        flows_filter = FlowFilter(name=FlowFilterName(any_=["retrain"]))
        return len(client.read_flow_runs(flow_filter=flows_filter))


def test_the_flows_state_is_in_postgresql_where_it_is_installed(project, database):
    """The retrain's flow runs (Prefect) and its registered version (MLflow) are rows of the
    PostgreSQL databases, not of SQLite files."""
    if database is None:
        pytest.skip("PostgreSQL is not installed here: the flows ran on SQLite")
    import psycopg

    with psycopg.connect(f"{database}/flow_tests") as connection:
        completed = connection.execute(
            "SELECT count(*) FROM flow_run WHERE state_type = 'COMPLETED'"
        ).fetchone()
    with psycopg.connect(f"{database}/flow_tests_mlflow") as connection:
        versions = connection.execute("SELECT count(*) FROM model_versions").fetchone()
    assert completed[0] >= 1 and versions[0] >= 1
