"""The artifact contract: the files the stages write and a registered version holds, their
`SHA256SUMS`, and the lineage recorded with them (git commit, file hashes, DVC data hashes).

A registered version, as `download_artifacts("models:/sur-adapter@...")` gives it:

    <root>/MLmodel, python_env.yaml, ...   the pyfunc flavour (MLflow's own files)
    <root>/artifacts/adapter/              config.json, diffusion_pytorch_model.safetensors
    <root>/artifacts/export/               text_path.onnx, export.json, tokenizer/
    <root>/artifacts/eval/                 report.json, report.md, *.png
    <root>/artifacts/SHA256SUMS            sha256 of every file under artifacts/ (relative paths);
                                           also the version's `sha256sums` tag (`manifest`)

The stages write the same folders (`sur train`, `sur export`, `sur evaluate`). Export,
registry, flows and serving take these names from here.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Mapping
from pathlib import Path

import yaml
from diffusers.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

# File names inside each stage's output folder.
ADAPTER_CONFIG = CONFIG_NAME  # what diffusers' `save_pretrained` writes
ADAPTER_WEIGHTS = SAFETENSORS_WEIGHTS_NAME
TEXT_PATH_MODEL = "text_path.onnx"
EXPORT_REPORT_FILE = "export.json"
TOKENIZER_DIR = "tokenizer"
EVAL_REPORT_FILE = "report.json"
EVAL_REPORT_MD = "report.md"
CHECKSUMS_FILE = "SHA256SUMS"
# A registered version's folders, and paths under artifacts/ as SHA256SUMS lists them.
ARTIFACTS_DIR = "artifacts"
ADAPTER_DIR = "adapter"
EXPORT_DIR = "export"
EVAL_DIR = "eval"
ADAPTER_WEIGHTS_PATH = f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}"
EVAL_REPORT_PATH = f"{EVAL_DIR}/{EVAL_REPORT_FILE}"

DVC_LOCK = Path("dvc.lock")


def git_commit(cwd: Path | None = None) -> str:
    """Return the current git commit, or 'unknown' outside a repository."""
    result = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=cwd, check=False
    )
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes."""
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# The stages whose outputs a trained adapter is made from, and every stage with an output the
# retrain flow records: lineage tags name their dvc.lock hashes.
TRAINING_DATA_STAGES = ("prepare", "embed")
PIPELINE_STAGES = ("prepare", "embed", "train", "evaluate", "export")


def locked_stages(lock: Path = DVC_LOCK) -> dict[str, dict]:
    """The `stages:` dvc.lock records ({} without a lock file)."""
    if not lock.is_file():
        return {}
    return (yaml.safe_load(lock.read_text()) or {}).get("stages", {})


def data_lineage_tags(
    stages: tuple[str, ...], surd_source: str | None, lock: Path = DVC_LOCK
) -> dict[str, str]:
    """The data lineage dvc.lock records, as tags: `dvc.<stage>/<path>` (md5) for each output
    of `stages`, and `surd_source_hash`, the md5 of the prepare stage's dependency
    `surd_source` ('' when unknown). One read of dvc.lock ({} of outputs without one)."""
    recorded = locked_stages(lock)
    tags = {
        f"dvc.{stage}/{out['path']}": str(out.get("md5", ""))
        for stage in stages
        for out in recorded.get(stage, {}).get("outs", [])
    }
    wanted = Path(surd_source).as_posix() if surd_source else None
    deps = recorded.get("prepare", {}).get("deps", [])
    found = [dep for dep in deps if Path(dep.get("path", "")).as_posix() == wanted]
    tags["surd_source_hash"] = str(found[0].get("md5", "")) if found else ""
    return tags


def listed_files(folder: Path) -> list[str]:
    """The relative paths of every file under `folder` but its SHA256SUMS, sorted."""
    return sorted(
        path.relative_to(folder).as_posix()
        for path in Path(folder).rglob("*")
        if path.is_file() and path.name != CHECKSUMS_FILE
    )


def file_checksums(folder: Path) -> dict[str, str]:
    """`{relative path: sha256}` of every file under `folder` but its SHA256SUMS."""
    return {name: sha256_file(Path(folder) / name) for name in listed_files(folder)}


def parse_checksums(text: str) -> dict[str, str]:
    """`{relative path: sha256}` from SHA256SUMS text (sha256sum format)."""
    listed = {}
    for line in text.splitlines():
        digest, _, name = line.partition("  ")
        if name:
            listed[name] = digest
    return listed


def write_checksums(folder: Path) -> Path:
    """Write `SHA256SUMS` (sha256sum format) for every file under `folder`; return its path."""
    lines = [f"{digest}  {name}" for name, digest in file_checksums(folder).items()]
    target = Path(folder) / CHECKSUMS_FILE
    target.write_text("\n".join(lines) + "\n")
    return target


def checksum_problems(
    folder: Path, listed: Mapping[str, str], record: str | None = None
) -> list[str]:
    """Each file under `folder` missing from, differing from or absent from `listed`
    (`{relative path: sha256}`), as `path: what`; `record` names the list in the messages
    (none: the folder's own SHA256SUMS). Each file is hashed once."""
    problems = []
    for name, digest in listed.items():
        path = Path(folder) / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{name}: sha256 differs" + (f" from {record}" if record else ""))
    unlisted = sorted(set(listed_files(folder)) - set(listed))
    problems += [
        f"{name}: not in {record}" if record else f"{name}: not listed" for name in unlisted
    ]
    return problems


def verify_checksums(folder: Path) -> list[str]:
    """Return the problems found against `SHA256SUMS` (empty when every file matches)."""
    return checksum_problems(folder, parse_checksums((Path(folder) / CHECKSUMS_FILE).read_text()))
