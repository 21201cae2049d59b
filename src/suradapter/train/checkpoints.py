"""Resumable training state shared by the trainers: numbered Accelerate checkpoints and a log.

A checkpoint folder counts only once its `done` marker exists, so a run killed while saving
resumes from the previous complete one. The JSON-lines log is rewritten atomically and cut
back to the resumed step, so it never holds steps that will be redone.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from accelerate import Accelerator

from suradapter.atomic import atomic_write_bytes

CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)$")
DONE_MARKER = "done"
KEEP_CHECKPOINTS = 2
FINGERPRINT_FILE = "run_fingerprint.json"


def run_fingerprint(settings: dict) -> str:
    """sha256 of the JSON of everything that determines a run's result."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def claim_checkpoints(folder: Path, fingerprint: str, settings: dict) -> bool:
    """Make `folder` hold checkpoints of the run `fingerprint` only.

    Checkpoints written under other settings (params or data changed since) are removed so
    that they are never resumed into a different run. Returns True when some were removed.
    """
    record = folder / FINGERPRINT_FILE
    stale = record.is_file() and json.loads(record.read_text()).get("fingerprint") != fingerprint
    stale = stale or (not record.is_file() and any(folder.glob("checkpoint-*")))
    if stale:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    claim = json.dumps({"fingerprint": fingerprint, "settings": settings}, default=str)
    atomic_write_bytes(record, claim.encode())
    return stale


def _numbered(folder: Path) -> list[tuple[int, Path]]:
    return sorted(
        (int(match.group(1)), path)
        for path in folder.glob("checkpoint-*")
        if (match := CHECKPOINT_PATTERN.search(path.name))
    )


def latest_checkpoint(folder: Path) -> tuple[int, Path | None]:
    """Return (step, path) of the newest complete checkpoint in `folder`, or (0, None)."""
    complete = [(step, path) for step, path in _numbered(folder) if (path / DONE_MARKER).is_file()]
    return complete[-1] if complete else (0, None)


def save_checkpoint(
    accelerator: Accelerator,
    folder: Path,
    step: int,
    save_extra: Callable[[Path], None] | None = None,
) -> None:
    """Save state into checkpoint-<step> (plus `save_extra(folder)` on the main process),
    mark it complete, keep only the newest ones."""
    target = folder / f"checkpoint-{step}"
    accelerator.save_state(str(target))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if save_extra is not None:
            save_extra(target)
        (target / DONE_MARKER).write_text(str(step))
        for _, old in _numbered(folder)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)


def read_log(path: Path, up_to: int) -> list[dict]:
    """The logged records with step <= `up_to` (what a resumed run keeps)."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [record for record in records if record["step"] <= up_to]


def write_log(path: Path, log: list[dict]) -> None:
    """Rewrite the JSON-lines log atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(record) + "\n" for record in log)
    atomic_write_bytes(path, text.encode(), durable=False)
