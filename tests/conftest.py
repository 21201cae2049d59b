"""Shared fixtures: offline environment, the repo's params, a seeded tiny base pipeline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}
for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)

REPO_ROOT = Path(__file__).resolve().parents[1]


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
def tiny_pipeline():
    from suradapter.model.zoo import load_base_pipeline

    return load_base_pipeline("tiny", seed=0)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when no test passed: an empty or all-skipped suite is not green."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    passed = len(reporter.stats.get("passed", [])) if reporter else 0
    if exitstatus == 0 and passed == 0:
        session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED
