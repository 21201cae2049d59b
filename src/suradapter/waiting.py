"""Poll until something holds, with a deadline: the one "wait until ready" loop of the project.

`wait_until` sleeps between attempts; `wait_until_async` is its twin for code on an event
loop. Both return the first truthy result of `predicate`, raise TimeoutError naming `what`
at the deadline, and RuntimeError as soon as `give_up()` names a reason (a process exited).
`ready_process` runs a server process for a block, once it answers.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T | None],
    timeout_s: float,
    what: str,
    *,
    interval_s: float = 0.1,
    retry_on: tuple[type[BaseException], ...] = (),
    give_up: Callable[[], str | None] | None = None,
    detail: Callable[[], str] | None = None,
) -> T:
    """The first truthy value of `predicate()`, polled every `interval_s`.

    Exceptions in `retry_on` count as "not yet" (the last one is chained to the error raised
    at the end). Raises TimeoutError after `timeout_s`, or RuntimeError with the reason once
    `give_up()` returns one; `detail()` (a log tail, say) is appended to either message.
    """
    attempts = _attempts(predicate, timeout_s, what, retry_on, give_up, detail)
    while not (value := next(attempts)):
        time.sleep(interval_s)
    return value


async def wait_until_async(
    predicate: Callable[[], T | None],
    timeout_s: float,
    what: str,
    *,
    interval_s: float = 0.1,
    retry_on: tuple[type[BaseException], ...] = (),
    give_up: Callable[[], str | None] | None = None,
    detail: Callable[[], str] | None = None,
) -> T:
    """`wait_until` for a coroutine: the event loop runs on between attempts."""
    attempts = _attempts(predicate, timeout_s, what, retry_on, give_up, detail)
    while not (value := next(attempts)):
        await asyncio.sleep(interval_s)
    return value


@contextmanager
def ready_process(
    command: Sequence[str],
    log: Path,
    ready: Callable[[], object],
    timeout_s: float,
    what: str,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    retry_on: tuple[type[BaseException], ...] = (OSError,),
    interval_s: float = 0.3,
    stop_timeout_s: float = 20.0,
) -> Iterator[subprocess.Popen]:
    """Run `command` (stdout and stderr to `log`) for the block, entered once `ready()` holds.

    Raises RuntimeError (its exit code) if it exits first, TimeoutError after `timeout_s`,
    either with the log's tail. On leaving, the process is terminated (killed if it does not
    stop within `stop_timeout_s`).
    """
    with Path(log).open("wb") as out:
        process = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=dict(env or os.environ),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(
                ready,
                timeout_s,
                what,
                interval_s=interval_s,
                retry_on=retry_on,
                give_up=lambda: (
                    None if process.poll() is None else f"exit code {process.returncode}"
                ),
                detail=lambda: f"log {log}:\n{Path(log).read_text(errors='replace')[-3000:]}",
            )
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=stop_timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _attempts(
    predicate: Callable[[], T | None],
    timeout_s: float,
    what: str,
    retry_on: tuple[type[BaseException], ...],
    give_up: Callable[[], str | None] | None,
    detail: Callable[[], str] | None,
) -> Iterator[T | None]:
    """Each attempt's result; a falsy one past the deadline, or once `give_up` names a reason,
    raises instead."""
    deadline = time.monotonic() + timeout_s
    while True:
        error: BaseException | None = None
        try:
            value = predicate()
        except retry_on as err:
            value, error = None, err
        if not value:
            if give_up is not None and (reason := give_up()) is not None:
                message = f"gave up waiting for {what}: {reason}"
                raise RuntimeError(_with_detail(message, detail)) from error
            if time.monotonic() >= deadline:
                message = f"timed out waiting for {what} after {timeout_s:g} s"
                raise TimeoutError(_with_detail(message, detail)) from error
        yield value


def _with_detail(message: str, detail: Callable[[], str] | None) -> str:
    return f"{message}\n{detail()}" if detail else message
