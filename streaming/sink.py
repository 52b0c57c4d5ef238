"""Effectively-once Kafka output for ``foreachBatch``: fenced transactional writers, commit markers, replay dedup.

The JVM Kafka sink (and plain ``foreachBatch``) is at-least-once: a batch re-run
after a crash writes its records again, and a second live attempt of a task (a
lost executor that still runs, a retried task) writes beside the first. This sink
makes the output topics hold each record once for ``read_committed`` consumers:

* **Writers are transactional and fenced.** A batch is written either by the
  driver (small batches) or by one writer per Spark task. Every writer's
  producer has ``transactional.id = sparkscore.<query id>.<writer>`` (``driver``
  or ``p<task partition>``), so initialising it bumps the epoch and fences every
  older producer with that id: a zombie attempt can no longer write or commit,
  and its open transaction is aborted. A writer's records go in one transaction
  (one per task and batch, not per record).
* **Commit markers.** The commit topic (compacted; keyed) holds per query the
  *batch marker*: the last batch committed, with the output positions after it.
  A task writer adds a *writer marker* (batch, first record id, record count) in
  the same transaction as its records; the driver commits the batch marker once
  every task has committed (on the driver path, in the same transaction as the
  records, so the whole batch becomes visible at once).
* **Replays.** A batch whose batch marker exists is skipped (Spark re-runs the
  last batch when a crash came between our marker and its own commit log). A
  task writer that finds its writer marker for the batch, for the same first
  record, skips its records: another attempt committed them. A batch that may
  have been partly committed (the first batch a process runs; a retried task)
  is first de-duplicated by record id against the committed output since the
  last batch marker, after fencing the writers that could still be writing.

Every output record carries headers naming the query, the batch and a record id
(for scored events, the source ``topic/partition/offset``); dead letters keep the
input message's headers too. ``read_uncommitted`` consumers also see the records
of aborted transactions (a crashed or fenced attempt); nothing is aborted in
normal running. Brokers without ``read_committed`` isolation (Tansu) show aborted
records to every consumer: there the recovery scan still de-duplicates a replay,
but a writer that crashed after sending part of a transaction leaves those
records visible. See the README's "Guarantees and limits".

Layout: :mod:`streaming.plan` (the batch plan, headers, errors), :mod:`streaming.txn`
(fenced transactional producers, producing and committing), :mod:`streaming.markers`
(commit markers and the recovery scans), :mod:`streaming.dead_letters` and
:mod:`streaming.task_writer` (the executor path). This module is the driver side, and
re-exports the names other modules use.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from confluent_kafka import KafkaException, Producer

from streaming import faults
from streaming import kafka_client as kc
from streaming.dead_letters import CLIENT_MAX_BYTES, RECORD_OVERHEAD, record_rows
from streaming.markers import (
    COMMIT_TOPIC_CONFIGS,
    Marker,
    WriterMarker,
    committed_records,
    writer_markers,
    writers_named,
    written_ids,
)
from streaming.plan import (
    H_BATCH,
    H_ERROR,
    H_ID,
    H_OFFSET,
    H_PARTITION,
    H_QUERY,
    H_TOPIC,
    RECORD_COLUMNS,
    BatchPlan,
    Header,
    Positions,
    Record,
    SinkError,
    merge_positions,
)
from streaming.task_writer import SUMMARY_SCHEMA, BatchResult, summary_batch, write_partition, write_task
from streaming.txn import (
    ABANDONED,
    Delivery,
    abort,
    commit_transaction,
    flush,
    open_producer,
    produce,
    reason_of,
)

__all__ = [
    "CLIENT_MAX_BYTES",
    "COMMIT_TOPIC_CONFIGS",
    "H_BATCH",
    "H_ERROR",
    "H_ID",
    "H_OFFSET",
    "H_PARTITION",
    "H_QUERY",
    "H_TOPIC",
    "RECORD_COLUMNS",
    "RECORD_OVERHEAD",
    "SUMMARY_SCHEMA",
    "BatchPlan",
    "BatchResult",
    "EffectivelyOnceSink",
    "Header",
    "Marker",
    "Positions",
    "Record",
    "SinkError",
    "WriterMarker",
    "flush",
    "merge_positions",
    "produce",
    "record_rows",
    "summary_batch",
    "write_partition",
    "write_task",
    "writer_markers",
    "written_ids",
]

log = logging.getLogger("sparkscore.streaming.sink")


class EffectivelyOnceSink:
    """Driver side: batch markers in ``commit_topic``, the plan for each batch, the driver's writer.

    Use it from the query's ``foreachBatch`` function (:meth:`begin`, then :meth:`write_local`
    or ``mapInArrow(write_partition(plan))``, then :meth:`commit`) and call :meth:`bind` with
    the query's id once it has started (the id survives restarts on the same checkpoint, so
    markers of earlier runs count).
    """

    def __init__(
        self,
        *,
        client: dict[str, str],
        topics: tuple[str, ...],
        commit_topic: str,
        producer: dict[str, str] | None = None,
        latest_by: str = kc.LIST_OFFSETS,
        timeout_s: float = 120.0,
        name: str = "sink",
    ) -> None:
        self.client = client
        self.topics = topics
        self.commit_topic = commit_topic
        self.producer_conf = producer or {}
        self.latest_by = latest_by
        self.timeout_s = timeout_s
        self.name = name
        self._query_id: str | None = None
        self._bound = threading.Event()
        self._last: Marker | None = None
        self._loaded = False
        self._commit_partition = 0
        self._commit_pos = 0  # offset after this query's newest batch marker
        # False until this process has committed a batch: the next batch may follow a crash.
        self._clean = False
        self._offsets: kc.Offsets | None = None
        self._producer: Producer | None = None
        self._in_txn = False
        self._fenced = 0  # task writers p0 .. p<n-1> this process has fenced
        self._scanned: Positions = {}
        self._max_bytes: dict[str, int] | None = None
        self.cancel = threading.Event()  # set when the job is failing: driver-side waits end
        self.totals: dict[str, int] = {}
        self.batches = 0
        self.local_batches = 0  # of which the driver wrote the records itself

    # -- wiring ---------------------------------------------------------------------------------
    def bind(self, query_id: str) -> None:
        self._query_id = str(query_id)
        self._bound.set()

    @property
    def query_id(self) -> str:
        if not self._bound.wait(60):
            raise SinkError("the sink was never bound to a query id; call bind(query.id) after start()")
        assert self._query_id is not None
        return self._query_id

    @property
    def offsets(self) -> kc.Offsets:
        if self._offsets is None:
            self._offsets = kc.Offsets(self.client, latest_by=self.latest_by, timeout_s=self.timeout_s)
        return self._offsets

    @property
    def max_bytes(self) -> dict[str, int]:
        """The largest record each output topic accepts (``max.message.bytes``), asked once."""
        if self._max_bytes is None:
            found = kc.topic_configs(self.client, self.topics, min(self.timeout_s, 30.0))
            self._max_bytes = {
                t: int(cfg["max.message.bytes"]) for t, cfg in found.items() if "max.message.bytes" in cfg
            }
        return self._max_bytes

    def _plan(self, batch_id: int, start: Positions, **kw: Any) -> BatchPlan:
        return BatchPlan(
            query_id=self.query_id,
            batch_id=batch_id,
            topics=self.topics,
            client=self.client,
            producer=self.producer_conf,
            commit_topic=self.commit_topic,
            start=start,
            max_bytes=self.max_bytes,
            latest_by=self.latest_by,
            timeout_s=self.timeout_s,
            fault=faults.FaultPlan.from_env(),
            **kw,
        )

    @property
    def producer(self) -> Producer:
        """The driver's transactional writer (``sparkscore.<query>.driver``); opening it fences older drivers."""
        if self._producer is None:
            self._producer = open_producer(self._plan(-1, {}), "driver", self.cancel)
        return self._producer

    def _drop_producer(self) -> None:
        """After any failure: abort, purge, and open a new producer next time (nothing old is sent)."""
        if self._producer is not None:
            abort(self._producer, self.timeout_s)
            self._producer = None
        self._in_txn = False

    def _abandon(self) -> None:
        """An injected crash: leave the transaction open and the producer running, as a dead process would."""
        if self._producer is not None:
            ABANDONED.append(self._producer)
            self._producer = None
        self._in_txn = False

    def _begin_txn(self) -> Producer:
        producer = self.producer
        if not self._in_txn:
            try:
                producer.begin_transaction()
            except KafkaException as exc:
                self._drop_producer()
                raise SinkError(
                    f"cannot begin a transaction on {self.commit_topic}'s writer: {reason_of(exc)}"
                ) from None
            self._in_txn = True
        return producer

    # -- commit log -----------------------------------------------------------------------------
    def last_marker(self) -> Marker | None:
        """The newest batch marker of this query in the commit topic (read once per process).

        All markers of a query go to one partition of the commit topic (chosen by its id), so
        they are in order there. Reads from the earliest offset still stored: retention or
        ``deleteRecords`` may have removed early markers (compaction keeps the newest per key).

        Fences first: a writer of this query that died between sending a marker and committing
        its transaction holds back the partition's last stable offset (for every query and
        stats reader sharing the commit topic) until the coordinator aborts it, a minute or
        more later. Opening the driver's writer and every task writer the markers name, open
        transactions included, aborts them now; only then is the topic read ``read_committed``.
        """
        if self._loaded:
            return self._last
        query = self.query_id.encode()
        partitions = self.offsets.partitions().get(self.commit_topic)
        if not partitions:
            raise SinkError(
                f"the commit topic {self.commit_topic!r} does not exist on {self.client.get('bootstrap.servers')}"
            )
        self._commit_partition = zlib.crc32(query) % len(partitions)
        tp = (self.commit_topic, self._commit_partition)
        _ = self.producer  # fences this query's older drivers
        named = writers_named(
            self.client, self.offsets, tp, self.query_id, self.timeout_s, cancel=self.cancel
        )
        self.fence_writers(named)
        best: Marker | None = None
        position = 0
        for m in committed_records(self.client, self.offsets, {tp: 0}, self.timeout_s, cancel=self.cancel):
            raw = m.value()
            if m.key() == query and raw:
                marker = Marker.from_json(raw)
                if best is None or marker.batch_id >= best.batch_id:
                    best, position = marker, m.offset() + 1
        self._last, self._loaded, self._commit_pos = best, True, position
        return best

    def _write_marker(self, marker: Marker) -> None:
        """Put ``marker`` into the open transaction (or a new one) and commit it."""
        producer = self._begin_txn()
        delivery = Delivery()
        try:
            producer.produce(
                self.commit_topic,
                key=marker.query_id.encode(),
                value=marker.to_json(),
                partition=self._commit_partition,
                headers=[(H_QUERY, marker.query_id.encode()), (H_BATCH, str(marker.batch_id).encode())],
                on_delivery=delivery,
            )
            flush(producer, delivery, self.timeout_s, f"batch {marker.batch_id}'s commit marker", self.cancel)
            commit_transaction(
                producer, self.timeout_s, f"batch {marker.batch_id}'s commit marker", self.cancel
            )
        except (SinkError, KafkaException) as exc:
            self._drop_producer()
            if isinstance(exc, SinkError):
                raise
            raise SinkError(
                f"cannot write the commit marker of batch {marker.batch_id}: {reason_of(exc)}"
            ) from None
        self._in_txn = False
        self._last = marker
        self._commit_pos = delivery.ends.get((self.commit_topic, self._commit_partition), self._commit_pos)

    def current_ends(self) -> Positions:
        known = self.offsets.partitions()
        tps = [(t, p) for t in self.topics for p in known.get(t, [])]
        out: Positions = {}
        for (t, p), off in self.offsets.latest(tps).items():
            out.setdefault(t, {})[str(p)] = off
        return out

    def fence_writers(self, writers: int) -> None:
        """Open (and so fence) the task writers ``p0 .. p<writers-1>`` of earlier runs and attempts.

        Each writer is fenced once per process (later calls fence only writers not fenced yet).
        """
        first, self._fenced = self._fenced, max(self._fenced, writers)
        if writers <= first:
            return
        plan = self._plan(-1, {})

        def fence(i: int) -> None:
            kc.discard_producer(open_producer(plan, f"p{i}", self.cancel))

        with ThreadPoolExecutor(max_workers=min(8, writers - first)) as pool:
            list(pool.map(fence, range(first, writers)))

    # -- batches --------------------------------------------------------------------------------
    def begin(self, batch_id: int, *, writers: Callable[[], int] | None = None) -> BatchPlan | None:
        """The plan for ``batch_id``, or None when a marker says it is already written.

        ``writers`` gives the number of task writers this batch will have (asked only after a
        restart, to fence them with the ones the markers recorded: a writer that died
        mid-transaction otherwise holds back the recovery scan until the broker aborts it).
        """
        last = self.last_marker()
        if last is None:
            if batch_id > 0:
                # Spark numbers a new query's batches from 0: batches 0..batch_id-1 were committed
                # with markers that are gone. Writing again as a new query would duplicate them.
                raise SinkError(
                    f"the commit topic {self.commit_topic!r} holds no marker of query {self.query_id}, but its "
                    f"checkpoint has committed batches up to {batch_id - 1}: the markers were lost (retention, "
                    "deleteRecords, a broker that lost its data, or a changed commit_topic); refusing to write "
                    f"batch {batch_id} as a new query. Restore the topic, or start over with a new checkpoint"
                )
            # A new query: mark where the output topics end, so a crash in batch 0 is scanned from here.
            self._write_marker(Marker(self.query_id, -1, self.current_ends()))
            self._clean = True
            last = self._last
            assert last is not None
        if batch_id < last.batch_id:
            # Spark only ever re-runs its last batch. A checkpoint further behind was restored from
            # an older copy: its batches' offset ranges need not match what the markers recorded,
            # so skipping up to the marker could drop records, and writing would duplicate them.
            raise SinkError(
                f"the checkpoint is behind the commit topic: it runs batch {batch_id} of query "
                f"{self.query_id}, but {self.commit_topic!r} says batch {last.batch_id} was committed "
                "(a checkpoint restored from an older backup?); use the query's newest checkpoint, or start "
                "over with a new checkpoint"
            )
        if batch_id == last.batch_id:
            # Spark re-runs the batch it had not logged as done: all of it is already written.
            log.info("batch %d already committed: skipping", batch_id)
            written = sum(n for t, n in last.counts.items() if t in (*self.topics, "skipped"))
            self.totals["skipped"] = self.totals.get("skipped", 0) + written
            return None
        plan = self._plan(
            batch_id, last.positions, commit_partition=self._commit_partition, commit_start=self._commit_pos
        )
        faults.point(plan.fault, "driver.before_produce", batch=batch_id)
        if not self._clean:
            # The first batch of this process: a crashed run may have committed part of it. Fence
            # its writers first, so nothing more can be committed behind the scan's back.
            _ = self.producer
            self.fence_writers(max(last.writers, writers() if writers is not None else 0))
            seen, scanned = written_ids(plan, self.offsets, cancel=self.cancel)
            plan = replace(plan, skip=frozenset(seen))
            if seen:
                print(
                    f"[sparkscore] {self.name}: batch {batch_id} was partly committed before a restart; "
                    f"skipping its {len(seen):,} records already in the output",
                    flush=True,
                )
            self._scanned = scanned
        else:
            self._scanned = {}
        self._clean = False
        return plan

    def commit(self, plan: BatchPlan, result: BatchResult) -> Marker:
        """Commit the batch marker (on the driver path, with the batch's records in one transaction)."""
        positions = merge_positions(merge_positions(plan.start, self._scanned), result.ends)
        counts = {**result.counts, "skipped": result.skipped}
        writers = max(result.writers, self._last.writers if self._last else 0)
        marker = Marker(plan.query_id, plan.batch_id, positions, counts, writers)
        try:
            faults.point(plan.fault, "driver.before_marker", batch=plan.batch_id)
        except faults.InjectedFault:
            self._abandon()
            raise
        self._write_marker(marker)
        self._clean = True
        self.batches += 1
        for k, v in counts.items():
            self.totals[k] = self.totals.get(k, 0) + v
        faults.point(plan.fault, "driver.after_marker", batch=plan.batch_id)
        return marker

    def write_local(self, plan: BatchPlan, records: Iterable[Record]) -> BatchResult:
        """Produce a small batch from the driver, in the transaction :meth:`commit` then commits."""
        producer = self._begin_txn()
        try:
            counts, skipped, ends = produce(producer, plan, records, cancel=self.cancel)
        except faults.InjectedFault:
            self._abandon()
            raise
        except (SinkError, KafkaException) as exc:
            self._drop_producer()
            if isinstance(exc, SinkError):
                raise
            raise SinkError(f"cannot write batch {plan.batch_id}: {reason_of(exc)}") from None
        self.local_batches += 1
        return BatchResult(counts, skipped, ends)

    def close(self) -> None:
        if self._producer is not None:
            if self.cancel.is_set():
                # The broker is lost: no abort to wait for (a restart's writer fences this one).
                kc.discard_producer(self._producer)
            elif self._in_txn:
                abort(self._producer, self.timeout_s)
            self._producer = None
            self._in_txn = False
        if self._offsets is not None:
            self._offsets.close()
            self._offsets = None
