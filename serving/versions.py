"""Model versions in one server: the primary, a retiring one after a swap, a canary or a shadow.

A :class:`ModelVersion` is a loaded :class:`~serving.model.ModelRunner` with its own
:class:`~serving.batcher.Batcher` and per-version metrics. A swap starts a new
version next to the old one and points new requests at it. Every request holds the
version it was routed to (``holds``) from the moment it is chosen (for a versioned
KServe path: before its body is read) until it is answered, across any await (the
prediction cache, the feature store). The old version stops only once no request
holds it (:meth:`ModelVersion.retire`); a stopped version's batcher refuses work
with a 503, so nothing is ever queued where nothing runs it.

A :class:`Shadow` scores a copy of each primary micro-batch with the candidate on
a thread of its own, after the primary's answers have been delivered, and keeps
the differences. It holds at most ``max_pending`` batches; beyond that it skips
batches (counted), so a slow or failing candidate never delays a primary answer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from serving.batcher import Batcher
from serving.config import BatcherConfig
from serving.metrics import Counter, MetricSet, VersionMetrics
from serving.model import ModelRunner, Row
from udfs.core import ERROR, LABEL, PREDICTION, PROBABILITIES, short_reason

log = logging.getLogger("serving.versions")

PRIMARY, CANARY, SHADOW = "primary", "canary", "shadow"


class ModelVersion:
    """One servable model version: runner, batcher and metrics."""

    def __init__(self, runner: ModelRunner, cfg: BatcherConfig, metrics: VersionMetrics, role: str) -> None:
        self.runner = runner
        self.model = runner.model
        self.version = runner.version
        self.role = role
        self.metrics = metrics
        self.batcher = Batcher(runner.score, cfg, metrics)
        self.holds = 0  # requests routed to this version and not yet answered
        self.retired = False

    async def load(self) -> None:
        """Load and warm up on a worker thread (the event loop keeps serving meanwhile)."""
        await asyncio.get_running_loop().run_in_executor(None, self.runner.load)

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        self.runner.close()

    async def retire(self, grace_s: float) -> None:
        """Stop once no request holds this version and its batcher is idle (or after ``grace_s``:
        the longest deadline a request may have; one still holding it then gets a 503)."""
        end = time.monotonic() + grace_s
        while (self.holds > 0 or not self.batcher.idle()) and time.monotonic() < end:
            await asyncio.sleep(0.01)
        await self.stop()
        self.retired = True
        log.info("retired model %s version %s", self.model.name, self.version)


class ShadowMetrics(MetricSet):
    """How the shadow candidate's answers compare with the primary's, row for row."""

    WINDOW = 10_000  # rows behind the p99 figure

    def __init__(self, model: str, candidate: str, worker: str | None) -> None:
        base = {"model": model, "candidate": candidate}
        if worker is not None:
            base["worker"] = worker
        super().__init__(base)
        self.batches = Counter(
            "sparkscore_shadow_batches_total",
            "Primary micro-batches offered to the shadow candidate, by outcome (compared, failed, skipped)",
            label="outcome",
        )
        self.rows = Counter(
            "sparkscore_shadow_rows_compared_total", "Rows scored by both primary and candidate"
        )
        self.diff_sum = Counter(
            "sparkscore_shadow_abs_diff_sum",
            "Sum of |primary - candidate| over compared rows (max over classes for probabilities)",
        )
        self.agreements = Counter(
            "sparkscore_shadow_label_agreements_total",
            "Compared rows whose labels agree (argmax; for a score, score >= 0.5)",
        )
        self.window = np.zeros(self.WINDOW)
        self.filled = 0
        self.at = 0
        self.gauge(
            "sparkscore_shadow_abs_diff_mean", "Mean |primary - candidate| over compared rows", self.mean
        )
        self.gauge(
            "sparkscore_shadow_abs_diff_p99",
            f"99th percentile of |primary - candidate| over the last {self.WINDOW} compared rows",
            self.p99,
        )
        self.gauge(
            "sparkscore_shadow_label_agreement_ratio",
            "Share of compared rows whose labels agree",
            self.agreement,
        )

    def add(self, diffs: list[float], agreements: int) -> None:
        n = len(diffs)
        self.rows.inc(n=n)
        self.diff_sum.inc(n=math.fsum(diffs))
        self.agreements.inc(n=agreements)
        for d in diffs[-self.WINDOW :]:
            self.window[self.at] = d
            self.at = (self.at + 1) % self.WINDOW
        self.filled = min(self.WINDOW, self.filled + n)

    def mean(self) -> float:
        n = self.rows.value()
        return self.diff_sum.value() / n if n else 0.0

    def p99(self) -> float:
        return float(np.percentile(self.window[: self.filled], 99)) if self.filled else 0.0

    def agreement(self) -> float:
        n = self.rows.value()
        return self.agreements.value() / n if n else 0.0

    def metrics(self) -> list[Any]:
        return [self.batches, self.rows, self.diff_sum, self.agreements, *self.gauges]

    def summary(self) -> dict[str, Any]:
        return {
            "rows_compared": int(self.rows.value()),
            "abs_diff_mean": self.mean(),
            "abs_diff_p99": self.p99(),
            "label_agreement": self.agreement(),
            "batches": dict(self.batches.values),
        }


def compare(primary: list[dict[str, Any]], candidate: list[dict[str, Any]]) -> tuple[list[float], int]:
    """|primary - candidate| per row both scored, and how many rows' labels agree."""
    diffs: list[float] = []
    agree = 0
    for p, c in zip(primary, candidate, strict=True):
        if p.get(ERROR) is not None or c.get(ERROR) is not None:
            continue
        if PREDICTION in p:
            a, b = p[PREDICTION], c[PREDICTION]
            diffs.append(abs(a - b))
            agree += (a >= 0.5) == (b >= 0.5)
        else:
            diffs.append(max(abs(x - y) for x, y in zip(p[PROBABILITIES], c[PROBABILITIES], strict=True)))
            agree += p[LABEL] == c[LABEL]
    return diffs, agree


