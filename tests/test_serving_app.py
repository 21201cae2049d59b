"""`serving` parts that need no registry: API keys, the `serving:` params, the watcher's
bookkeeping, the micro-batcher, and the app's error responses (through FastAPI's TestClient)."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from serving.auth import ApiKeyError, key_matches, load_api_keys
from serving.batcher import TextPathBatcher
from serving.metrics import ServingMetrics
from serving.model import VersionLoadError
from serving.settings import ServingParams, serving_params
from serving.swap import AliasWatcher, ModelSlot, require_passed_gates
from suradapter.config import Params
from suradapter.registry import FetchedVersion
from suradapter.waiting import wait_until_async

KEY = "unit-key-0123456789abcdef"
HUNG_S = 60.0  # a wait's limit here only stops a hung test; it decides nothing


def test_api_keys_come_from_the_env_list_and_the_file(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# ops keys\nfile-key-0123456789abcd  # rotated 2026-11\n\n")
    environ = {"SUR_API_KEYS": f" {KEY} ,,", "SUR_API_KEYS_FILE": str(keys)}
    loaded = load_api_keys(environ)
    assert loaded == (KEY.encode(), b"file-key-0123456789abcd")
    assert key_matches(KEY, loaded) and key_matches("file-key-0123456789abcd", loaded)
    assert not key_matches(KEY[:-1], loaded) and not key_matches("", loaded)
    assert not key_matches("clé-non-ascii-0123456789", loaded)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({}, "no API key configured"),
        ({"SUR_API_KEYS": "short"}, "shorter than 16"),
        ({"SUR_API_KEYS_FILE": "/nonexistent/keys"}, "no such file"),
    ],
)
def test_unusable_api_keys_fail_with_a_clear_error(environ, message):
    with pytest.raises(ApiKeyError, match=message):
        load_api_keys(environ)


def test_serving_params_default_and_name_a_bad_key():
    assert serving_params(Params()) == ServingParams()
    custom = Params.model_validate({"serving": {"limits": {"max_steps": 4}}})
    assert serving_params(custom).limits.max_steps == 4
    with pytest.raises(ValidationError, match=r"max_stepz"):
        Params.model_validate({"serving": {"limits": {"max_stepz": 4}}})


class FlakySource:
    """An alias that can be read or not; versions that never load."""

    def __init__(self) -> None:
        self.version: str | None = "7"
        self.reachable = True

    def resolve(self, alias: str) -> str | None:
        if not self.reachable:
            raise ConnectionError("tracking server down")
        return self.version

    def fetch(self, version: str, dest: Path) -> FetchedVersion:
        raise AssertionError("the loader is replaced in these tests")


class FailingLoader:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def load(self, version: str):
        self.calls.append(version)
        raise RuntimeError("sha256 differs: artifacts/export/text_path.onnx")


def test_a_failed_version_is_retried_only_after_retry_seconds():
    slot, source, loader = ModelSlot(), FlakySource(), FailingLoader()
    now = [1000.0]
    watcher = AliasWatcher(
        slot, source, loader, ServingMetrics(), "production", 1.0, 60.0, clock=lambda: now[0]
    )
    watcher.check_once()
    assert loader.calls == ["7"] and slot.current is None
    assert slot.last_error.message == "version 7: sha256 differs: artifacts/export/text_path.onnx"
    now[0] += 30
    watcher.check_once()
    assert loader.calls == ["7"]  # not before retry_seconds
    now[0] += 31
    watcher.check_once()
    assert loader.calls == ["7", "7"]
    source.reachable = False
    watcher.check_once()
    assert "cannot read alias @production: tracking server down" in slot.last_error.message


class LoadingLoader:
    """Loads any version as a bare record of it; keeps every base."""

    class Bases:
        def keep_only(self, model_ids: set[str]) -> None:
            pass

    bases = Bases()

    def load(self, version: str):
        text_path = SimpleNamespace(provider="cpu")
        return SimpleNamespace(version=version, base_model="tiny", text_path=text_path)

    def discard(self, old) -> None:
        pass


def test_after_a_swap_the_loaded_heap_is_frozen_out_of_later_collections():
    slot, source = ModelSlot(), FlakySource()
    watcher = AliasWatcher(slot, source, LoadingLoader(), ServingMetrics(), "production", 1, 60)
    gc.unfreeze()
    try:
        watcher.check_once()
        assert slot.current.version == "7"
        assert gc.get_freeze_count() > 0  # full collections no longer walk the loaded models
    finally:
        gc.unfreeze()


def test_only_a_version_whose_gates_passed_may_serve():
    require_passed_gates("3", {"gate_verdict": "passed"})
    with pytest.raises(VersionLoadError, match=r"^version 4: its gate_verdict tag is 'failed' "):
        require_passed_gates("4", {"gate_verdict": "failed", "gate_failures": "gate x failed"})
    with pytest.raises(VersionLoadError, match="gate_verdict tag is 'missing'"):
        require_passed_gates("5", {})


class ExplodingVersion:
    """A served version whose every call fails with an internal detail in the message."""

    version = "9"
    batch_invariant = True

    def embed(self, prompts: list[str]):
        raise RuntimeError("secret detail: /srv/models/v9/text_path.onnx is corrupt")


def test_not_ready_then_an_internal_error_is_a_generic_500(tmp_path, caplog):
    from serving.app import create_app

    source = FlakySource()
    source.version = None
    settings = ServingParams(cache_dir=str(tmp_path / "cache"))
    app = create_app(Params(), settings, (KEY.encode(),), source)
    # the 500 comes back as a response, as a client sees it, not as the exception re-raised
    with TestClient(app, headers={"X-API-Key": KEY}, raise_server_exceptions=False) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        waiting = client.post("/v1/embed", json={"prompts": ["a"]})
        assert waiting.status_code == 503 and "/readyz" in waiting.json()["detail"]
        app.state.slot.current = ExplodingVersion()
        failed = client.post("/v1/embed", json={"prompts": ["a"]})
    assert failed.status_code == 500
    body = failed.json()
    assert body["detail"] == "internal server error" and len(body["request_id"]) == 32
    assert "secret" not in failed.text and "Traceback" not in failed.text
    logged = [r for r in caplog.records if body["request_id"] in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None  # the log keeps the traceback
    assert "secret detail" in str(logged[0].exc_info[1])


class NumberedVersion:
    """A served version whose embedding of prompt "n" is n; it records each call's prompts and
    holds the first call until `release` is set."""

    def __init__(self, version: str, batch_invariant: bool = True) -> None:
        self.version = version
        self.batch_invariant = batch_invariant
        self.calls: list[list[str]] = []
        self.release = threading.Event()

    def embed(self, prompts: list[str]) -> np.ndarray:
        self.calls.append(list(prompts))
        if len(self.calls) == 1:
            self.release.wait(timeout=60)
        if "bad" in prompts:
            raise ValueError("this prompt cannot be embedded")
        return np.array([float(p) for p in prompts], dtype=np.float32).reshape(-1, 1, 1)


def gauge_value(metrics: ServingMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


def gauge_is(metrics: ServingMetrics, name: str, value: float) -> Callable[[], bool]:
    """A predicate for `wait_until_async`: the gauge `name` is at `value`."""
    return lambda: gauge_value(metrics, name) == value


async def queue_behind_a_held_call(batcher, first, requests, sync=()):
    """Submit `first` (its call is held by its version), then `requests`, which queue behind
    it (those whose index is in `sync` through the blocking `embed`, from a thread); return
    the tasks in submission order."""
    metrics = batcher.metrics
    tasks = [asyncio.create_task(batcher.embed_async(*first))]
    held = gauge_is(metrics, "sur_text_path_running", 1)
    await wait_until_async(held, HUNG_S, "the held call", interval_s=0.01)
    for index, (served, prompts) in enumerate(requests):
        call = (
            asyncio.to_thread(batcher.embed, served, prompts)
            if index in sync
            else batcher.embed_async(served, prompts)
        )
        tasks.append(asyncio.create_task(call))
        queued = index + 1
        queue = gauge_is(metrics, "sur_text_path_waiting", queued)
        await wait_until_async(queue, HUNG_S, f"{queued} queued requests", interval_s=0.01)
    return tasks


def batched(max_rows: int, scenario) -> TextPathBatcher:
    """Run `scenario(batcher)` on an event loop with a started batcher; return the batcher."""
    batcher = TextPathBatcher(window_ms=0.0, max_rows=max_rows, metrics=ServingMetrics())

    async def main() -> None:
        batcher.start()
        try:
            await scenario(batcher)
        finally:
            batcher.stop()

    asyncio.run(main())
    return batcher


def test_queued_requests_share_a_call_within_max_rows_and_versions_never_mix():
    a, b = NumberedVersion("1"), NumberedVersion("2")
    b.release.set()
    first = (a, ["0"])
    requests = [(a, ["1", "2"]), (b, ["3"]), (a, ["4", "5", "6"]), (a, ["7"]), (a, ["8"])]
    results = []

    async def scenario(batcher):
        tasks = await queue_behind_a_held_call(batcher, first, requests, sync={1, 3})
        a.release.set()
        results.extend(await asyncio.gather(*tasks))

    metrics = batched(4, scenario).metrics.registry
    # oldest first; a later request joins while its rows fit; version 2 never joins version 1
    assert a.calls == [["0"], ["1", "2", "7", "8"], ["4", "5", "6"]]
    assert b.calls == [["3"]]
    for (_, prompts), rows in zip([first, *requests], results, strict=True):
        assert rows.ravel().tolist() == [float(p) for p in prompts]
    assert metrics.get_sample_value("sur_text_path_batch_requests_count") == 4
    assert metrics.get_sample_value("sur_text_path_batch_requests_sum") == 6
    assert metrics.get_sample_value("sur_text_path_batch_rows_sum") == 9
    assert metrics.get_sample_value("sur_text_path_queue_seconds_count") == 6


def test_a_failing_batch_fails_only_the_request_that_causes_it():
    served = NumberedVersion("1")
    results = []

    async def scenario(batcher):
        requests = [(served, ["1"]), (served, ["bad"]), (served, ["2", "3"])]
        tasks = await queue_behind_a_held_call(batcher, (served, ["0"]), requests)
        served.release.set()
        results.extend(await asyncio.gather(*tasks, return_exceptions=True))

    batched(16, scenario)
    assert [r.ravel().tolist() for r in results[:2]] == [[0.0], [1.0]]
    assert isinstance(results[2], ValueError) and "cannot be embedded" in str(results[2])
    assert results[3].ravel().tolist() == [2.0, 3.0]
    assert served.calls == [["0"], ["1", "bad", "2", "3"], ["1"], ["bad"], ["2", "3"]]


def test_a_reference_mode_version_is_never_batched_and_a_stopped_batcher_runs_requests_alone():
    reference = NumberedVersion("1", batch_invariant=False)
    reference.release.set()
    results = []

    async def scenario(batcher):
        results.append(await batcher.embed_async(reference, ["4", "5"]))
        assert gauge_value(batcher.metrics, "sur_text_path_waiting") == 0

    batcher = batched(16, scenario)
    assert results[0].ravel().tolist() == [4.0, 5.0]
    fixed = NumberedVersion("2")
    fixed.release.set()
    assert batcher.embed(fixed, ["6"]).ravel().tolist() == [6.0]  # after stop: runs alone
    assert reference.calls == [["4", "5"]] and fixed.calls == [["6"]]
