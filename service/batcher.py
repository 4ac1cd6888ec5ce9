"""Dynamic batching in front of one model version (asyncio; no FastAPI).

Requests (each ``[n, H, W, C]``) wait in a bounded queue; a batch is formed as soon as a worker
is free, from the oldest request plus whatever else arrives until ``max_batch_size`` images or
``max_queue_delay_ms`` after that oldest request's arrival. Session runs happen in a thread pool,
so the event loop keeps serving while ONNX Runtime computes. A full queue answers 429 with a
Retry-After estimated from recent throughput; a request that waits past its timeout answers 503.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from service.errors import Overloaded, PayloadTooLarge, RequestTimeout, ServiceError, Unavailable
from service.metrics import ServiceMetrics
from service.settings import BatchingSettings
from service.stats import ModelStats

__all__ = ["DynamicBatcher", "InferenceFailed"]

log = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]


def _consume(fut: asyncio.Future) -> None:
    """Retrieve the outcome of an abandoned wait so asyncio does not log it as never retrieved."""
    if not fut.cancelled():
        fut.exception()


class InferenceFailed(ServiceError):
    status = 500
    outcome = "error"


@dataclass
class _Item:
    images: np.ndarray  # n, H, W, C
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    abandoned: bool = False  # the requester gave up (timeout, disconnect)
    started: float = 0.0  # when its batch went to a worker

    @property
    def n(self) -> int:
        return len(self.images)


class DynamicBatcher:
    """Merges concurrent requests to one model version into session runs.

    Args:
        name, version: the model version (labels of metrics and log lines).
        run: the session call, ``[N, H, W, C]`` uint8 -> outputs with batch first (run in a thread).
        config: batching settings of this model.
        stats, metrics: where timings go.
        in_flight: requests in the whole server now (HTTP requests being handled). When every
            one of them is already in this batch or running, nobody can join the batch, so it runs
            at once instead of waiting out ``max_queue_delay_ms`` (a lone client pays no delay).
    """

    def __init__(
        self,
        name: str,
        version: str,
        run: Callable[[np.ndarray], Outputs],
        config: BatchingSettings,
        stats: ModelStats,
        metrics: ServiceMetrics,
        in_flight: Callable[[], int] | None = None,
    ):
        self.name, self.version = name, version
        self.config = config
        self._run = run
        self._stats = stats
        self._queue: collections.deque[_Item] = collections.deque()
        self._pending = 0  # images queued
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(config.workers)
        self._executor = ThreadPoolExecutor(config.workers, thread_name_prefix=f"ort-{name}-{version}")
        self._inflight: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None
        self._closing = False
        self._seconds_per_image = 0.0  # moving average, for Retry-After
        self._in_flight = in_flight
        self._running = 0  # requests (queue items) in batches being computed
        labels = dict(model=name, version=version)
        self._m_queue = metrics.queue_duration.labels(**labels)
        self._m_compute = metrics.compute_duration.labels(**labels)
        self._m_batch = metrics.batch_size.labels(**labels)
        self._m_depth = metrics.queue_depth.labels(**labels)
        self._m_images = metrics.images.labels(**labels)

    @property
    def max_batch(self) -> int:
        return self.config.max_batch_size if self.config.enabled else self.config.max_queue_size

    @property
    def queue_depth(self) -> int:
        return self._pending

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}-{self.version}")
        self._task.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            # a bug, not a bad request: nothing would serve this model any more, so say so loudly
            log.error("batcher of %s/%s stopped", self.name, self.version, exc_info=task.exception())
            self._closing = True
            for item in self._queue:
                if not item.future.done():
                    item.future.set_exception(InferenceFailed(f"the batcher of model '{self.name}' stopped"))

    async def close(self) -> None:
        """Stop taking requests, finish the queued and running ones, free the threads."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None and not self._task.done():
            await self._task
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        self._executor.shutdown(wait=True)

    # ---- requests -----------------------------------------------------------------------
    async def infer(self, images: np.ndarray, timeout_s: float) -> Outputs:
        """Queue ``images`` and wait for their outputs (``timeout_s`` from now, queue included)."""
        if self._closing:
            raise Unavailable("the server is shutting down")
        n = len(images)
        if n > self.config.max_queue_size:
            raise PayloadTooLarge(
                f"request holds {n} images but the queue of model '{self.name}' takes at most "
                f"{self.config.max_queue_size}; split it"
            )
        if self._pending + n > self.config.max_queue_size:
            raise Overloaded(
                f"model '{self.name}' is overloaded ({self._pending} images queued, limit "
                f"{self.config.max_queue_size}); retry later",
                retry_after_s=self._retry_after(),
            )
        loop = asyncio.get_running_loop()
        step = self.max_batch
        items = [_Item(images[i : i + step], loop.create_future()) for i in range(0, n, step)]
        self._queue.extend(items)
        self._pending += n
        self._m_depth.set(self._pending)
        self._wakeup.set()
        waiter = asyncio.gather(*(it.future for it in items))
        try:
            parts = await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            for it in items:
                it.abandoned = True
            waiter.add_done_callback(_consume)
            self._stats.request_done(False, time.perf_counter() - items[0].enqueued)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise RequestTimeout(
                f"request to model '{self.name}' timed out after {timeout_s:g} s (queued or computing)"
            ) from None
        except Exception:
            self._stats.request_done(False, time.perf_counter() - items[0].enqueued)
            raise
        done = time.perf_counter()
        self._stats.request_done(True, done - items[0].enqueued, max(it.started - it.enqueued for it in items))
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _retry_after(self) -> int:
        per_image = self._seconds_per_image or 0.01
        return max(1, math.ceil(self._pending * per_image / self.config.workers))

    # ---- the loop -----------------------------------------------------------------------
    async def _next(self) -> _Item | None:
        """The oldest live item, waiting for one; None once closing with an empty queue."""
        while True:
            while self._queue:
                item = self._queue.popleft()
                self._pending -= item.n
                if not item.abandoned:
                    return item
                item.future.cancel()
            self._m_depth.set(self._pending)
            if self._closing:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _loop(self) -> None:
        cfg = self.config
        while True:
            await self._slots.acquire()
            first = await self._next()
            if first is None:
                self._slots.release()
                return
            batch, size = [first], first.n
            if cfg.enabled:
                flush_at = first.enqueued + cfg.max_queue_delay_ms / 1000
                while size < cfg.max_batch_size:
                    if self._queue:
                        nxt = self._queue[0]
                        if nxt.abandoned:
                            self._queue.popleft()
                            self._pending -= nxt.n
                            nxt.future.cancel()
                            continue
                        if size + nxt.n > cfg.max_batch_size:
                            break
                        self._queue.popleft()
                        self._pending -= nxt.n
                        batch.append(nxt)
                        size += nxt.n
                        continue
                    wait = flush_at - time.perf_counter()
                    if wait <= 0 or self._closing or self._alone(len(batch)):
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), wait)
                    except asyncio.TimeoutError:
                        break
            self._m_depth.set(self._pending)
            self._running += len(batch)
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    def _alone(self, batched: int) -> bool:
        """Whether no request outside this batch and the running ones is in the server."""
        return self._in_flight is not None and self._in_flight() <= batched + self._running

    async def _execute(self, batch: list[_Item]) -> None:
        try:
            started = time.perf_counter()
            for it in batch:
                it.started = started
                self._m_queue.observe(started - it.enqueued)
            loop = asyncio.get_running_loop()
            try:
                outputs = await loop.run_in_executor(self._executor, self._compute, [it.images for it in batch])
            except Exception as exc:
                log.exception("inference failed for %s/%s", self.name, self.version)
                error = InferenceFailed(f"inference failed in model '{self.name}': {type(exc).__name__}: {exc}")
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(error)
                return
            for it, out in zip(batch, outputs):
                if not it.future.done():
                    it.future.set_result(out)
        finally:
            self._running -= len(batch)
            self._slots.release()

    def _compute(self, parts: list[np.ndarray]) -> list[Outputs]:
        """In a worker thread: concatenate, run, split (timed for the stats)."""
        t0 = time.perf_counter()
        images = parts[0] if len(parts) == 1 else np.concatenate(parts)
        t1 = time.perf_counter()
        outputs = self._run(images)
        t2 = time.perf_counter()
        split, offset = [], 0
        for p in parts:
            split.append({k: v[offset : offset + len(p)] for k, v in outputs.items()})
            offset += len(p)
        t3 = time.perf_counter()
        n = len(images)
        self._stats.batch_done(n, t1 - t0, t2 - t1, t3 - t2)
        self._m_compute.observe(t2 - t1)
        self._m_batch.observe(n)
        self._m_images.inc(n)
        per_image = (t2 - t1) / max(1, n)
        self._seconds_per_image = per_image if not self._seconds_per_image else 0.8 * self._seconds_per_image + 0.2 * per_image
        return split
