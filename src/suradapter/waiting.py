"""Poll until something holds, with a deadline: the one "wait until ready" loop of the project.

`wait_until` sleeps between attempts; `wait_until_async` is its twin for code on an event
loop. Both return the first truthy result of `predicate`, raise TimeoutError naming `what`
at the deadline, and RuntimeError as soon as `give_up()` names a reason (a process exited).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
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
