"""The trust anchor of a version's files: its SHA256SUMS, recorded in the registry itself.

`artifacts/SHA256SUMS` lies in the same S3 prefix as the files it lists, so whoever can
rewrite a file there can rewrite SHA256SUMS to match. At registration the manifest is
therefore also stored as the model version's `sha256sums` tag, in the tracking server's
database, and every reader (fetch, serving through fetch, the pyfunc) checks the files it
downloaded against that tag, not against the copy beside them.
"""

from __future__ import annotations

from pathlib import Path

from suradapter.provenance import CHECKSUMS_FILE, checksum_problems, parse_checksums
from suradapter.registry.errors import RegistryError

MANIFEST_TAG = "sha256sums"
MAX_MANIFEST_CHARS = 100_000  # MLflow's limit on a model version tag value


def manifest_tag(checksums: Path) -> str:
    """The `sha256sums` tag value for the SHA256SUMS file `checksums`. Raises RegistryError
    when it is longer than a tag may be."""
    text = checksums.read_text()
    if len(text) > MAX_MANIFEST_CHARS:
        raise RegistryError(
            f"{checksums} is {len(text)} characters, more than the {MAX_MANIFEST_CHARS} a "
            "registry tag holds: the version has too many files to anchor in the registry"
        )
    return text


def recorded_manifest(tags: dict[str, str], name: str, version: str) -> dict[str, str]:
    """The manifest a version's tags record. Raises RegistryError when it has none."""
    text = tags.get(MANIFEST_TAG)
    listed = parse_checksums(text or "")
    if not listed:
        raise RegistryError(
            f"version {version} of {name} has no '{MANIFEST_TAG}' tag, so its files cannot be "
            "checked against the registry (it was registered by an older `sur register`): "
            "register its adapter, export and report again"
        )
    return listed


def manifest_problems(artifacts: Path, recorded: dict[str, str]) -> list[str]:
    """Each file under `artifacts` that differs from, is missing from or is not in the
    registry's `recorded` manifest, as `path: what` (empty when all match)."""
    problems = checksum_problems(artifacts, recorded, "the registry's record")
    sums = artifacts / CHECKSUMS_FILE
    if not sums.is_file():
        problems.append(f"{CHECKSUMS_FILE}: missing")
    elif parse_checksums(sums.read_text()) != recorded:
        problems.append(f"{CHECKSUMS_FILE}: differs from the registry's record")
    return problems
