"""Hot swap: watch the served alias, load a new version beside the old, smoke-test, swap.

The served version is one reference (`ModelSlot.current`); a request reads it once and
uses that version to the end, and a swap replaces it in a single assignment. So requests
never see a half-loaded version, and none fails during a swap. When a new version fails to
download, verify against the registry's manifest, load or pass the smoke test, or its
`gate_verdict` tag is not `passed` (an alias moved by hand), the old one keeps serving and
the error is kept for `/readyz`.
"""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from serving.metrics import ServingMetrics
from serving.model import BaseModels, ServedVersion, VersionLoadError, load_version, smoke_test
from serving.settings import ServingParams
from serving.source import VersionSource
from suradapter.config import Params

LOG = logging.getLogger(__name__)


@dataclass
class SwapError:
    """Why the latest load of a version failed."""

    version: str | None
    message: str
    at: float


class ModelSlot:
    """The served version, swapped by reference, plus what the watcher last saw."""

    def __init__(self) -> None:
        self.current: ServedVersion | None = None
        self.last_error: SwapError | None = None
        self.last_checked: float | None = None

    def swap(self, new: ServedVersion) -> ServedVersion | None:
        """Serve `new` from now on; return the version it replaces."""
        old, self.current = self.current, new
        return old


def require_passed_gates(version: str, tags: dict[str, str]) -> None:
    """Raise VersionLoadError unless the version's `gate_verdict` tag is `passed`.

    Promotion refuses such a version; this catches one whose alias was moved by hand.
    """
    verdict = tags.get("gate_verdict", "missing")
    if verdict != "passed":
        failures = tags.get("gate_failures")
        raise VersionLoadError(
            f"version {version}: its gate_verdict tag is {verdict!r}"
            + (f" ({failures})" if failures else "")
            + "; serving loads only versions whose gates passed"
        )


class VersionLoader:
    """Downloads a version into the cache folder, then verifies, loads and smoke-tests it."""

    def __init__(
        self,
        source: VersionSource,
        params: Params,
        settings: ServingParams,
        bases: BaseModels,
    ) -> None:
        self.source = source
        self.params = params
        self.settings = settings
        self.bases = bases
        self._temporary = settings.cache_dir is None
        self.cache_dir = Path(settings.cache_dir or tempfile.mkdtemp(prefix="sur-serving-"))
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    def load(self, version: str) -> ServedVersion:
        """A verified, smoke-tested version whose gates passed, ready to swap in.

        Raises on any failure (VersionLoadError for a version whose gates did not pass).
        """
        dest = self.cache_dir / f"v{version}-{uuid.uuid4().hex[:8]}"
        try:
            fetched = self.source.fetch(version, dest)
            require_passed_gates(version, fetched.tags)
            served = load_version(fetched.root, version, self.params, self.settings, self.bases)
            smoke_test(served)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        return served

    def discard(self, old: ServedVersion) -> None:
        """Delete the download folder of a version that is no longer served."""
        try:
            parts = old.root.resolve().relative_to(self.cache_dir.resolve()).parts
        except ValueError:
            return  # not one of our downloads
        if parts:
            shutil.rmtree(self.cache_dir / parts[0], ignore_errors=True)

    def close(self) -> None:
        """Remove the cache folder when it is a temporary one."""
        if self._temporary:
            shutil.rmtree(self.cache_dir, ignore_errors=True)


class AliasWatcher:
    """A daemon thread that checks `alias` every `poll_seconds` and swaps on a change."""

    def __init__(
        self,
        slot: ModelSlot,
        source: VersionSource,
        loader: VersionLoader,
        metrics: ServingMetrics,
        alias: str,
        poll_seconds: float,
        retry_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.slot = slot
        self.source = source
        self.loader = loader
        self.metrics = metrics
        self.alias = alias
        self.poll_seconds = poll_seconds
        self.retry_seconds = retry_seconds
        self.clock = clock
        self._failed: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alias-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check_once()
            except Exception:  # the watcher must outlive any one failure
                LOG.exception("alias watcher: unexpected error")
            self._stop.wait(self.poll_seconds)

    def check_once(self) -> None:
        """Read the alias once; load and swap in the version it names if that is new."""
        now = self.clock()
        try:
            version = self.source.resolve(self.alias)
        except Exception as err:
            self._fail(None, f"cannot read alias @{self.alias}: {err}")
            return
        self.slot.last_checked = now
        current = self.slot.current
        if version is None:
            if current is None:
                self._fail(None, f"no version has the alias @{self.alias} yet")
            return
        if current is not None and current.version == version:
            if self.slot.last_error is not None:  # e.g. rolled back past a failed version
                self.slot.last_error = None
            return
        failed_at = self._failed.get(version)
        if failed_at is not None and now - failed_at < self.retry_seconds:
            return
        LOG.info("alias @%s now names version %s: loading it", self.alias, version)
        try:
            new = self.loader.load(version)
        except Exception as err:
            self._failed[version] = now
            self.metrics.swaps.labels("failed").inc()
            message = str(err)
            self._fail(
                version,
                message if message.startswith("version") else f"version {version}: {message}",
            )
            LOG.exception("version %s failed to load; still serving %s", version, _name(current))
            return
        old = self.slot.swap(new)
        self._failed.pop(version, None)
        self.slot.last_error = None
        self.metrics.swaps.labels("ok").inc()
        self.metrics.now_serving(new.version, new.base_model, new.text_path.provider)
        self.loader.bases.keep_only({new.base_model})
        LOG.info("now serving version %s (was %s)", new.version, _name(old))
        if old is not None:
            self.loader.discard(old)
        settle_heap()

    def _fail(self, version: str | None, message: str) -> None:
        self.slot.last_error = SwapError(version, message, self.clock())
        LOG.warning("hot swap: %s", message)


def settle_heap() -> None:
    """Collect the old version's garbage, then exempt what is loaded now from later
    collections: the models' millions of long-lived objects would otherwise be walked by
    every full collection, a pause of a few hundred ms in the middle of requests."""
    gc.unfreeze()  # the previous version's objects may be garbage now
    gc.collect()
    gc.freeze()


def _name(served: ServedVersion | None) -> str:
    return served.version if served is not None else "nothing"
