"""Server-side micro-batching of the text path: concurrent requests share one ONNX Runtime call.

Every `/v1/embed` request, and the text path of every `/v1/generate`, puts its prompts on one
queue. A worker thread takes the oldest waiting request, waits until `serving.batch_window_ms`
after it arrived for more (less once `serving.max_batch_rows` rows wait), then runs the
batch as one tokenizer call and one ORT call, and hands each caller its own rows. While a
batch runs, new requests queue, so under load batches form with no waiting at all.

Batching changes no output: in fixed mode a prompt's embedding depends on that prompt alone,
and ORT's CPU kernels compute each row the same way at any batch size (a test checks
concurrent responses against single-request ones bit for bit). Reference-mode text paths
attend across the batch (the reference's bug, kept in that mode), so they run each request
alone. Requests for two versions (during a hot swap) never share a batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from serving.metrics import ServingMetrics
from serving.model import ServedVersion

LOG = logging.getLogger(__name__)


@dataclass
class _Request:
    """One caller's prompts, waiting for its rows."""

    served: ServedVersion
    prompts: list[str]
    queued_at: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    rows: np.ndarray | None = None
    error: Exception | None = None


class TextPathBatcher:
    """Runs the text path for concurrent callers in shared batches (see the module doc)."""

    def __init__(self, window_ms: float, max_rows: int, metrics: ServingMetrics) -> None:
        self.window_s = window_ms / 1000.0
        self.max_rows = max_rows
        self.metrics = metrics
        self._queue: deque[_Request] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the worker thread."""
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="text-path-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the queued requests, then stop the worker."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def embed(self, served: ServedVersion, prompts: list[str]) -> np.ndarray:
        """`served`'s embeddings of `prompts`, float32 [len(prompts), tokens, width]: the same
        array, bit for bit, as `served.embed(prompts)`."""
        if not served.batch_invariant:
            return self._run_alone(served, prompts)
        request = _Request(served, list(prompts))
        with self._wakeup:
            running = self._thread is not None and not self._stopping
            if running:
                self._queue.append(request)
                self.metrics.batch_waiting.set(len(self._queue))
                self._wakeup.notify_all()
        if not running:  # not started, or shutting down: no worker to wait for
            return self._run_alone(served, prompts)
        request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.rows is not None
        return request.rows

    def _run_alone(self, served: ServedVersion, prompts: list[str]) -> np.ndarray:
        rows = served.embed(list(prompts))
        self._observe(1, len(prompts), [0.0])
        return rows

    def _work(self) -> None:
        while True:
            with self._wakeup:
                while not self._queue and not self._stopping:
                    self._wakeup.wait()
                if not self._queue:
                    return  # stopping, and nothing left to answer
                batch = self._collect()
            self._execute(batch)

    def _collect(self) -> list[_Request]:
        """Wait out the window of the oldest request (holding the lock), then take it and
        the queued requests of its version, up to `max_rows` rows."""
        first = self._queue[0]
        deadline = first.queued_at + self.window_s
        while not self._stopping:
            waiting = sum(len(r.prompts) for r in self._queue if r.served is first.served)
            remaining = deadline - time.monotonic()
            if waiting >= self.max_rows or remaining <= 0:
                break
            self._wakeup.wait(remaining)
        batch, kept, rows = [], deque(), 0
        for request in self._queue:
            fits = rows + len(request.prompts) <= self.max_rows
            if request.served is first.served and (not batch or fits):
                batch.append(request)
                rows += len(request.prompts)
            else:
                kept.append(request)
        self._queue = kept
        self.metrics.batch_waiting.set(len(kept))
        return batch

    def _execute(self, batch: list[_Request]) -> None:
        """One text-path call for `batch`; when it fails, each request runs alone, so a
        failure reaches only the request that causes it."""
        started = time.monotonic()
        prompts = [prompt for request in batch for prompt in request.prompts]
        self.metrics.batch_running.set(len(batch))
        try:
            rows = batch[0].served.embed(prompts)
        except Exception as err:
            rows, error = None, err
        finally:
            self.metrics.batch_running.set(0)
        if rows is None:
            if len(batch) == 1:
                batch[0].error = error
                batch[0].done.set()
                return
            LOG.warning("a batch of %d requests failed (%s); running each alone", len(batch), error)
            for request in batch:
                self._execute([request])
            return
        self._observe(len(batch), len(prompts), [started - r.queued_at for r in batch])
        offset = 0
        for request in batch:
            request.rows = rows[offset : offset + len(request.prompts)]
            offset += len(request.prompts)
            request.done.set()

    def _observe(self, requests: int, rows: int, queued_s: list[float]) -> None:
        self.metrics.batch_requests.observe(requests)
        self.metrics.batch_rows.observe(rows)
        for seconds in queued_s:
            self.metrics.queue_seconds.observe(seconds)
