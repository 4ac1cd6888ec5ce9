"""Dynamic batching in front of one model version (asyncio; no FastAPI).

Requests (each ``[n, H, W, C]``) wait in a bounded queue, served round-robin: a batch is formed as
soon as a worker is free, from the images of the request whose turn it is, then of the next ones,
until ``max_batch_size`` images or ``max_queue_delay_ms`` after the first request's arrival. A
request that did not fit whole goes to the back of the round with the rest of its images, so a
1-image request is served between the batches of a 256-image one instead of after all of them.
Session runs happen in a thread pool, so the event loop keeps serving while ONNX Runtime computes.

Admission: a full queue answers 429; a request that cannot finish before its deadline, at the
measured seconds per image with the images served ahead of it, is refused up front (503, or 413
when it could not finish even alone); one that waits past its deadline answers 503. All with a
Retry-After estimated from recent throughput.
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

from service.errors import DeadlineUnmet, Overloaded, PayloadTooLarge, RequestTimeout, ServiceError, Unavailable
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


@dataclass(eq=False)
class _Request:
    """One request's images, handed to batches a slice at a time."""

    images: np.ndarray  # n, H, W, C
    future: asyncio.Future  # the whole request's outputs
    enqueued: float = field(default_factory=time.perf_counter)
    taken: int = 0  # images handed to batches
    computed: int = 0  # images whose outputs came back
    parts: list[tuple[int, Outputs]] = field(default_factory=list)  # (first image, outputs)
    abandoned: bool = False  # the requester gave up (timeout, disconnect) or a part failed
    started: float = 0.0  # when its latest slice went to a worker

    @property
    def n(self) -> int:
        return len(self.images)

    @property
    def left(self) -> int:
        return self.n - self.taken

    def add(self, start: int, outputs: Outputs) -> None:
        """Outputs of a slice; the request's future gets them all, in order, with the last one."""
        self.parts.append((start, outputs))
        self.computed += len(next(iter(outputs.values())))
        if self.computed == self.n and not self.future.done():
            parts = [o for _, o in sorted(self.parts, key=lambda p: p[0])]
            self.future.set_result(parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


@dataclass(frozen=True)
class _Slice:
    request: _Request
    start: int
    stop: int

    @property
    def n(self) -> int:
        return self.stop - self.start

    @property
    def images(self) -> np.ndarray:
        return self.request.images[self.start : self.stop]


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
        seconds_per_image: a first estimate of the compute time per image (from the warm-up), for
            admission until batches have been measured.
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
        seconds_per_image: float = 0.0,
    ):
        self.name, self.version = name, version
        self.config = config
        self._run = run
        self._stats = stats
        self._queue: collections.deque[_Request] = collections.deque()  # requests with images left, in turn
        self._pending = 0  # images queued (not yet handed to a batch)
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(config.workers)
        self._executor = ThreadPoolExecutor(config.workers, thread_name_prefix=f"ort-{name}-{version}")
        self._inflight: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None
        self._closing = False
        self._seconds_per_image = seconds_per_image  # moving average, for admission and Retry-After
        # wall seconds per image while the queue never ran dry (session runs plus the event loop's
        # own work between them: under many HTTP clients, more than the session time alone)
        self._busy_per_image = 0.0
        self._last_start: float | None = None
        self._last_size = 0
        self._idle = True  # the queue ran dry since the last batch started
        self._in_flight = in_flight
        self._running = 0  # request slices in batches being computed
        self._running_images = 0
        self._running_work: dict[int, tuple[float, int]] = {}  # id of a running batch: (started, images)
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
            for req in self._queue:
                if not req.future.done():
                    req.future.set_exception(InferenceFailed(f"the batcher of model '{self.name}' stopped"))

    async def close(self) -> None:
        """Stop taking requests, finish the queued and running ones, free the threads."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None and not self._task.done():
            await self._task
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        self._executor.shutdown(wait=True)

    @property
    def seconds_per_image(self) -> float:
        """Measured compute seconds per image (moving average; 0 before any measure)."""
        return self._seconds_per_image

    # ---- requests -----------------------------------------------------------------------
    async def infer(self, images: np.ndarray, timeout_s: float, started: float | None = None) -> Outputs:
        """Queue ``images`` and wait for their outputs until ``started + timeout_s`` (``started``:
        a ``time.perf_counter()`` from when the request began, so that decoding counts; now when
        None)."""
        if self._closing:
            raise Unavailable("the server is shutting down")
        now = time.perf_counter()
        deadline = (now if started is None else started) + timeout_s
        if now >= deadline:
            raise RequestTimeout(f"request to model '{self.name}' timed out after {timeout_s:g} s "
                                 f"(reading and decoding it took {now - started:.2f} s)")
        n = len(images)
        self._admit(n, timeout_s, deadline - now)
        req = _Request(images, asyncio.get_running_loop().create_future(), now)
        self._queue.append(req)
        self._pending += n
        self._m_depth.set(self._pending)
        self._wakeup.set()
        try:
            out = await asyncio.wait_for(asyncio.shield(req.future), deadline - now)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            req.abandoned = True
            req.future.add_done_callback(_consume)
            self._stats.request_done(False, time.perf_counter() - req.enqueued)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise RequestTimeout(
                f"request to model '{self.name}' timed out after {timeout_s:g} s (queued or computing)"
            ) from None
        except Exception:
            self._stats.request_done(False, time.perf_counter() - req.enqueued)
            raise
        self._stats.request_done(True, time.perf_counter() - req.enqueued, req.started - req.enqueued)
        return out

    def _admit(self, n: int, timeout_s: float, remaining_s: float) -> None:
        """Refuse up front what cannot fit the queue or cannot finish before its deadline."""
        cfg = self.config
        if n > cfg.max_queue_size:
            raise PayloadTooLarge(
                f"request holds {n} images but the queue of model '{self.name}' takes at most "
                f"{cfg.max_queue_size}; split it"
            )
        if self._pending + n > cfg.max_queue_size:
            raise Overloaded(
                f"model '{self.name}' is overloaded ({self._pending} images queued, limit "
                f"{cfg.max_queue_size}); retry later",
                retry_after_s=self._retry_after(),
            )
        per_image = self._seconds_per_image / cfg.workers
        if per_image <= 0:
            return  # nothing measured yet
        alone_s = n * per_image
        if alone_s > timeout_s and n > self.max_batch:
            raise PayloadTooLarge(
                f"request of {n} images would take about {alone_s:.1f} s at {per_image * 1000:.1f} ms per image, "
                f"over the request timeout of {timeout_s:g} s; split it"
            )
        # round-robin: our request is served one slice (at most max_batch images) per round, and in
        # each round every other live request gets a slice too. Under steady load a client whose
        # request finishes sends the next one, so each queued request is counted once per round we
        # need (a 1-image request needs one round; a 256-image one, 256 / max_batch rounds)
        now = time.perf_counter()
        running_s = sum(max(0.0, size * per_image - (now - t0)) for t0, size in self._running_work.values())
        step = self.max_batch
        rounds = math.ceil(n / step)
        live = [r for r in self._queue if not r.abandoned]
        per_round = sum(min(r.left, step) for r in live)
        if self._in_flight is not None:
            # requests still being read or decoded join the round too (each with an image at least)
            per_round += max(0, self._in_flight() - 1 - len(live) - self._running)
        ahead = per_round * rounds
        if per_round:  # beside other requests an image costs what the busy server measured
            per_image = max(per_image, self._busy_per_image)
        expected_s = running_s + (ahead + n) * per_image
        if expected_s > remaining_s:
            raise DeadlineUnmet(
                f"model '{self.name}' cannot finish this request in time: {n} images served in {rounds} "
                f"round(s) beside {per_round} queued images a round would take about {expected_s:.1f} s at "
                f"{per_image * 1000:.1f} ms per image, and {remaining_s:.1f} s of its {timeout_s:g} s timeout "
                f"are left; retry later or send fewer images",
                retry_after_s=math.ceil(running_s + per_round * per_image),
            )

    def _retry_after(self) -> int:
        per_image = self._seconds_per_image or 0.01
        return max(1, math.ceil(self._pending * per_image / self.config.workers))

    # ---- the loop -----------------------------------------------------------------------
    def _take(self, room: int) -> _Slice | None:
        """Up to ``room`` images of the request whose turn it is; a request with images left goes
        to the back of the round. None when nothing live is queued."""
        while self._queue:
            req = self._queue.popleft()
            if req.abandoned:
                self._pending -= req.left
                req.taken = req.n
                req.future.cancel()
                continue
            k = min(room, req.left)
            piece = _Slice(req, req.taken, req.taken + k)
            req.taken += k
            self._pending -= k
            if req.left:
                self._queue.append(req)
            return piece
        return None

    async def _next(self) -> _Slice | None:
        """The next slice, waiting for one; None once closing with an empty queue."""
        while True:
            piece = self._take(self.max_batch)
            if piece is not None:
                return piece
            self._idle = True
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
                flush_at = first.request.enqueued + cfg.max_queue_delay_ms / 1000
                while size < cfg.max_batch_size:
                    piece = self._take(cfg.max_batch_size - size)
                    if piece is not None:
                        batch.append(piece)
                        size += piece.n
                        continue
                    self._idle = True
                    wait = flush_at - time.perf_counter()
                    if wait <= 0 or self._closing or self._alone(len(batch)):
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), wait)
                    except asyncio.TimeoutError:
                        break
            self._m_depth.set(self._pending)
            self._measure_busy(size)
            self._running += len(batch)
            self._running_images += size
            task = asyncio.get_running_loop().create_task(self._execute(batch, size))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    def _measure_busy(self, size: int) -> None:
        """Between two batch starts with work queued all along, the interval is what the previous
        batch's images cost in wall time (per worker); an interval with idle time in it says nothing."""
        now = time.perf_counter()
        if not self._idle and self._last_start is not None:
            sample = (now - self._last_start) / self._last_size
            self._busy_per_image = sample if not self._busy_per_image else 0.8 * self._busy_per_image + 0.2 * sample
        self._last_start, self._last_size, self._idle = now, size, False

    def _alone(self, batched: int) -> bool:
        """Whether no request outside this batch and the running ones is in the server."""
        return self._in_flight is not None and self._in_flight() <= batched + self._running

    async def _execute(self, batch: list[_Slice], size: int) -> None:
        try:
            started = time.perf_counter()
            self._running_work[id(batch)] = (started, size)
            for piece in batch:
                piece.request.started = started
                self._m_queue.observe(started - piece.request.enqueued)
            loop = asyncio.get_running_loop()
            try:
                outputs = await loop.run_in_executor(self._executor, self._compute, [p.images for p in batch])
            except Exception as exc:
                log.exception("inference failed for %s/%s", self.name, self.version)
                error = InferenceFailed(f"inference failed in model '{self.name}': {type(exc).__name__}: {exc}")
                for piece in batch:
                    piece.request.abandoned = True  # its other slices need not run
                    if not piece.request.future.done():
                        piece.request.future.set_exception(error)
                return
            for piece, out in zip(batch, outputs):
                if not piece.request.future.done():
                    piece.request.add(piece.start, out)
        finally:
            self._running -= len(batch)
            self._running_images -= size
            self._running_work.pop(id(batch), None)
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
