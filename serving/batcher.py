"""Server-side micro-batching of the text path: concurrent requests share one ONNX Runtime call.

Every `/v1/embed` request, and the text path of every `/v1/generate`, queues its prompts on
the app's event loop. A batch starts `serving.batch_window_ms` after the oldest waiting
request arrived (at once when `serving.max_batch_rows` prompts wait) and runs, in one
dedicated thread, as one tokenizer call and one ORT call; each caller then gets its own
rows. While a batch runs the next one forms, so under load no request waits for the window.
The queue lives on the event loop: a request costs no thread and no lock, and a batch one
hand-off to its thread and one back.

Batching changes no output: in fixed mode a prompt's embedding depends on that prompt alone,
and ORT's CPU kernels compute each row the same way at any batch size (a test checks
concurrent responses against single-request ones bit for bit). Reference-mode text paths
attend across the batch (the reference's bug, kept in that mode), so they run each request
alone. Requests for two versions (during a hot swap) never share a batch.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from starlette.concurrency import run_in_threadpool

from serving.metrics import ServingMetrics
from serving.model import ServedVersion

LOG = logging.getLogger(__name__)


@dataclass
class _Request:
    """One caller's prompts and the future its rows go to."""

    served: ServedVersion
    prompts: list[str]
    rows: asyncio.Future[np.ndarray]
    queued_at: float = field(default_factory=time.monotonic)


class TextPathBatcher:
    """Runs the text path for concurrent callers in shared batches (see the module doc)."""

    def __init__(self, window_ms: float, max_rows: int, metrics: ServingMetrics) -> None:
        self.window_s = window_ms / 1000.0
        self.max_rows = max_rows
        self.metrics = metrics
        self._waiting: deque[_Request] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False

    def start(self) -> None:
        """Start batching on the running event loop (the app's lifespan calls it)."""
        self._loop = asyncio.get_running_loop()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="text-path-batch")

    def stop(self) -> None:
        """Stop batching (on the loop): the running batch finishes, requests still waiting
        for one get an error, later requests run alone."""
        self._loop = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for request in self._waiting:
            if not request.rows.done():
                request.rows.set_exception(RuntimeError("the server is shutting down"))
        self._waiting.clear()
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None

    async def embed_async(self, served: ServedVersion, prompts: list[str]) -> np.ndarray:
        """`served`'s embeddings of `prompts`, float32 [len(prompts), tokens, width]: the same
        array, bit for bit, as `served.embed(prompts)`. Call it on the batcher's loop."""
        loop = self._loop
        if loop is None or not served.batch_invariant:
            return await run_in_threadpool(self._run_alone, served, prompts)
        request = _Request(served, list(prompts), loop.create_future())
        self._waiting.append(request)
        self.metrics.batch_waiting.set(len(self._waiting))
        self._schedule()
        return await request.rows

    def embed(self, served: ServedVersion, prompts: list[str]) -> np.ndarray:
        """`embed_async` for a caller on another thread (a sync endpoint); blocks it."""
        loop = self._loop
        if loop is None or not served.batch_invariant:
            return self._run_alone(served, prompts)
        return asyncio.run_coroutine_threadsafe(self.embed_async(served, prompts), loop).result()

    def _run_alone(self, served: ServedVersion, prompts: list[str]) -> np.ndarray:
        rows = served.embed(list(prompts))
        self._observe(1, len(prompts), [0.0])
        return rows

    def _schedule(self) -> None:
        """Start the next batch now, or when its window ends (on the loop)."""
        if self._busy or not self._waiting:
            return  # a running batch schedules the next one when it ends
        first = self._waiting[0]
        ready = sum(len(r.prompts) for r in self._waiting if r.served is first.served)
        delay = first.queued_at + self.window_s - time.monotonic()
        if ready >= self.max_rows or delay <= 0:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._start_batch()
        elif self._timer is None:
            assert self._loop is not None
            self._timer = self._loop.call_later(delay, self._start_batch)

    def _start_batch(self) -> None:
        self._timer = None
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not self._waiting:
            return
        batch = self._take()
        self._busy = True
        self.metrics.batch_running.set(len(batch))
        started = time.monotonic()
        done = loop.run_in_executor(thread, self._compute, batch)
        done.add_done_callback(lambda outcome: self._finish(batch, started, outcome))

    def _take(self) -> list[_Request]:
        """The oldest waiting request and the later ones of its version that fit in
        `max_rows` (the oldest always goes, whatever its size)."""
        first = self._waiting[0]
        batch, kept, rows = [], deque(), 0
        for request in self._waiting:
            fits = rows + len(request.prompts) <= self.max_rows
            if request.served is first.served and (not batch or fits):
                batch.append(request)
                rows += len(request.prompts)
            else:
                kept.append(request)
        self._waiting = kept
        self.metrics.batch_waiting.set(len(kept))
        return batch

    @staticmethod
    def _compute(batch: list[_Request]) -> list[np.ndarray | Exception]:
        """Each request's rows from one text-path call (in the batch thread). When the call
        fails, each request runs alone, so a failure reaches only the request causing it."""
        prompts = [prompt for request in batch for prompt in request.prompts]
        try:
            rows = batch[0].served.embed(prompts)
        except Exception as err:
            if len(batch) == 1:
                return [err]
            LOG.warning("a batch of %d requests failed (%s); running each alone", len(batch), err)
            return [TextPathBatcher._compute([request])[0] for request in batch]
        ends = itertools.accumulate(len(request.prompts) for request in batch)
        return [rows[start:end] for start, end in itertools.pairwise([0, *ends])]

    def _finish(self, batch: list[_Request], started: float, outcome: asyncio.Future) -> None:
        """Hand each caller its rows (on the loop), then start the next batch."""
        self._busy = False
        self.metrics.batch_running.set(0)
        try:
            results = outcome.result()
        except BaseException as err:  # the batch thread itself failed or was stopped
            results = [RuntimeError(f"text-path batch did not run: {err!r}")] * len(batch)
        rows = sum(len(request.prompts) for request in batch)
        self._observe(len(batch), rows, [started - request.queued_at for request in batch])
        for request, result in zip(batch, results, strict=True):
            if request.rows.done():  # the caller went away (cancelled)
                continue
            if isinstance(result, Exception):
                request.rows.set_exception(result)
            else:
                request.rows.set_result(result)
        self._schedule()

    def _observe(self, requests: int, rows: int, queued_s: list[float]) -> None:
        self.metrics.batch_requests.observe(requests)
        self.metrics.batch_rows.observe(rows)
        for seconds in queued_s:
            self.metrics.queue_seconds.observe(seconds)
