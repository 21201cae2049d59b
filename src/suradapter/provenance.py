"""Lineage facts recorded with every artefact: git commit, file hashes, DVC data hashes."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import yaml

DVC_LOCK = Path("dvc.lock")


def git_commit(cwd: Path | None = None) -> str:
    """Return the current git commit, or 'unknown' outside a repository."""
    result = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=cwd, check=False
    )
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dvc_output_hashes(stages: tuple[str, ...], lock: Path = DVC_LOCK) -> dict[str, str]:
    """`{stage/path: md5}` of the outputs of `stages` recorded in dvc.lock ({} without one)."""
    if not lock.is_file():
        return {}
    recorded = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {
        f"{stage}/{out['path']}": out.get("md5", "")
        for stage in stages
        for out in recorded.get(stage, {}).get("outs", [])
    }


CHECKSUMS_FILE = "SHA256SUMS"


def write_checksums(folder: Path) -> Path:
    """Write `SHA256SUMS` (sha256sum format) for every file under `folder`; return its path."""
    lines = [
        f"{sha256_file(path)}  {path.relative_to(folder).as_posix()}"
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != CHECKSUMS_FILE
    ]
    target = folder / CHECKSUMS_FILE
    target.write_text("\n".join(lines) + "\n")
    return target


def verify_checksums(folder: Path) -> list[str]:
    """Return the problems found against `SHA256SUMS` (empty when every file matches)."""
    listed = {}
    for line in (folder / CHECKSUMS_FILE).read_text().splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
    problems = [
        f"{name}: missing" if not (folder / name).is_file() else f"{name}: sha256 differs"
        for name, digest in listed.items()
        if not (folder / name).is_file() or sha256_file(folder / name) != digest
    ]
    present = {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != CHECKSUMS_FILE
    }
    problems += [f"{name}: not listed" for name in sorted(present - listed.keys())]
    return problems