class Shadow:
    """Scores copies of primary micro-batches with the candidate, off the response path."""

    def __init__(self, candidate: ModelVersion, metrics: ShadowMetrics, max_pending: int) -> None:
        self.candidate = candidate
        self.metrics = metrics
        self.max_pending = max_pending
        self.pending = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="shadow")
        self._failures_logged = 0
        self.closed = False

    def offer(self, rows: list[Row], results: list[dict[str, Any]]) -> None:
        """The primary batcher's hook (on the event loop, after the primary answered)."""
        if self.closed:  # replaced by a newer candidate (a retiring primary may still offer)
            return
        if self.pending >= self.max_pending:
            self.metrics.batches.inc("skipped")
            return
        self.pending += 1
        fut = asyncio.get_running_loop().run_in_executor(self._executor, self._score, rows, results)
        fut.add_done_callback(self._done)

    def _score(self, rows: list[Row], primary: list[dict[str, Any]]) -> tuple[list[float], int, int, float]:
        t0 = time.perf_counter()
        scored = self.candidate.runner.score(rows)
        seconds = time.perf_counter() - t0
        diffs, agree = compare(primary, scored)
        return diffs, agree, len(rows), seconds

    def _done(self, fut: asyncio.Future[tuple[list[float], int, int, float]]) -> None:
        self.pending -= 1
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self.metrics.batches.inc("failed")
            # Loud at first, then quiet: a broken candidate must not flood the log.
            if self._failures_logged < 5:
                self._failures_logged += 1
                log.warning("shadow candidate %s failed: %s", self.candidate.version, short_reason(exc))
            return
        diffs, agree, n, seconds = fut.result()
        self.metrics.batches.inc("compared")
        self.metrics.add(diffs, agree)
        vm = self.candidate.metrics
        vm.exec_count.inc()
        vm.inference_count.inc(n=n)
        vm.batch_size.observe(n)
        vm.compute_duration.observe(seconds * 1e6, n)

    def close(self) -> None:
        self.closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
