"""`sur stack`: real rclone, MLflow and Prefect servers in a tmp state dir (no mocks).

One stack (all three services) is started per module; the auth check starts its own
S3 + MLflow pair. Prefect is the slow one (~15 s), so it starts once.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from typer.testing import CliRunner

from suradapter.stack import (
    StackError,
    StackParams,
    StackPaths,
    client_env,
    down,
    postgres,
    status,
    up,
)
from suradapter.stack.cli import stack_app
from suradapter.stack.credentials import postgres_login, s3_credentials
from suradapter.stack.process import PidRecord, port_in_use, write_record
from suradapter.stack.services import s3_client

QUIET_CLIENT = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (held open together while picked)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def stack_params(state_dir, local_postgres: bool = False, **overrides) -> StackParams:
    names = ["s3_port", "mlflow_port", "prefect_port"] + ["postgres_port"] * local_postgres
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    return StackParams(state_dir=str(state_dir), **(ports | overrides))


def use_client_env(monkeypatch, params: StackParams) -> dict[str, str]:
    env = client_env(params.state_dir) | QUIET_CLIENT
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def s3_keys(params: StackParams, bucket: str) -> list[str]:
    paths = StackPaths.of(params.state_dir)
    client = s3_client(f"http://127.0.0.1:{params.s3_port}", s3_credentials(paths))
    return [item["Key"] for item in client.list_objects_v2(Bucket=bucket).get("Contents", [])]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    params = stack_params(tmp_path_factory.mktemp("stack") / "state")
    try:
        up(params)
        yield params
    finally:
        down(params)


def test_up_starts_all_services_healthy_and_is_idempotent(stack):
    statuses = {item.name: item for item in status(stack)}
    assert {name: item.state for name, item in statuses.items()} == dict.fromkeys(
        ("s3", "mlflow", "prefect"), "running"
    )
    assert statuses["mlflow"].url == f"http://127.0.0.1:{stack.mlflow_port}"
    assert statuses["prefect"].url == f"http://127.0.0.1:{stack.prefect_port}"
    again = up(stack)  # the same processes, not restarted
    assert {item.note for item in again} == {"already running"}
    assert [item.pid for item in again] == [statuses[item.name].pid for item in again]
    buckets = s3_client(statuses["s3"].url, s3_credentials(StackPaths.of(stack.state_dir)))
    names = {bucket["Name"] for bucket in buckets.list_buckets()["Buckets"]}
    assert {stack.artifacts_bucket, stack.dvc_bucket} <= names
    env = client_env(stack.state_dir)
    assert env["MLFLOW_TRACKING_URI"] == statuses["mlflow"].url
    with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=5) as response:
        assert response.read() == b"true"


def test_cli_status_and_up_report_the_running_stack(stack):
    state = SimpleNamespace(load=lambda: SimpleNamespace(stack=stack))
    result = CliRunner().invoke(stack_app, ["status"], obj=state)
    assert result.exit_code == 0, result.output
    assert str(stack.mlflow_port) in result.output and "running" in result.output
    result = CliRunner().invoke(stack_app, ["up"], obj=state)
    assert result.exit_code == 0, result.output
    assert "already running" in result.output


def test_apply_client_env_fills_only_unconfigured_clients(stack, monkeypatch):
    from suradapter.stack import apply_client_env

    monkeypatch.setattr(os, "environ", {"MLFLOW_TRACKING_URI": "http://elsewhere:1"})
    applied = apply_client_env(stack.state_dir)
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://elsewhere:1"
    assert "MLFLOW_TRACKING_URI" not in applied
    assert applied["PREFECT_API_URL"] == f"http://127.0.0.1:{stack.prefect_port}/api"
    assert applied["MLFLOW_S3_ENDPOINT_URL"] == f"http://127.0.0.1:{stack.s3_port}"
    monkeypatch.setattr(os, "environ", {"SUR_NO_STACK_ENV": "1"})
    assert apply_client_env(stack.state_dir) == {}


def test_artifacts_land_in_s3_and_survive_down_up(stack, monkeypatch, tmp_path):
    from mlflow import MlflowClient

    use_client_env(monkeypatch, stack)
    client = MlflowClient()
    experiment_id = client.create_experiment("stack-check")
    run_id = client.create_run(experiment_id).info.run_id
    client.log_text(run_id, "hello from the stack", "notes/hello.txt")
    assert any(key.endswith("notes/hello.txt") for key in s3_keys(stack, stack.artifacts_bucket))

    pids = [item.pid for item in status(stack)]
    outcome = dict(down(stack))
    assert all(what.startswith("stopped") for what in outcome.values())
    assert not any(psutil.pid_exists(pid) for pid in pids)
    assert {item.state for item in status(stack)} == {"stopped"}
    assert client_env(stack.state_dir) == {}

    up(stack, ["mlflow"])  # with its S3 dependency; Prefect stays down (slow to start)
    client = MlflowClient()
    assert client.get_experiment_by_name("stack-check").experiment_id == experiment_id
    local = client.download_artifacts(run_id, "notes/hello.txt", dst_path=str(tmp_path))
    assert Path(local).read_text() == "hello from the stack"
    assert (StackPaths.of(stack.state_dir).prefect_home / "prefect.db").is_file()


def test_auth_rejects_anonymous_and_accepts_the_client_env(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    params = stack_params(tmp_path / "state")
    try:
        statuses = up(params, ["mlflow"], auth=True)
        assert [item.name for item in statuses] == ["s3", "mlflow"]
        assert statuses[1].auth
        search = f"{statuses[1].url}/api/2.0/mlflow/experiments/search?max_results=1"
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(search, timeout=5)
        assert denied.value.code == 401
        paths = StackPaths.of(params.state_dir)
        for secret in (paths.mlflow_admin, paths.mlflow_auth_ini, paths.s3_credentials):
            assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
        env = use_client_env(monkeypatch, params)
        assert env["MLFLOW_TRACKING_USERNAME"] == "admin"
        experiment_id = MlflowClient().create_experiment("auth-check")
        assert MlflowClient().get_experiment(experiment_id).name == "auth-check"
        assert up(params, ["mlflow"])[1].note == "already running"  # keeps its auth
        with pytest.raises(StackError, match="other settings"):
            up(params, ["mlflow"], auth=False)
    finally:
        down(params)


CLI_RUNNER = (
    "import sys; from types import SimpleNamespace as NS; "
    "from suradapter.stack import StackParams; from suradapter.stack.cli import stack_app; "
    "params = StackParams.model_validate_json(sys.argv[1]); "
    "stack_app(sys.argv[2:], obj=NS(load=lambda: NS(stack=params)))"
)


def run_stack_cli(params: StackParams, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", CLI_RUNNER, params.model_dump_json(), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_cli_up_leaves_services_running_after_it_exits(tmp_path):
    params = stack_params(tmp_path / "state")
    try:
        started = run_stack_cli(params, "up", "--only", "s3")
        assert started.returncode == 0, started.stdout + started.stderr
        assert "started" in started.stdout
        checked = run_stack_cli(params, "status", "--only", "s3")
        assert checked.returncode == 0 and "running" in checked.stdout, checked.stdout
        stopped = run_stack_cli(params, "down")
        assert "s3: stopped" in stopped.stdout, stopped.stdout
    finally:
        down(params)


def test_a_service_that_dies_at_start_up_fails_with_its_log_tail(tmp_path):
    params = stack_params(tmp_path / "state")
    store = StackPaths.of(params.state_dir).mlflow_dir / "mlflow.db"
    store.parent.mkdir(parents=True)
    store.write_text("not a database")
    try:
        with pytest.raises(StackError, match=r"mlflow .* exited during start-up") as failed:
            up(params, ["mlflow"])
        assert "mlflow.log" in str(failed.value) and "not a database" in str(failed.value)
        assert {item.name: item.state for item in status(params, ["s3", "mlflow"])} == {
            "s3": "running",
            "mlflow": "stopped",
        }
    finally:
        down(params)


@pytest.mark.parametrize("reused", ["pid reused (other start time)", "other command line"])
def test_down_spares_an_unrelated_process_named_by_a_stale_pid_file(tmp_path, reused):
    params = stack_params(tmp_path / "state")
    paths = StackPaths.of(params.state_dir)
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        born = psutil.Process(stranger.pid).create_time()
        same_cmdline = reused.startswith("pid")
        record = PidRecord(
            service="s3",
            pid=stranger.pid,
            create_time=born - 100 if same_cmdline else born,
            cmdline=["sleep", "60"] if same_cmdline else ["rclone", "serve", "s3"],
            url="http://127.0.0.1:1",
            fingerprint="x",
            log=str(paths.log_file("s3")),
            log_offset=0,
        )
        write_record(paths.pid_file("s3"), record)
        assert [item.state for item in status(params, ["s3"])] == ["dead"]
        result = CliRunner().invoke(
            stack_app, ["status"], obj=SimpleNamespace(load=lambda: SimpleNamespace(stack=params))
        )
        assert result.exit_code == 1
        assert "stale pid file" in dict(down(params))["s3"]
        assert stranger.poll() is None
        assert not paths.pid_file("s3").exists()
    finally:
        stranger.kill()
        stranger.wait()


def test_up_fails_naming_a_port_taken_by_another_process(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        params = stack_params(tmp_path / "state", s3_port=port)
        with pytest.raises(StackError, match=rf"port {port} \(s3\) is already in use"):
            up(params, ["s3"])
    assert status(params, ["s3"])[0].state == "stopped"


def test_params_reject_duplicate_ports():
    with pytest.raises(ValueError, match="ports must differ"):
        StackParams(s3_port=9000, mlflow_port=9000)


PREFECT_FLOW = """
from prefect import flow


