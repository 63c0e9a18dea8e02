"""Image embeddings batched across concurrent requests: whatever has queued while the model ran.

``/classify`` and ``/embed_image`` hand :class:`ImageBatcher` their image count and a function that
decodes and preprocesses them. One consumer per event loop takes everything queued (up to
``max_batch_size`` images) and, in one trip to a worker thread, decodes each request's images (a bad
image fails only its own request) and runs the model once on them all; requests that arrive
meanwhile form the next batch. An idle server runs a lone request at once (no waiting window to
tune, no timer waking the loop), a busy one batches as deep as its load: the batch size follows
the arrival rate times the model's time per call.

Why one trip: on the 2-core build machine every hop between the event loop and a worker thread
cost ~1 ms of latency (measured: a cached text lookup of 0.02 ms took 1.2 ms as a hop), more than
the default model's batch-1 call (1.5 ms); decoding in one hop and embedding in a second, as before,
paid it twice per request. This also replaced BentoML's adaptive ``CorkDispatcher`` (driven
through its private API), whose waiting window suits a model that costs more than a hop.

Requests whose images waited longer than ``max_latency_ms`` when their turn comes are shed with
503 ``overloaded`` (clients should retry with backoff) rather than run late.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Callable

import anyio.to_thread
import numpy as np

from service.errors import RequestError

logger = logging.getLogger(__name__)


def _overloaded() -> RequestError:
    return RequestError(503, "overloaded", "the server is at capacity (batch latency budget exceeded); retry with backoff")


def _fail(future: asyncio.Future, error: BaseException) -> None:
    """``future.set_exception``, for any error: asyncio refuses StopIteration (and a BaseException such
    as KeyboardInterrupt should not travel into a request), so those arrive wrapped in a RuntimeError."""
    if isinstance(error, StopIteration) or not isinstance(error, Exception):
        wrapped = RuntimeError(f"image batch failed: {error!r}")
        wrapped.__cause__ = error
        error = wrapped
    future.set_exception(error)


class _Item:
    __slots__ = ("n", "prepare", "future", "queued_at")

    def __init__(self, n: int, prepare: Callable[[], np.ndarray], future: asyncio.Future, queued_at: float):
        self.n, self.prepare, self.future, self.queued_at = n, prepare, future, queued_at


class ImageBatcher:
    """``await embed(n, prepare) -> [n, ...]``, merged with other callers' images.

    Args:
        embed_pixels: the blocking model call on a whole batch of pixels (run in a worker thread).
        max_batch_size: most images in one model call; a larger request is split.
        max_latency_ms: the longest an image may wait for its batch; later ones are shed (503).
        on_batch: called with each batch's size (metrics).
    """

    def __init__(self, embed_pixels: Callable[[np.ndarray], np.ndarray], max_batch_size: int, max_latency_ms: int,
                 on_batch: Callable[[int], None] | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self._embed_pixels = embed_pixels
        self.max_batch_size = max_batch_size
        self.max_latency_ms = max_latency_ms
        self._on_batch = on_batch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: collections.deque[_Item] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self.batch_sizes: list[int] = []  # recent batch sizes (bounded), for tests and /info

    def _bind(self) -> None:
        # one consumer per event loop, with the queue it serves; a new loop (tests calling the class
        # directly with asyncio.run, then through an ASGI client) gets a new queue and consumer, and a
        # consumer that ended on this loop is restarted on the same queue (nothing queued is lost)
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._queue, self._wake = loop, collections.deque(), asyncio.Event()
            self._worker = None
        if self._worker is None or self._worker.done():
            assert self._wake is not None
            self._worker = loop.create_task(self._consume(self._queue, self._wake), name="promptbake-image-batcher")

    async def embed(self, n: int, prepare: Callable[[int, int], np.ndarray]) -> np.ndarray:
        """The model's output for ``n`` images; ``prepare(lo, hi)`` gives images ``lo:hi`` as pixels
        ``[hi - lo, 3, S, S]`` (blocking: it runs in the batch's worker thread; an exception it raises,
        e.g. a :class:`RequestError` for a bad image, fails this call only)."""
        if n < 1:
            raise ValueError("no images to embed")
        self._bind()
        assert self._loop is not None and self._wake is not None
        now = time.monotonic()
        items = [_Item(min(lo + self.max_batch_size, n) - lo, functools.partial(prepare, lo, min(lo + self.max_batch_size, n)),
                       self._loop.create_future(), now) for lo in range(0, n, self.max_batch_size)]
        self._queue.extend(items)
        self._wake.set()
        try:
            outs = [await item.future for item in items]
        finally:
            for item in items:
                if not item.future.done():  # a cancelled request (client gone) leaves nothing to run
                    item.future.cancel()
                elif not item.future.cancelled():
                    item.future.exception()  # a sibling chunk's error, read so asyncio does not log it
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def _next_batch(self, queue: collections.deque[_Item]) -> list[_Item]:
        batch: list[_Item] = []
        size = 0
        deadline = time.monotonic() - self.max_latency_ms / 1000
        while queue and size + queue[0].n <= self.max_batch_size:
            item = queue.popleft()
            if item.future.done():  # cancelled while queued
                continue
            if item.queued_at < deadline:
                _fail(item.future, _overloaded())
                continue
            batch.append(item)
            size += item.n
        return batch

    def _run(self, batch: list[_Item]) -> list[np.ndarray | BaseException]:
        """In the worker thread: each item's pixels (or its error), then one model call on them all."""
        prepared: list[np.ndarray | BaseException] = []
        for item in batch:
            try:
                prepared.append(item.prepare())
            except Exception as e:  # noqa: BLE001 - the request's own error (a bad image), returned to it
                prepared.append(e)
        good = [p for p in prepared if isinstance(p, np.ndarray)]
        if not good:
            return prepared
        out = self._embed_pixels(good[0] if len(good) == 1 else np.concatenate(good))
        n = len(out)
        self.batch_sizes = (self.batch_sizes + [n])[-1000:]
        if self._on_batch is not None:
            self._on_batch(n)
        results: list[np.ndarray | BaseException] = []
        start = 0
        for p in prepared:
            if isinstance(p, np.ndarray):
                results.append(out[start : start + len(p)])
                start += len(p)
            else:
                results.append(p)
        return results

    async def _consume(self, queue: collections.deque[_Item], wake: asyncio.Event) -> None:
        """Serve ``queue`` until cancelled. Whatever a batch raises fails that batch's requests (never
        this task: a dead consumer would leave every later request waiting)."""
        while True:
            if not queue:
                wake.clear()
                await wake.wait()
            batch = self._next_batch(queue)
            if not batch:
                continue
            try:
                results = await anyio.to_thread.run_sync(self._run, batch)
            except asyncio.CancelledError:
                for item in batch:
                    item.future.cancel()
                raise
            except BaseException as e:  # noqa: BLE001 - the model failed: every request of the batch gets the error
                logger.exception("image batch of %d failed", sum(item.n for item in batch))
                results = [e] * len(batch)
            for item, result in zip(batch, results):
                if item.future.done():
                    continue
                if isinstance(result, BaseException):
                    _fail(item.future, result)
                else:
                    item.future.set_result(result)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None
        for item in self._queue:
            item.future.cancel()
        self._queue.clear()
        self._loop = None
