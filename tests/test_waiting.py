"""`wait_until` and `ready_process`: what they return, and each way they stop (no clock is
asserted on)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

import pytest

from suradapter.waiting import ready_process, wait_until, wait_until_async


def attempts(*outcomes: object) -> tuple[Callable[[], object], list[int]]:
    """A predicate giving `outcomes` in turn (an exception is raised), then the last forever;
    and the list its calls are counted in."""
    calls: list[int] = []

    def predicate() -> object:
        outcome = outcomes[min(len(calls), len(outcomes) - 1)]
        calls.append(1)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return predicate, calls


def test_it_returns_the_first_truthy_value():
    predicate, calls = attempts(None, False, 0, "", {"ready": True})
    assert wait_until(predicate, 5, "readiness", interval_s=0) == {"ready": True}
    assert len(calls) == 5


def test_it_times_out_naming_what_it_waited_for_with_the_detail():
    predicate, _ = attempts(None)
    with pytest.raises(TimeoutError, match=r"^timed out waiting for the widget after 0.2 s\nlog"):
        wait_until(predicate, 0.2, "the widget", interval_s=0.01, detail=lambda: "log")


def test_give_up_stops_it_at_once_with_the_reason():
    predicate, calls = attempts(None)
    reasons = iter([None, None, "the process exited with code 1"])
    with pytest.raises(RuntimeError) as raised:
        wait_until(predicate, 60, "the server", interval_s=0, give_up=lambda: next(reasons))
    assert str(raised.value) == "gave up waiting for the server: the process exited with code 1"
    assert len(calls) == 3


def test_exceptions_in_retry_on_are_not_yet_and_others_propagate():
    refused = ConnectionRefusedError("refused")
    predicate, calls = attempts(refused, refused, 7)
    assert wait_until(predicate, 60, "a port", interval_s=0, retry_on=(OSError,)) == 7
    assert len(calls) == 3
    predicate, calls = attempts(refused, ValueError("bad answer"), 7)
    with pytest.raises(ValueError, match="bad answer"):
        wait_until(predicate, 60, "a port", interval_s=0, retry_on=(OSError,))
    assert len(calls) == 2


def test_the_last_retried_exception_is_the_cause_of_the_timeout():
    refused = ConnectionRefusedError("refused")
    predicate, _ = attempts(refused)
    with pytest.raises(TimeoutError) as raised:
        wait_until(predicate, 0.2, "a port", interval_s=0.01, retry_on=(OSError,))
    assert raised.value.__cause__ is refused


def test_the_async_twin_returns_the_value_and_times_out_alike():
    predicate, calls = attempts(None, None, "up")
    assert asyncio.run(wait_until_async(predicate, 5, "the loop", interval_s=0)) == "up"
    assert len(calls) == 3
    never, _ = attempts(None)
    with pytest.raises(TimeoutError, match="the loop"):
        asyncio.run(wait_until_async(never, 0.2, "the loop", interval_s=0.01))


def test_ready_process_yields_a_ready_process_and_stops_it_after(tmp_path):
    flag = tmp_path / "ready"
    script = f"import pathlib, time; pathlib.Path({str(flag)!r}).touch(); time.sleep(600)"
    command = [sys.executable, "-c", script]
    with ready_process(command, tmp_path / "log", flag.exists, 60, "the flag") as process:
        assert process.poll() is None
    assert process.returncode is not None  # stopped on leaving the block


def test_ready_process_that_exits_first_names_its_exit_code_and_log(tmp_path):
    command = [sys.executable, "-c", "print('no port for me'); raise SystemExit(3)"]
    server = ready_process(command, tmp_path / "log", lambda: False, 60, "a server")
    with pytest.raises(RuntimeError, match=r"(?s)exit code 3.*no port for me"), server:
        pass
