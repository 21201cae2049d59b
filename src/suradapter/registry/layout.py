"""The files of a registered version, as `download_artifacts("models:/sur-adapter@...")` gives them.

    <root>/MLmodel, python_env.yaml, ...   the pyfunc flavour (MLflow's own files)
    <root>/artifacts/adapter/              config.json, diffusion_pytorch_model.safetensors
    <root>/artifacts/export/               text_path.onnx, export.json, tokenizer/
    <root>/artifacts/eval/                 report.json, report.md, *.png
    <root>/artifacts/SHA256SUMS            sha256 of every file under artifacts/ (relative paths);
                                           also the version's `sha256sums` tag (`manifest`)

Other code (serving, evaluation against @production) depends on this layout exactly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from suradapter.export.runtime import MODEL_FILE
from suradapter.export.runtime import REPORT_FILE as EXPORT_REPORT_FILE
from suradapter.model.adapter import ADAPTER_WEIGHTS
from suradapter.provenance import parse_checksums, write_checksums
from suradapter.registry.errors import RegistryError

ARTIFACTS_DIR = "artifacts"
ADAPTER_DIR = "adapter"
EXPORT_DIR = "export"
EVAL_DIR = "eval"
TOKENIZER_DIR = "tokenizer"
ADAPTER_CONFIG = "config.json"
EVAL_REPORT_FILE = "report.json"
# Paths under artifacts/, as SHA256SUMS lists them.
ADAPTER_WEIGHTS_PATH = f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}"
EVAL_REPORT_PATH = f"{EVAL_DIR}/{EVAL_REPORT_FILE}"

# What each input folder must hold, and the command that writes it.
REQUIRED_FILES = {
    ADAPTER_DIR: ((ADAPTER_CONFIG, ADAPTER_WEIGHTS), "sur train"),
    EXPORT_DIR: ((MODEL_FILE, EXPORT_REPORT_FILE, TOKENIZER_DIR), "sur export"),
    EVAL_DIR: ((EVAL_REPORT_FILE,), "sur evaluate"),
}


def check_inputs(folders: dict[str, Path]) -> None:
    """Check the adapter, export and eval folders hold their files. Raises RegistryError."""
    for part, folder in folders.items():
        names, command = REQUIRED_FILES[part]
        missing = [name for name in names if not (folder / name).exists()]
        if missing:
            raise RegistryError(
                f"{part} folder {folder} lacks {', '.join(missing)}: run `{command}` first "
                f"or pass --{part} DIR"
            )


def stage_payload(staging: Path, folders: dict[str, Path]) -> dict[str, Path]:
    """Copy the folders to `staging/{adapter,export,eval}` and write `staging/SHA256SUMS`.

    Returns the pyfunc `artifacts` mapping: each name's basename is its place under artifacts/.
    """
    artifacts: dict[str, Path] = {}
    for part, folder in folders.items():
        artifacts[part] = Path(shutil.copytree(folder, staging / part))
    artifacts["checksums"] = write_checksums(staging)
    return artifacts


def read_checksums(path: Path) -> dict[str, str]:
    """`{relative path: sha256}` from a SHA256SUMS file."""
    return parse_checksums(path.read_text())
