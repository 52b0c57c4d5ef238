"""The dynamic batcher: gathers concurrent requests into micro-batches for one ``score`` call.

One loop task owns the queue. It takes a free worker slot, then waits until
either ``max_batch_size`` requests are queued (a full batch goes at once) or the
oldest queued request has waited ``max_wait_ms`` since it *arrived*, or no other
request the server has admitted is on its way to the queue and the batch has as
much company as it has had lately (waiting could only add latency), and hands
the batch to a small thread pool. Up to ``workers`` batches compute at once, so
a slow batch does not hold back the next one; while every worker is busy the
queue simply grows into the next batch.

There is no per-request timer that can fire while a batch runs and be lost (the
classic stuck-request bug): after every batch the loop re-examines the queue
itself. Each caller has a deadline; a request whose deadline passes is answered
504 at that deadline and dropped before it reaches the model. Identical
requests (same ``key``) that are in flight are computed once. A request whose
client has disconnected (``gone``, uvicorn's request cycle) is dropped when its
batch is formed, before the model.

Deadlines mostly arrive in order (same timeout, later arrival), so callers in
deadline order share one timer armed for the earliest of them (a uvloop timer
per request, armed and cancelled, was ~1 us of each request); a caller whose
deadline is earlier than the last one's (a shorter ``timeout_ms``) gets a timer
of its own.

``score(rows) -> results`` is any callable taking a list of rows and returning
one result per row, in order; it runs on a worker thread. It is the single
seam where scoring happens (see :class:`serving.model.ModelRunner`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

from serving.config import BatcherConfig
from serving.errors import BatchFailed, ClientGone, DeadlineExceeded, NotReady, QueueFull
from serving.metrics import VersionMetrics
from udfs.core import short_reason

log = logging.getLogger("serving.batcher")

ScoreFn = Callable[[list[Any]], list[Any]]
PEAK_S = 0.5


class _Pending:
    """One queued computation and everyone waiting for it."""

    __slots__ = ("arrival", "deadline", "gone", "key", "row", "timers", "waiters")

    def __init__(self, row: Any, key: Hashable | None, arrival: float, deadline: float) -> None:
        self.row = row
        self.key = key
        self.arrival = arrival
        self.deadline = deadline
        self.waiters: list[asyncio.Future[Any]] = []
        self.timers: list[asyncio.TimerHandle] = []
        # Per waiter: an object whose ``disconnected`` turns true when its client goes (or None).
        self.gone: list[Any] = []

    def abandoned(self) -> bool:
        """Every caller has gone (disconnected, or answered already): nobody wants the result."""
        return all(
            w.done() or (g is not None and g.disconnected)
            for w, g in zip(self.waiters, self.gone, strict=True)
        )


def _expire(fut: asyncio.Future[Any], timeout_ms: float) -> None:
    if not fut.done():
        fut.set_exception(DeadlineExceeded(f"no prediction within the deadline of {timeout_ms:g} ms"))


class Batcher:
    """Micro-batches rows for ``score``; see the module docstring."""

    def __init__(
        self,
        score: ScoreFn,
        cfg: BatcherConfig,
        metrics: VersionMetrics,
        *,
        executor: Executor | None = None,
        on_batch: Callable[[list[Any], list[Any]], None] | None = None,
    ) -> None:
        self.score = score
        # Called on the event loop with (rows, results) after each scored micro-batch (shadow scoring).
        self.on_batch = on_batch
        self.cfg = cfg
        self.metrics = metrics
        self._executor = executor or ThreadPoolExecutor(cfg.workers, thread_name_prefix="score")
        self._queue: deque[_Pending] = deque()
        self._inflight: dict[Hashable, _Pending] = {}
        self._wake: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Semaphore | None = None
        # Callers in non-decreasing deadline order: (deadline, future, timeout_ms); one timer for the head.
        self._watch: deque[tuple[float, asyncio.Future[Any], float]] = deque()
        self._watch_timer: asyncio.TimerHandle | None = None
        self._watch_at = 0.0
        self.computing = 0  # requests inside batches being scored
        # How many requests the server has admitted and not answered (None: unknown). When every one of
        # them is already queued or computing here, nobody is about to join the batch: it goes at once.
        self.admitted: Callable[[], int] | None = None
        # The most requests admitted at once lately (at submit times, forgotten after PEAK_S): how much
        # company a batch can expect. A batch goes early only once it has that much, so clients that
        # arrive one after another (64 connections) still fill batches.
        self._peak = 0
        self._peak_at = 0.0
        self.stopped = False
        self.batches_running = 0
        metrics.gauge(
            "nv_inference_pending_request_count", "Requests queued, not yet in a micro-batch", self.queued
        )
        metrics.gauge(
            "sparkscore_batches_running", "Micro-batches computing right now", lambda: self.batches_running
        )

    def queued(self) -> int:
        return len(self._queue)

    def idle(self) -> bool:
        """Nothing queued and nothing computing: a retired version can be stopped."""
        return not self._queue and self.batches_running == 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.cfg.workers)
        self._task = self._loop.create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        self.stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue:
            self._deliver_error(self._queue.popleft(), NotReady("the server is shutting down"))
        if self._watch_timer is not None:
            self._watch_timer.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def submit(
        self, row: Any, timeout_ms: float, key: Hashable | None = None, gone: Any = None
    ) -> asyncio.Future[Any]:
        """Queue ``row``; the returned future resolves to its result or raises a RequestError.

        A request identical (same ``key``) to one in flight joins it instead of queueing.
        Raises :class:`QueueFull` at once when the queue is full. ``gone``: see :class:`_Pending`.
        """
        if self.admitted is not None:
            seen, at = self.admitted(), time.monotonic()
            if seen >= self._peak or at - self._peak_at > PEAK_S:
                self._peak, self._peak_at = seen, at
        loop = self._loop
        if loop is None or self.stopped:
            raise NotReady(
                "this model version's batcher is stopped (replaced or shutting down); retry"
                if self.stopped
                else "the batcher is not running"
            )
        now = time.monotonic()
        deadline = now + timeout_ms / 1000
        pending = self._inflight.get(key) if key is not None else None
        if pending is not None:
            self.metrics.cache_coalesced.inc()
            pending.deadline = max(pending.deadline, deadline)
        else:
            if len(self._queue) >= self.cfg.max_queue:
                raise QueueFull(f"the request queue is full ({self.cfg.max_queue} waiting); retry shortly")
            pending = _Pending(row, key, now, deadline)
            self._queue.append(pending)
            if key is not None:
                self._inflight[key] = pending
            n = len(self._queue)
            if self._wake is not None and (n == 1 or n >= self.cfg.max_batch_size) and not self._wake.done():
                self._wake.set_result(None)
        fut: asyncio.Future[Any] = loop.create_future()
        pending.waiters.append(fut)
        pending.gone.append(gone)
        watch = self._watch
        if watch and deadline < watch[-1][0]:
            pending.timers.append(loop.call_later(timeout_ms / 1000, _expire, fut, timeout_ms))
            return fut
        watch.append((deadline, fut, timeout_ms))
        if self._watch_timer is None or deadline < self._watch_at:
            self._arm_watch(deadline, now)
        return fut

    def _arm_watch(self, at: float, now: float) -> None:
        assert self._loop is not None
        if self._watch_timer is not None:
            self._watch_timer.cancel()
        # uvloop timers have millisecond resolution: never ask for less than one.
        self._watch_timer = self._loop.call_later(max(at - now, 0.001), self._check_watch)
        self._watch_at = at

    def _check_watch(self) -> None:
        """The watch timer: 504 to every caller past its deadline, then re-arm for the next one."""
        self._watch_timer = None
        watch = self._watch
        now = time.monotonic()
        while watch:
            deadline, fut, timeout_ms = watch[0]
            if not fut.done():
                # Within the timer's resolution counts as due (a per-request timer fired as early).
                if deadline > now + 0.0005:
                    self._arm_watch(deadline, now)
                    return
                _expire(fut, timeout_ms)
            watch.popleft()

    def _trim_watch(self) -> None:
        """Forget answered callers at the head (they mostly finish in deadline order): the watch stays short."""
        watch = self._watch
        while watch and watch[0][1].done():
            watch.popleft()

    # -- the loop -----------------------------------------------------------------

    async def _run(self) -> None:
        assert self._slots is not None
        while True:
            await self._slots.acquire()
            try:
                batch = await self._collect()
            except BaseException:
                self._slots.release()
                raise
            try:
                self._launch(batch)
            except Exception as exc:  # the loop must outlive any one batch
                log.exception("could not start a micro-batch")
                self._finish_all(batch, BatchFailed(f"could not start the batch: {short_reason(exc)}"))
                self._slots.release()

    async def _sleep(self, delay: float | None) -> None:
        loop = self._loop
        assert loop is not None
        self._wake = loop.create_future()
        handle = loop.call_later(delay, _set_none, self._wake) if delay is not None else None
        try:
            await self._wake
        finally:
            self._wake = None
            if handle is not None:
                handle.cancel()

    async def _collect(self) -> list[_Pending]:
        """Wait for a batch worth sending; returns at least one live request."""
        q = self._queue
        max_bs = self.cfg.max_batch_size
        max_wait = self.cfg.max_wait_ms / 1000
        while True:
            now = time.monotonic()
            while q and q[0].deadline <= now:
                self._drop(q.popleft())
            if not q:
                await self._sleep(None)
                continue
            if len(q) >= max_bs:
                break
            delay = q[0].arrival + max_wait - now
            # uvloop timers have millisecond resolution: a shorter sleep would return at once and
            # the loop would spin until the deadline. Within half a millisecond, send now.
            if delay <= 0.0005:
                break
            # Waiting for company only pays when some is on its way (parsed, awaiting Redis): with every
            # admitted request here already (closed-loop clients, low load), the wait is pure latency.
            if self.admitted is not None:
                here = len(q) + self.computing
                if self.admitted() <= here and here >= self._peak:
                    break
            await self._sleep(max(0.001, round(delay, 3)))
        batch: list[_Pending] = []
        now = time.monotonic()
        while q and len(batch) < max_bs:
            p = q.popleft()
            if p.deadline <= now:
                self._drop(p)
            elif p.abandoned():
                self._drop(p, ClientGone("the client disconnected before its request reached the model"))
                self.metrics.canceled.inc()
            else:
                batch.append(p)
        if not batch:
            return await self._collect()
        return batch

    def _drop(self, p: _Pending, error: Exception | None = None) -> None:
        """An expired (504) or abandoned request leaves without reaching the model."""
        if self._inflight.get(p.key) is p:
            del self._inflight[p.key]
        self._deliver_error(p, error or DeadlineExceeded("the deadline passed while the request was queued"))
        self._trim_watch()

    def _launch(self, batch: list[_Pending]) -> None:
        loop = self._loop
        assert loop is not None
        started = time.monotonic()
        self.metrics.queue_duration.observe_each([(started - p.arrival) * 1e6 for p in batch])
        self.metrics.batch_size.observe(len(batch))
        self.computing += len(batch)
        self.batches_running += 1
        rows = [p.row for p in batch]
        fut = loop.run_in_executor(self._executor, _timed, self.score, rows)
        fut.add_done_callback(lambda f: self._done(batch, f))

    def _done(self, batch: list[_Pending], fut: asyncio.Future[Any]) -> None:
        assert self._slots is not None
        self._slots.release()
        self.computing -= len(batch)
        self.batches_running -= 1
        self.metrics.exec_count.inc()
        if fut.cancelled():
            self._finish_all(batch, NotReady("the server is shutting down"))
            return
        exc = fut.exception()
        if exc is None:
            results, seconds = fut.result()
            self.metrics.compute_duration.observe(seconds * 1e6, len(batch))
            if len(results) != len(batch):
                exc = RuntimeError(f"score returned {len(results)} results for {len(batch)} rows")
        if exc is not None:
            log.error("model failed on a micro-batch of %d: %s", len(batch), short_reason(exc), exc_info=exc)
            self._finish_all(batch, BatchFailed(f"the model failed on this batch: {short_reason(exc)}"))
            return
        self.metrics.inference_count.inc(n=len(batch))
        inflight = self._inflight
        for p, result in zip(batch, results, strict=True):
            if p.key is not None and inflight.get(p.key) is p:
                del inflight[p.key]
            for w in p.waiters:
                if not w.done():
                    w.set_result(result)
            for t in p.timers:
                t.cancel()
        self._trim_watch()
        if self.on_batch is not None:
            try:
                self.on_batch([p.row for p in batch], results)
            except Exception:  # the hook (shadow scoring) must never fail the primary's batch
                log.exception("on_batch hook failed")

    def _finish_all(self, batch: list[_Pending], error: Exception) -> None:
        for p in batch:
            if p.key is not None and self._inflight.get(p.key) is p:
                del self._inflight[p.key]
            self._deliver_error(p, error)
        self._trim_watch()

    @staticmethod
    def _deliver_error(p: _Pending, error: Exception) -> None:
        for w in p.waiters:
            if not w.done():
                w.set_exception(error)
        for t in p.timers:
            t.cancel()


def _set_none(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _timed(score: ScoreFn, rows: list[Any]) -> tuple[list[Any], float]:
    t0 = time.perf_counter()
    results = score(rows)
    return results, time.perf_counter() - t0
