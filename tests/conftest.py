"""Shared fixtures: offline environment, the repo's params, a seeded tiny base pipeline."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "SUR_NO_STACK_ENV": "1",  # a developer's running `sur stack` must not capture test runs
}
for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def mlflow_tracking_uri_per_test():
    """Clear MLflow's process-wide tracking URI after each test. A stage run in this process
    sets it (and copies it into $MLFLOW_TRACKING_URI), and it outranks the variable, so the
    next test's clients would talk to this test's server, long stopped. The variable goes back
    to what it was before the test (a module's servers may have set it)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)
    if before is not None:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def params_path() -> Path:
    return REPO_ROOT / "params.yaml"


@pytest.fixture(scope="session")
def tiny_params(params_path):
    from suradapter.config import load_params

    return load_params(params_path, profile="tiny")


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server for the session (`servers.postgres_server`): its
    `postgresql://user:password@host:port` URL. Skipped, saying why, where PostgreSQL is not
    installed (`make test` installs it when it can)."""
    from contextlib import ExitStack

    import servers

    from suradapter.stack.postgres import PostgresNotFound

    with ExitStack() as stack:
        try:
            url = stack.enter_context(servers.postgres_server())
        except PostgresNotFound as err:
            pytest.skip(f"no PostgreSQL server here ({err})")
        yield url


@pytest.fixture(scope="session")
def tiny_pipeline():
    from suradapter.model.zoo import load_base_pipeline

    return load_base_pipeline("tiny", seed=0)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when no test passed: an empty or all-skipped suite is not green."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    passed = len(reporter.stats.get("passed", [])) if reporter else 0
    if exitstatus == 0 and passed == 0:
        session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED


def pipeline_files(repo_root: Path) -> list[str]:
    """What a project copy needs: the pipeline and its params, the DVC config, the shipped
    base, and every code path dvc.yaml names as a dependency (read from dvc.yaml itself)."""
    import yaml

    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    code = {dep for stage in stages.values() for dep in stage["deps"] if dep.startswith("src/")}
    fixed = ["dvc.yaml", "params.yaml", "configs", "models/shapes-base", ".dvc/config"]
    return [*fixed, ".dvcignore", *sorted(code)]


def copy_into(repo: Path, repo_root: Path, items: list[str]) -> None:
    """Copy `items` (files or folders, relative paths) from `repo_root` to `repo`."""
    import shutil

    for item in dict.fromkeys(items):
        source, target = repo_root / item, repo / item
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, target)


def set_param(repo: Path, section: str, key: str, value) -> None:
    """Set `section.key` in the params.yaml of a project copy."""
    import yaml

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def project_copy(tmp_path, repo_root):
    """A git + DVC project: this repo's pipeline files and shipped base; 120 samples, 4 train steps.

    The copied code files only feed DVC's dependency hashes: `sur` runs the installed package.
    """
    return make_project_copy(tmp_path / "repo", repo_root)


def make_project_copy(repo: Path, repo_root: Path) -> tuple[Path, dict[str, str]]:
    """Build the `project_copy` project at `repo`; return (repo, the environment to run it)."""
    import subprocess
    import sys

    copy_into(repo, repo_root, pipeline_files(repo_root))
    set_param(repo, "shapes", "num_samples", 120)
    set_param(repo, "train", "max_steps", 4)
    set_param(repo, "train", "checkpoint_every", 2)
    set_param(repo, "train", "grid_prompts", 1)
    set_param(repo, "sampling", "steps", 2)
    set_param(repo, "evaluate", "images_per_combination", 4)
    set_param(repo, "evaluate", "denoise_batches", 1)
    set_param(repo, "evaluate", "alignment_rows", 16)
    set_param(repo, "evaluate", "grid_prompts", 1)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.invalid",
    }
    for var in ("SUR_PARAMS", "SUR_PROFILE"):
        env.pop(var, None)
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(command, cwd=repo, env=env, check=True, capture_output=True)
    return repo, env


def build_tiny_project(root: Path, repo_root: Path, train: dict, **sections: dict) -> Path:
    """Write a params file (profile tiny) whose every data path lies under `root`; the shapes
    samples (configs/tiny.yaml sizes them) are generated, prepared and embedded. `train` and
    `sections` update those sections of the file (keys the tiny overlay sets would not apply).

    Returns the params path. The frozen-output cache is filled by the first run that needs it.
    """
    import shutil

    import yaml

    from suradapter.config import load_params
    from suradapter.data.prepare import prepare_dataset
    from suradapter.data.shapes import generate_shapes_dataset
    from suradapter.teacher.embed import run_embed

    shutil.copytree(repo_root / "configs", root / "configs")
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["shapes"].update(output_dir=str(root / "raw"))
    raw["prepare"].update(source=str(root / "raw"), output_dir=str(root / "prepared"))
    raw["embed"].update(
        manifest=str(root / "prepared/manifest.parquet"), cache_dir=str(root / "cache")
    )
    raw["encode"].update(cache_dir=str(root / "frozen"))
    raw["train"].update(
        output_dir=str(root / "adapter"),
        checkpoint_dir=str(root / "ckpt"),
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
        **train,
    )
    for section, values in sections.items():
        raw[section].update(values)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(path, profile="tiny")
    generate_shapes_dataset(params.shapes, Path(params.shapes.output_dir))
    prepare_dataset(params.prepare)
    run_embed(params.embed)
    return path


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory, repo_root) -> Path:
    """The training tests' project (`build_tiny_project`): 30 steps, checkpoints every 10."""
    train = {"max_steps": 30, "checkpoint_every": 10, "log_every": 2, "grid_prompts": 2}
    return build_tiny_project(tmp_path_factory.mktemp("train-project"), repo_root, train)
