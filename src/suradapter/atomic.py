"""Crash-safe writes: build output beside its target, then rename it into place.

A folder is replaced in two renames (target -> backup, staging -> target). If a crash lands
between them, `recover_dir` restores the backup on the next run, so readers only ever see a
complete old or a complete new folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

BACKUP_SUFFIX = ".previous"
STAGING_SUFFIX = ".staging"


def staging_dir(target: Path) -> Path:
    """Return a fresh, empty staging folder beside `target` (an old one is removed)."""
    staging = target.with_name(f"{target.name}{STAGING_SUFFIX}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def recover_dir(target: Path) -> None:
    """Undo a replacement interrupted between its two renames; drop stale staging folders."""
    backup = target.with_name(target.name + BACKUP_SUFFIX)
    if backup.exists():
        if target.exists():
            shutil.rmtree(backup)
        else:
            backup.rename(target)
    for stale in target.parent.glob(f"{target.name}{STAGING_SUFFIX}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def replace_dir(staging: Path, target: Path) -> None:
    """Move the complete `staging` folder to `target`, replacing what was there."""
    backup = target.with_name(target.name + BACKUP_SUFFIX)
    if target.exists():
        target.rename(backup)
    staging.rename(target)
    shutil.rmtree(backup, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True, mode: int = 0o666) -> None:
    """Write `data` to `path` through a temp file and a rename (fsync'd when `durable`).

    The file is created with `mode` (less the umask; 0o600: the owner only), so it is never
    readable by others, not even while it is being written.
    """
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temp.unlink(missing_ok=True)
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    temp.replace(path)


def remove_dead_temp_files(folder: Path) -> None:
    """Remove the temp files of `atomic_write_bytes` whose writer died before its rename.

    A live writer's file (its pid still runs on this host) is left alone.
    """
    for temp in folder.glob(".*.tmp-*"):
        if not _writer_alive(temp):
            temp.unlink(missing_ok=True)


def _writer_alive(temp: Path) -> bool:
    """Whether the process that owns temp file `.<name>.tmp-<pid>` still runs (on this host)."""
    try:
        os.kill(int(temp.name.rsplit("-", 1)[1]), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