@flow(name="pg-check")
def check():
    return 1


check()
"""


def test_mlflow_and_prefect_keep_their_state_in_postgresql(tmp_path, monkeypatch, postgres_url):
    """`stack.database_url_env`: both servers on one PostgreSQL server (databases made on
    first use), its URL only in their environment; nothing on SQLite."""
    import psycopg
    from mlflow import MlflowClient

    monkeypatch.setenv("SUR_TEST_DATABASE_URL", postgres_url)
    params = stack_params(tmp_path / "state", database_url_env="SUR_TEST_DATABASE_URL")
    up(params)
    try:
        env = use_client_env(monkeypatch, params)
        MlflowClient().create_experiment("on-postgres")
        subprocess.run([sys.executable, "-c", PREFECT_FLOW], env={**os.environ, **env}, check=True)
        records = [path.read_text() for path in (Path(params.state_dir) / "run").glob("*.json")]
        commands = [" ".join(psutil.Process(item.pid).cmdline()) for item in status(params)]
    finally:
        down(params)
    with psycopg.connect(f"{postgres_url}/mlflow") as connection:
        names = connection.execute("SELECT name FROM experiments").fetchall()
    with psycopg.connect(f"{postgres_url}/prefect") as connection:
        runs = connection.execute(
            "SELECT count(*) FROM flow_run JOIN flow ON flow.id = flow_run.flow_id "
            "WHERE flow.name = 'pg-check' AND flow_run.state_type = 'COMPLETED'"
        ).fetchone()
    assert ("on-postgres",) in names and runs == (1,)
    paths = StackPaths.of(params.state_dir)
    assert not (paths.mlflow_dir / "mlflow.db").exists()
    assert not (paths.prefect_home / "prefect.db").exists()
    password = postgres_url.split("@")[0].rsplit(":", 1)[1]
    assert records and not any(password in text for text in [*records, *commands])


def test_a_database_url_env_that_is_unset_fails_naming_it(tmp_path, monkeypatch):
    monkeypatch.delenv("SUR_TEST_MISSING_URL", raising=False)
    params = stack_params(tmp_path / "state", database_url_env="SUR_TEST_MISSING_URL")
    with pytest.raises(StackError, match=r"\$SUR_TEST_MISSING_URL, which is not set"):
        up(params)
    assert {item.state for item in status(params)} == {"stopped"}


@pytest.fixture
def passable_dir():
    """A fresh folder others may pass through (0755): as root, the local PostgreSQL runs as
    the `postgres` user, and pytest's own temp root is closed to it (0700)."""
    try:
        postgres.postgres_bin("postgres")
    except postgres.PostgresNotFound as err:
        pytest.skip(f"no PostgreSQL server here ({err})")
    root = Path(tempfile.mkdtemp(prefix="sur-test-stack-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_stack_up_runs_a_local_postgresql_holding_mlflow_and_prefect_state(
    passable_dir, monkeypatch
):
    """`stack.postgres_port`: `sur stack up` starts PostgreSQL first (cluster under the
    state dir, generated login in a 0600 file), MLflow and Prefect keep their state in it,
    `down` stops it last, and the data is still there on the next `up`."""
    import psycopg
    from mlflow import MlflowClient

    params = stack_params(passable_dir / "state", local_postgres=True)
    paths = StackPaths.of(params.state_dir)
    started = run_stack_cli(params, "up")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert "PostgreSQL login" in started.stdout
        states = {item.name: item for item in status(params)}
        assert {name: item.state for name, item in states.items()} == dict.fromkeys(
            ("postgres", "s3", "mlflow", "prefect"), "running"
        )
        use_client_env(monkeypatch, params)
        MlflowClient().create_experiment("on-local-postgres")
        login = postgres_login(paths)
        server = postgres.server_url(login.password, params.postgres_port)
        with psycopg.connect(f"{server}/mlflow") as connection:
            names = connection.execute("SELECT name FROM experiments").fetchall()
        with psycopg.connect(f"{server}/prefect") as connection:  # Prefect's schema is there
            flows = connection.execute("SELECT count(*) FROM flow").fetchone()
        records = [path.read_text() for path in (paths.root / "run").glob("*.json")]
        commands = [" ".join(psutil.Process(item.pid).cmdline()) for item in states.values()]
    finally:
        stopped = run_stack_cli(params, "down")
    assert ("on-local-postgres",) in names and flows is not None
    assert stopped.stdout.strip().splitlines()[-1].startswith("postgres: stopped")
    assert not psutil.pid_exists(states["postgres"].pid)
    assert not port_in_use(params.postgres_port)
    assert (paths.postgres_data / "PG_VERSION").is_file()
    assert stat.S_IMODE(paths.postgres_login.stat().st_mode) == 0o600
    assert not (paths.mlflow_dir / "mlflow.db").exists()
    assert not (paths.prefect_home / "prefect.db").exists()
    assert not any(login.password in text for text in [*records, *commands])
    up(params, ["postgres"])  # the cluster and its login outlive down
    try:
        with psycopg.connect(f"{server}/mlflow") as connection:
            again = connection.execute("SELECT name FROM experiments").fetchall()
    finally:
        down(params)
    assert ("on-local-postgres",) in again


@pytest.mark.skipif(os.geteuid() != 0, reason="only root's PostgreSQL runs as another user")
def test_a_state_dir_the_postgres_user_cannot_reach_fails_naming_the_folder(passable_dir):
    closed = passable_dir / "closed"
    closed.mkdir(mode=0o700)
    params = stack_params(closed / "state", local_postgres=True)
    with pytest.raises(StackError, match=rf"cannot reach .*: {closed} is closed to other users"):
        up(params, ["postgres"])
    assert not (StackPaths.of(params.state_dir).postgres_data / "PG_VERSION").exists()


def test_params_take_one_postgresql_source():
    with pytest.raises(ValueError, match="exclude each other"):
        StackParams(database_url_env="SUR_DATABASE_URL", postgres_port=5433)
