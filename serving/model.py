"""The scorer's model: rows of feature values in, per-row prediction dicts out.

:meth:`ModelRunner.score` is the function the batcher calls on a worker
thread. It builds one Arrow batch per micro-batch in the model spec's input
layout (named numeric columns, or one fixed-length array column) and scores it
with :func:`udfs.core.score_batch`, the same function the Spark jobs call, so a
row gets the same prediction and a bad row the same error reason on every path.
Results are generic: every column that :func:`udfs.core.output_schema` lists
(an ensemble adds ``degraded`` and ``missing_members``) comes back by name.

An ensemble's members run in parallel on a thread pool of the runner's own,
one thread per member for each micro-batch that may compute at once (``[batcher]
workers`` x members, so a batch's members never queue behind another batch's and
``member_timeout_ms`` measures the member, not the queue) unless ``[batcher] parallel_members = false``: then
there is no pool and the members run one after another on the inference thread.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Executor, Future
from typing import Any

import pyarrow as pa

from serving.config import ServeConfig
from udfs.core import Scorer, load_scorer, output_schema, score_batch
from udfs.signature import rows_to_batch, zero_row
from udfs.spec import ResolvedModel, resolve

log = logging.getLogger("serving.model")

Row = tuple[Any, ...]  # one value per input column (a list of floats for an array column)


class MemberPool(Executor):
    """Threads for ensemble members, where a hung member cannot starve the others.

    ``size`` threads serve member calls. A call running past ``timeout_ms`` since it was submitted
    (its caller has given up on it already) is *hung*: its thread is set aside and no longer counted,
    and a new thread takes its place. Once ``max_hung`` calls are set aside, a new call to a member
    that has a hung call fails at once (the ensemble's quorum decides) rather than taking a thread;
    the other members keep theirs. A hung call that returns
    gives its thread back (a surplus thread then exits). Calls are ``submit(fn, member_index)``:
    the index names the member in :meth:`hung`.
    """

    def __init__(self, size: int, names: list[str], *, timeout_ms: float, max_hung: int) -> None:
        self.size = size
        self.names = names
        self.timeout_ms = timeout_ms
        self.max_hung = max_hung
        self._work: queue.SimpleQueue[tuple[Future[Any], Any, tuple[Any, ...], float] | None] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0  # threads waiting for work that no submitted call has claimed
        self._unclaimed = 0  # calls queued with no thread claimed for them
        self._running: dict[int, tuple[float, Any]] = {}
        self._ids = itertools.count()
        self._closed = False

    def _hung_locked(self, now: float) -> int:
        limit = self.timeout_ms / 1000
        return sum(1 for started, _ in self._running.values() if now - started > limit)

    def _hung_member_locked(self, member: Any, now: float) -> bool:
        limit = self.timeout_ms / 1000
        return any(m == member and now - started > limit for started, m in self._running.values())

    def hung(self) -> dict[str, int]:
        now, limit = time.monotonic(), self.timeout_ms / 1000
        out = dict.fromkeys(self.names, 0)
        with self._lock:
            running = list(self._running.values())
        for started, index in running:
            if now - started > limit:
                name = self.names[index] if isinstance(index, int) and index < len(self.names) else "?"
                out[name] = out.get(name, 0) + 1
        return out

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        call = (lambda: fn(*args, **kwargs)) if kwargs else None
        with self._lock:
            if self._closed:
                raise RuntimeError("the member pool is shut down")
            now = time.monotonic()
            hung = self._hung_locked(now)
            member = args[0] if args else None
            if hung >= self.max_hung and self._hung_member_locked(member, now):
                fut.set_exception(
                    RuntimeError(f"{hung} member calls are hung past their timeout; not started")
                )
                return fut
            if self._idle > 0:
                self._idle -= 1
            elif self._threads - hung < self.size:
                self._threads += 1
                threading.Thread(target=self._worker, name="member", daemon=True).start()
            else:
                self._unclaimed += 1
            self._work.put((fut, call or fn, () if call else args, now))
            while self._unclaimed > 0 and self._threads - hung < self.size:
                self._unclaimed -= 1  # a call that became hung since frees a place for a queued one
                self._threads += 1
                threading.Thread(target=self._worker, name="member", daemon=True).start()
        return fut

    def _worker(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            fut, fn, args, submitted = item
            if fut.set_running_or_notify_cancel():
                key = next(self._ids)
                with self._lock:
                    # Hung counts from submission, as the caller's timeout does.
                    self._running[key] = (submitted, args[0] if args else None)
                try:
                    fut.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - delivered to the caller
                    fut.set_exception(exc)
                finally:
                    with self._lock:
                        del self._running[key]
            with self._lock:
                if self._closed or self._threads - self._hung_locked(time.monotonic()) > self.size:
                    self._threads -= 1  # a replacement took this thread's place while it hung
                    return
                if self._unclaimed > 0:
                    self._unclaimed -= 1  # a queued call is this thread's next
                else:
                    self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            threads = self._threads
        for _ in range(threads):
            self._work.put(None)


class ModelRunner:
    """Loads the model once, warms it up, and scores micro-batches through the core."""

    def __init__(
        self,
        model: ResolvedModel,
        *,
        warmup_sizes: tuple[int, ...] = (1, 8),
        parallel_members: bool = True,
        concurrent_batches: int = 2,
        member_timeout_ms: float = 1000.0,
        max_hung_member_calls: int = 16,
    ) -> None:
        spec = model.spec
        self.model = model
        # A typed signature ([[model.inputs]]): a row holds one value per data column the inputs read.
        self.signature = spec.signature
        self.columns = spec.columns
        # One array column of num_features values, or one scalar column per feature.
        self.array_layout = (
            self.signature is None and len(spec.input_columns) == 1 and spec.num_features is not None
        )
        value_type = pa.list_(pa.float64()) if self.array_layout else pa.float64()
        self.input_schema = pa.schema([pa.field(c, value_type) for c in self.columns])
        self.output_names = output_schema(model).names
        self.warmup_sizes = warmup_sizes
        self.parallel_members = parallel_members
        self.concurrent_batches = concurrent_batches
        self.scorer: Scorer | None = None
        self._member_pool: MemberPool | None = None
        self._warming = False
        self.member_timeout_ms = member_timeout_ms
        self.max_hung_member_calls = max_hung_member_calls

    @classmethod
    def from_config(cls, cfg: ServeConfig, model: ResolvedModel | None = None) -> ModelRunner:
        """The runner ``cfg`` describes: warm-up sizes and member parallelism from ``[batcher]``."""
        return cls(
            model or resolve(cfg.model),
            warmup_sizes=(1, cfg.batcher.max_batch_size),
            parallel_members=cfg.batcher.parallel_members,
            concurrent_batches=cfg.batcher.workers,
            # A member with no member_timeout_ms of its own is bounded by a request's default deadline.
            member_timeout_ms=cfg.batcher.default_timeout_ms,
            max_hung_member_calls=cfg.batcher.max_hung_member_calls,
        )

    @property
    def version(self) -> str:
        return self.model.version

    @property
    def width(self) -> int:
        return self.model.spec.num_features or len(self.columns)

    def load(self) -> None:
        """Load (per-process cached) and warm up: the first real request pays no first-call cost."""
        self.scorer = load_scorer(self.model)
        if self.model.is_ensemble and self.parallel_members and self._member_pool is None:
            # Members of one micro-batch run in parallel (torch releases the GIL); every batch
            # computing at once gets a thread per member.
            spec_timeout = self.model.spec.member_timeout_ms
            self._member_pool = MemberPool(
                len(self.model.members) * self.concurrent_batches,
                [m.name for m in self.model.members],
                timeout_ms=spec_timeout or self.member_timeout_ms,
                max_hung=self.max_hung_member_calls,
            )
        if self.signature is not None:
            zero: Row = zero_row(self.signature)
        else:
            zero = ([0.0] * self.width,) if self.array_layout else (0.0,) * self.width
        # TorchScript's profiling executor specialises a graph over its first few calls: make them here,
        # members one after another (a first call's compile is no member timeout).
        self._warming = True
        try:
            for _ in range(3):
                for n in self.warmup_sizes:
                    self.score([zero] * n)
        finally:
            self._warming = False
        log.info("model %s version %s loaded and warmed up", self.model.name, self.version)

    def close(self) -> None:
        if self._member_pool is not None:
            self._member_pool.shutdown(wait=False)

    def hung_members(self) -> dict[str, int]:
        """Member calls running past their timeout, by member (their threads are set aside)."""
        return self._member_pool.hung() if self._member_pool is not None else {}

    def problem(self) -> str | None:
        """Why this runner cannot answer fully right now (every spare thread is held by a hung member)."""
        pool = self._member_pool
        if pool is None:
            return None
        hung = pool.hung()
        if sum(hung.values()) < pool.max_hung:
            return None
        detail = ", ".join(f"{name} ({n})" for name, n in sorted(hung.items()) if n)
        return f"ensemble members are hung past their timeout: {detail}; their calls fail until they return"

    def to_batch(self, rows: list[Row]) -> pa.RecordBatch:
        if self.signature is not None:
            return rows_to_batch(self.signature, rows)
        arrays = [
            pa.array([r[j] for r in rows], type=field.type) for j, field in enumerate(self.input_schema)
        ]
        return pa.RecordBatch.from_arrays(arrays, schema=self.input_schema)

    def score(self, rows: list[Row]) -> list[dict[str, Any]]:
        """One dict of output columns per row; a bad row has its reason in ``error``."""
        if self.scorer is None:
            raise RuntimeError("the model is not loaded")
        out = score_batch(self.to_batch(rows), self.scorer, pool=None if self._warming else self._member_pool)
        names = out.schema.names
        columns = [col.to_pylist() for col in out.columns]
        return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]
