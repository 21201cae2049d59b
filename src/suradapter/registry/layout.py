"""Checking and staging the folders a registered version is made of (names: `provenance`)."""

from __future__ import annotations

import shutil
from pathlib import Path

from suradapter.provenance import (
    ADAPTER_CONFIG,
    ADAPTER_DIR,
    ADAPTER_WEIGHTS,
    EVAL_DIR,
    EVAL_REPORT_FILE,
    EXPORT_DIR,
    EXPORT_REPORT_FILE,
    TEXT_PATH_MODEL,
    TOKENIZER_DIR,
    write_checksums,
)
from suradapter.registry.errors import RegistryError

# What each input folder must hold, and the command that writes it.
REQUIRED_FILES = {
    ADAPTER_DIR: ((ADAPTER_CONFIG, ADAPTER_WEIGHTS), "sur train"),
    EXPORT_DIR: ((TEXT_PATH_MODEL, EXPORT_REPORT_FILE, TOKENIZER_DIR), "sur export"),
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
