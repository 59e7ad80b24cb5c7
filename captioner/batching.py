"""The serving core, without HTTP (so `captioner --help` need not import FastAPI): the server's
limits, and micro-batching, by which photos of concurrent requests share one encoder and one
decoder pass.

Requests put their photos on a queue and await a future per photo. A worker takes the first
waiting photo, gathers more until `window_ms` after that photo arrived (or until `max_batch`
photos), groups them by decoding options (photos decoded with other options cannot share a pass)
and runs each group through the caption function on a thread of the batcher's own, so the event
loop keeps accepting and reading requests meanwhile. One batch at a time is open for photos, and
`threads` workers run passes at once (TF Serving's `num_batch_threads`): on 2 cores, two, because
one pass's encoder then runs while the other's decoder takes its small per-word steps, which leave
a core idle (docs/serve.md). Long-lived threads run the passes: a pass never waits for a free
worker of the event loop's shared pool. While passes run, new photos queue up, so under load
batches fill by themselves and the window costs nothing: it counts from the first photo's arrival
(as TensorFlow Serving's `batch_timeout_micros` does), so photos that waited through a pass start
the next one at once.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from captioner.settings import setting

log = logging.getLogger(__name__)

Options = TypeVar("Options")
Result = TypeVar("Result")
# (sources, options) -> one result per source, in order: one `Captioner.iter_captions` pass, listed.
CaptionFn = Callable[[list, Options], Sequence[Result]]


@dataclass(frozen=True)
class ServerLimits:
    """Every limit of the server, with its default: the one place they are set (`captioner
    serve` has a flag for each, with this help)."""

    max_body_bytes: int = setting(32 * 2**20, "largest request body, counted as it arrives")
    max_images: int = setting(16, "most photos in one request")
    # A 24-megapixel camera's photo fits; the header is read before a pixel is decoded.
    max_pixels: int = setting(25_000_000, "most pixels in one photo")
    request_timeout_s: float = setting(30.0, "seconds to receive a request and caption it")
    # 10 ms merged 8.6 photos a pass with 16 clients on 2 busy cores, 25 ms 12.9 (a tenth less CPU per
    # photo); a lone request pays it once (docs/serve.md, "Load test").
    batch_window_ms: float = setting(25.0, "milliseconds a photo waits, from when its upload is decoded, "
                                     "for other requests' photos to share its pass")
    max_batch: int = setting(32, "most photos in one encoder and decoder pass")
    # 2 on 2 cores: 74-78 % of the CLI's photos/s against 65-72 % with 1 (16 clients, docs/serve.md).
    batch_threads: int = setting(2, "caption passes run at once (TF Serving's num_batch_threads)")
    max_pending: int = setting(256, "most photos waiting across requests; beyond it, 503 busy")
    # Uploads are rarely sent twice: a small in-memory feature cache keeps the server's memory flat.
    cache_photos: int = setting(256, "photos whose features stay in memory (a repeated upload is not re-encoded)")

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_images", "max_pixels", "max_batch", "batch_threads", "max_pending",
                     "cache_photos"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a whole number of at least 1, got {value!r}")
        if not self.request_timeout_s > 0:  # `not >` also refuses NaN
            raise ValueError(f"request_timeout_s: must be more than 0, got {self.request_timeout_s!r}")
        if not self.batch_window_ms >= 0:
            raise ValueError(f"batch_window_ms: must be 0 or more, got {self.batch_window_ms!r}")
        if self.max_pending < self.max_images:
            raise ValueError(f"max_pending: must be at least max_images ({self.max_images}), got {self.max_pending}")


class BatcherClosed(RuntimeError):
    """The batcher is shutting down (or was never started) and takes no new photos."""


class BatcherBusy(RuntimeError):
    """More photos are waiting than the batcher may hold; the caller should come back later."""


@dataclass
class BatchStats:
    """What the batcher has done: tests and the load test read it to see that batches merge."""

    passes: int = 0  # calls of the caption function (each: one encoder and one decoder pass)
    photos: int = 0
    largest: int = 0  # most photos in one pass
    requests_merged: int = 0  # passes that held photos of more than one request
    sizes: list[int] = field(default_factory=list)  # the last 1,000 pass sizes

    def record(self, size: int, requests: int) -> None:
        self.passes += 1
        self.photos += size
        self.largest = max(self.largest, size)
        self.requests_merged += requests > 1
        self.sizes = [*self.sizes[-999:], size]


@dataclass
class _Item:
    source: object
    options: object
    group: Hashable  # photos of one group may share a pass
    request: int
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class MicroBatcher(Generic[Options, Result]):
    """Gathers photos of concurrent requests into shared caption passes (see the module doc)."""

    def __init__(self, caption: CaptionFn, window_ms: float = 25.0, max_batch: int = 32, max_pending: int = 256,
                 threads: int = 1):
        """`caption` must allow `threads` calls at once (`Captioner.iter_captions` does)."""
        self.caption, self.window, self.max_batch, self.max_pending = caption, window_ms / 1000, max_batch, max_pending
        self.threads = threads
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Item] | None = None
        self._gathering: asyncio.Lock | None = None  # held by the worker whose batch is open
        self._workers: list[asyncio.Task] = []
        self._pool: ThreadPoolExecutor | None = None
        self._closed = True
        self._requests = 0
        self._pending = 0

    async def start(self) -> None:
        """Start the workers on the running event loop."""
        self._queue = asyncio.Queue()
        self._gathering = asyncio.Lock()
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="captioner-pass")
        self._closed = False
        self._workers = [asyncio.create_task(self._run(), name=f"captioner-batcher-{i}") for i in range(self.threads)]

    async def stop(self) -> None:
        """Take no new photos, finish those already queued, then stop the workers."""
        self._closed = True
        if not self._workers:
            return
        await self._queue.join()
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        self._pool.shutdown()

    @property
    def pending(self) -> int:
        """Photos queued or being captioned."""
        return self._pending

    async def submit(self, sources: Sequence, options: Options, shareable: bool = True) -> list[Result]:
        """Caption `sources` with `options`, in a pass shared with other requests' photos when
        `shareable` (a pass's result for a photo must not depend on its batch-mates; seeded
        sampling draws one random stream for the whole pass, so it is not shareable)."""
        if self._closed:
            raise BatcherClosed("the server is shutting down")
        if self._pending + len(sources) > self.max_pending:
            raise BatcherBusy(f"{self._pending} photos are waiting (at most {self.max_pending})")
        self._requests += 1
        request = self._requests
        group = options if shareable else (options, request)
        loop = asyncio.get_running_loop()
        items = [_Item(s, options, group, request, loop.create_future()) for s in sources]
        self._pending += len(items)
        for item in items:
            self._queue.put_nowait(item)
        try:
            return list(await asyncio.gather(*(i.future for i in items)))
        finally:
            for item in items:  # a timed-out or disconnected request: its photos need no pass
                item.future.cancel()

    async def _gather(self) -> list[_Item]:
        batch = [await self._queue.get()]
        deadline = batch[0].arrived + self.window
        while len(batch) < self.max_batch:
            timeout = deadline - time.monotonic()
            if timeout <= 0 and self._queue.empty():
                break
            try:
                batch.append(self._queue.get_nowait() if timeout <= 0 else
                             await asyncio.wait_for(self._queue.get(), timeout))
            except (asyncio.TimeoutError, asyncio.QueueEmpty):
                break
        return batch

    async def _run(self) -> None:
        while True:
            async with self._gathering:  # one batch open at a time: idle workers never split photos between them
                batch = await self._gather()
            try:
                await self._caption(batch)
            finally:
                self._pending -= len(batch)
                for _ in batch:
                    self._queue.task_done()

    async def _caption(self, batch: list[_Item]) -> None:
        groups: dict[Hashable, list[_Item]] = {}
        for item in batch:
            if not item.future.done():  # skip photos whose request has gone
                groups.setdefault(item.group, []).append(item)
        for items in groups.values():
            try:
                results = await asyncio.get_running_loop().run_in_executor(
                    self._pool, self.caption, [i.source for i in items], items[0].options)
            except Exception as e:  # noqa: BLE001 - a failed pass fails its requests, never the worker
                log.exception("caption pass of %d photos failed", len(items))
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(e)
                continue
            self.stats.record(len(items), len({i.request for i in items}))
            for item, result in zip(items, results):
                if not item.future.done():
                    item.future.set_result(result)
