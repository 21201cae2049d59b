"""Detached service processes: start with a log file, pid records that prove ownership, stop.

A pid record holds the pid, its start time and its command line. A pid counts as ours
only while all three still match, so a stale record never makes us signal a stranger.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from suradapter.atomic import atomic_write_bytes
from suradapter.stack.settings import LOOPBACK
from suradapter.waiting import wait_until

CREATE_TIME_TOLERANCE_S = 1.0


@dataclass(frozen=True)
class PidRecord:
    """What `up` wrote about a service it started (no secrets)."""

    service: str
    pid: int
    create_time: float
    cmdline: list[str]
    url: str
    fingerprint: str
    log: str
    log_offset: int
    auth: bool = False


def read_record(path: Path) -> PidRecord | None:
    """The pid record at `path`, or None when there is none (or it is unreadable)."""
    try:
        return PidRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_record(path: Path, record: PidRecord) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(asdict(record), indent=2).encode())


def owned_process(record: PidRecord) -> psutil.Process | None:
    """The live process of `record`, or None if that pid is gone or now belongs to another."""
    try:
        process = psutil.Process(record.pid)
        if abs(process.create_time() - record.create_time) > CREATE_TIME_TOLERANCE_S:
            return None
        if process.cmdline() != record.cmdline or process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def start_detached(
    command: list[str], env: dict[str, str], log_path: Path, cwd: Path
) -> tuple[subprocess.Popen, int]:
    """Start `command` in its own session, output appended to `log_path`.

    Returns the process and the log offset where its output begins. It outlives its parent.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {command[0]}\n".encode())
        log.flush()
        offset = log.tell()
        process = subprocess.Popen(
            command,
            env={**os.environ, **env},
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process, offset


def settled_identity(
    pid: int, command: list[str], timeout: float = 5.0
) -> tuple[float, list[str]] | None:
    """(start time, command line) of `pid` once it shows `command`; None if it died first.

    Right after exec, /proc/<pid>/cmdline can still be empty; a script shows its
    interpreter first; a launcher (setpriv) shows itself until it execs `command`. So this
    waits until the command line is `command`'s args after at most an interpreter and a path.
    """
    args = command[1:]

    def identity(settled_only: bool = True) -> tuple[float, list[str]] | None:
        process = psutil.Process(pid)
        cmdline = process.cmdline()
        lead = len(cmdline) - len(args)
        settled = 1 <= lead <= 2 and cmdline[lead:] == args
        return (process.create_time(), cmdline) if settled or not settled_only else None

    try:
        try:
            return wait_until(identity, timeout, f"pid {pid} to show {args}", interval_s=0.01)
        except TimeoutError:
            return identity(settled_only=False)  # what it shows by now
    except psutil.NoSuchProcess:
        return None


def stop_process_tree(
    process: psutil.Process, timeout: float = 20.0, leader_signal: int | None = None
) -> None:
    """SIGTERM `process`, its process group and its descendants; SIGKILL what outlives `timeout`.

    `leader_signal` first goes to `process` alone, for a server that stops its own children
    cleanly on it (PostgreSQL's SIGINT: a fast shutdown); the rest follows if it is still
    running after `timeout`.
    """
    if leader_signal is not None:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(leader_signal)
            with contextlib.suppress(psutil.TimeoutExpired):
                process.wait(timeout)
    try:
        members = [process, *process.children(recursive=True)]
        group = os.getpgid(process.pid)
    except (psutil.NoSuchProcess, ProcessLookupError):
        return
    if group == process.pid:  # its own session (start_detached): the group is all ours
        _signal_group(group, signal.SIGTERM)
    for member in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(members, timeout=timeout)
    if alive and group == process.pid:
        _signal_group(group, signal.SIGKILL)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(alive, timeout=5)


def _signal_group(group: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signum)


def port_in_use(port: int, host: str = LOOPBACK) -> bool:
    """True when something listens on (or holds) `host:port`."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def port_owner(port: int) -> str | None:
    """'pid N (name)' of the process listening on `port`, when it can be seen."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return None
    for connection in connections:
        if connection.laddr and connection.laddr.port == port and connection.pid:
            try:
                return f"pid {connection.pid} ({psutil.Process(connection.pid).name()})"
            except psutil.NoSuchProcess:
                return f"pid {connection.pid}"
    return None


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when GET `url` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


def log_tail(path: Path, offset: int = 0, lines: int = 40) -> str:
    """The last `lines` lines of `path` written after byte `offset`."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])
