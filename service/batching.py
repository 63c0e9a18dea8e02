"""Image embeddings batched across concurrent requests with BentoML's adaptive batching.

``@bentoml.api(batchable=True)`` feeds BentoML's ``CorkDispatcher`` from HTTP requests. Our
batchable unit is not an HTTP request, though: ``/classify`` and ``/embed_image`` decode and
preprocess first (off the event loop) and only the ``[n, 3, S, S]`` pixel arrays are worth
batching. Calling a batchable API from inside the service goes through the service's own HTTP
client (``__self_proxy__``: JSON serialisation of the float pixels, the whole middleware stack
again, auth and concurrency limits included), so this module feeds the same dispatcher
in-process instead: same algorithm and knobs (``max_batch_size``, ``max_latency_ms``), no copy
through JSON.

The dispatcher sheds (cancels) queued work that cannot finish within ``max_latency_ms``; such
requests get 503 ``overloaded``, which clients should retry with backoff.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import anyio.to_thread
import numpy as np

from service.errors import RequestError

logger = logging.getLogger(__name__)


def _shed() -> np.ndarray:
    raise RequestError(503, "overloaded", "the server is at capacity (batch latency budget exceeded); retry with backoff")


class ImageBatcher:
    """``await embed(pixels [n, 3, S, S]) -> [n, D]``, merged with other callers' pixels.

    Args:
        embed_pixels: the blocking model call on a whole batch (run in a worker thread).
        max_batch_size: most images in one model call; a larger request is split.
        max_latency_ms: latency budget per request, waiting time included.
        on_batch: called with each batch's size (metrics).
    """

    def __init__(self, embed_pixels: Callable[[np.ndarray], np.ndarray], max_batch_size: int, max_latency_ms: int,
                 on_batch: Callable[[int], None] | None = None):
        self._embed_pixels = embed_pixels
        self.max_batch_size = max_batch_size
        self.max_latency_ms = max_latency_ms
        self._on_batch = on_batch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dispatcher = None
        self._call = None
        self.batch_sizes: list[int] = []  # recent batch sizes (bounded), for tests and /info

    def _bind(self) -> None:
        # The dispatcher's controller task lives on one event loop; a new loop (tests calling the
        # class directly with asyncio.run, then through an ASGI client) gets a new dispatcher.
        from bentoml._internal.marshal.dispatcher import CorkDispatcher

        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._dispatcher is not None:
            self._dispatcher.shutdown()
        self._dispatcher = CorkDispatcher(
            max_latency_in_ms=self.max_latency_ms,
            max_batch_size=self.max_batch_size,
            fallback=_shed,
            get_batch_size=lambda pixels: int(pixels.shape[0]),
            batch_dim=(0, 0),
        )
        self._call = self._dispatcher(self._run_batch)
        self._loop = loop

    async def _run_batch(self, parts: Sequence[np.ndarray]) -> list[np.ndarray]:
        sizes = [len(p) for p in parts]
        batch = np.concatenate(parts) if len(parts) > 1 else parts[0]
        out = await anyio.to_thread.run_sync(self._embed_pixels, batch)
        n = len(batch)
        self.batch_sizes = (self.batch_sizes + [n])[-1000:]
        if self._on_batch is not None:
            self._on_batch(n)
        return np.split(out, np.cumsum(sizes)[:-1])

    async def embed(self, pixels: np.ndarray) -> np.ndarray:
        if len(pixels) == 0:
            raise ValueError("no images to embed")
        self._bind()
        result = await self._call(pixels)  # type: ignore[misc]
        if isinstance(result, Exception):
            raise result
        return result

    def close(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.shutdown()
            self._dispatcher = None
            self._loop = None
