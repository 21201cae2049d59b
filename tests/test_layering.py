"""The import rules between layers, read from the source (nothing is imported or run)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "suradapter"
# What the model layer and the params must never reach: services and the MLOps layers.
MLOPS = ("mlflow", "prefect", "dvc", "boto3", "flows", "serving")
SERVICE_MODULES = ("suradapter.stack", "suradapter.registry", "suradapter.tracking")


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside functions (absolute names)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def imports_of(package: str) -> dict[str, set[str]]:
    """`{file: imported modules}` of every file of `suradapter.<package>` (a module or folder)."""
    target = PACKAGE / package
    files = sorted(target.rglob("*.py")) if target.is_dir() else [target.with_suffix(".py")]
    return {str(path.relative_to(PACKAGE)): imported_modules(path) for path in files}


def reaching(package: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for path, modules in imports_of(package).items():
        hits = sorted(m for m in modules if any(m == f or m.startswith(f"{f}.") for f in forbidden))
        if hits:
            found[path] = hits
    return found


def test_the_rule_reader_sees_imports_in_functions_too(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from suradapter.train import data\n")
    assert imported_modules(source) == {"os", "suradapter.train", "suradapter.train.data"}


def test_config_imports_no_service_module():
    assert reaching("config", SERVICE_MODULES + MLOPS) == {}


@pytest.mark.parametrize(("package", "other"), [("evaluate", "train"), ("train", "evaluate")])
def test_evaluate_and_train_do_not_import_each_other(package, other):
    assert reaching(package, (f"suradapter.{other}",)) == {}


def test_the_model_layer_imports_no_mlops_code():
    forbidden = MLOPS + SERVICE_MODULES + ("suradapter.provenance", "suradapter.stack")
    assert reaching("model", forbidden) == {}


def test_the_library_does_not_import_the_application_layer():
    """`flows/` and `serving/` build on `suradapter`, never the other way round (the CLI,
    the entry point, starts them)."""
    library = {
        path: modules
        for path, modules in imports_of(".").items()
        if path not in ("cli.py", "stack/cli.py")
    }
    upward = {
        path: sorted(m for m in modules if m.split(".")[0] in ("flows", "serving"))
        for path, modules in library.items()
    }
    assert {path: hits for path, hits in upward.items() if hits} == {}
