"""Effectively-once Kafka output for ``foreachBatch``: per-batch commit markers plus replay dedup.

The JVM Kafka sink (and plain ``foreachBatch``) is at-least-once: a batch
re-run after a crash writes its records again. This sink makes the output
topics hold each record exactly once:

* every output record carries headers naming the query, the batch and a
  record id (for scored events, the source ``topic/partition/offset``);
* after a batch's records are all acknowledged, the driver writes a commit
  marker to a commit topic (Kafka key = query id; value = batch id and the
  output topics' end positions after the batch);
* a batch whose marker exists is skipped (Spark re-runs the last batch after a
  restart when the crash came between our marker and its own commit log);
* a batch without a marker that may have been partly written (the first
  batch a process runs, or a retried task) first scans the output topics from
  the last marker's positions and skips the record ids already there.

Producers are idempotent, so broker retries neither duplicate nor reorder.
The guarantee assumes the processes of a killed run are gone before the
restart (in local mode they die with the driver; a cluster manager kills a
dead driver's executors), and that only this query writes records with its
query id. Consumers need no ``read_committed``: nothing is ever written twice.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from streaming import kafka_client as kc

log = logging.getLogger("sparkscore.streaming.sink")

H_QUERY = "sparkscore.query"
H_BATCH = "sparkscore.batch"
H_ID = "sparkscore.id"
H_ERROR = "sparkscore.error"
H_TOPIC = "sparkscore.source.topic"
H_PARTITION = "sparkscore.source.partition"
H_OFFSET = "sparkscore.source.offset"

# The record layout the executor writer consumes (see streaming.pipeline.to_records).
RECORD_COLUMNS = ("dest", "key", "value", "error", "rid")
SUMMARY_SCHEMA = "kind string, topic string, partition int, value long"

Positions = dict[str, dict[str, int]]  # topic -> partition (str) -> next offset


class SinkError(RuntimeError):
    """Records could not be delivered, or the commit log cannot be read."""


@dataclass(frozen=True)
class Marker:
    query_id: str
    batch_id: int
    positions: Positions
    counts: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "query_id": self.query_id,
                "batch_id": self.batch_id,
                "positions": self.positions,
                "counts": self.counts,
                "committed_at": time.time(),
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Marker:
        d = json.loads(raw)
        return cls(d["query_id"], int(d["batch_id"]), d.get("positions", {}), d.get("counts", {}))


@dataclass(frozen=True)
class BatchPlan:
    """What the writers of one batch need: small and picklable."""

    query_id: str
    batch_id: int
    topics: tuple[str, ...]  # dest index -> output topic
    client: dict[str, str]
    producer: dict[str, str]
    start: Positions  # the output topics' positions when the batch began
    skip: frozenset[str] = frozenset()  # record ids an earlier attempt already wrote
    latest_by: str = kc.LIST_OFFSETS
    timeout_s: float = 120.0


def merge_positions(a: Positions, b: Positions) -> Positions:
    out = {t: dict(parts) for t, parts in a.items()}
    for t, parts in b.items():
        for p, off in parts.items():
            out.setdefault(t, {})[p] = max(out.get(t, {}).get(p, 0), int(off))
    return out


def written_ids(plan: BatchPlan, offsets: kc.Offsets | None = None) -> tuple[set[str], Positions]:
    """Record ids this query already wrote for ``plan.batch_id`` after ``plan.start``, and the ends scanned to."""
    own = offsets is None
    offsets = offsets or kc.Offsets(plan.client, latest_by=plan.latest_by, timeout_s=plan.timeout_s)
    try:
        known = offsets.partitions()
        tps = [(t, p) for t in plan.topics for p in known.get(t, [])]
        ends = offsets.latest(tps)
        starts = {tp: int(plan.start.get(tp[0], {}).get(str(tp[1]), 0)) for tp in tps}
        query, batch = plan.query_id.encode(), str(plan.batch_id).encode()
        ids: set[str] = set()
        consumer = kc.make_consumer(plan.client)
        try:
            for (topic, part), end in ends.items():
                for msgs in kc.read_range(
                    consumer,
                    topic,
                    part,
                    starts[(topic, part)],
                    end,
                    timeout_s=plan.timeout_s,
                    fail_on_data_loss=False,
                ):
                    for m in msgs:
                        h = dict(m.headers() or ())
                        rid = h.get(H_ID)
                        if h.get(H_QUERY) == query and h.get(H_BATCH) == batch and isinstance(rid, bytes):
                            ids.add(rid.decode())
        finally:
            consumer.close()
        scanned: Positions = {}
        for (topic, part), end in ends.items():
            scanned.setdefault(topic, {})[str(part)] = end
        return ids, scanned
    finally:
        if own:
            offsets.close()


class _Delivery:
    """Delivery reports of one task: the furthest offset per partition, and any failure."""

    def __init__(self) -> None:
        self.ends: dict[tuple[str, int], int] = {}
        self.errors: list[str] = []

    def __call__(self, err: Any, msg: Any) -> None:
        if err is not None:
            if len(self.errors) < 5:
                self.errors.append(f"{msg.topic()}: {err}")
            return
        tp = (msg.topic(), msg.partition())
        if msg.offset() + 1 > self.ends.get(tp, -1):
            self.ends[tp] = msg.offset() + 1


def produce(
    producer: Any,
    plan: BatchPlan,
    records: Iterable[tuple[int, bytes | None, bytes | None, str | None, str, list[tuple[str, bytes]]]],
) -> tuple[dict[str, int], int, Positions]:
    """Send (dest, key, value, error, record id, extra headers) records; wait until all are acknowledged.

    Returns counts per output topic, the number skipped as already written, and
    the end positions the acknowledgements reached.
    """
    delivery = _Delivery()
    counts = dict.fromkeys(plan.topics, 0)
    skipped = 0
    query, batch = plan.query_id.encode(), str(plan.batch_id).encode()
    for i, (dest, key, value, error, rid, extra) in enumerate(records):
        if rid in plan.skip:
            skipped += 1
            continue
        topic = plan.topics[dest]
        headers = [(H_QUERY, query), (H_BATCH, batch), (H_ID, rid.encode()), *extra]
        if error is not None:
            headers.append((H_ERROR, error.encode()))
        while True:
            try:
                producer.produce(topic, value=value, key=key, headers=headers, on_delivery=delivery)
                break
            except BufferError:
                producer.poll(0.05)  # local queue full: let deliveries drain
        counts[topic] += 1
        if i % 2000 == 0:
            producer.poll(0)
    left = producer.flush(plan.timeout_s)
    if left:
        raise SinkError(f"{left} records were not acknowledged within {plan.timeout_s:g} s")
    if delivery.errors:
        raise SinkError(f"records could not be delivered: {'; '.join(delivery.errors)}")
    ends: Positions = {}
    for (topic, part), off in delivery.ends.items():
        ends.setdefault(topic, {})[str(part)] = off
    return counts, skipped, ends


def record_rows(batch: pa.RecordBatch) -> Iterator[tuple[int, Any, Any, Any, str, list[tuple[str, bytes]]]]:
    """Rows of the pipeline's record layout; the record id is the source ``topic/partition/offset``.

    Dead letters also get the source position as three headers of their own.
    """
    dests = batch.column("dest").to_numpy(zero_copy_only=False)
    keys, values, rids = (batch.column(name).to_pylist() for name in ("key", "value", "rid"))
    errors = batch.column("error")
    errs = [None] * batch.num_rows if errors.null_count == batch.num_rows else errors.to_pylist()
    for dest, key, value, error, rid in zip(dests, keys, values, errs, rids, strict=True):
        extra: list[tuple[str, bytes]] = []
        if error is not None:
            topic, part, off = rid.rsplit("/", 2)
            extra = [(H_TOPIC, topic.encode()), (H_PARTITION, part.encode()), (H_OFFSET, off.encode())]
        yield int(dest), key, value, error, rid, extra


def write_partition(plan: BatchPlan) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """A ``mapInArrow`` function: produce one task's records, return a summary (counts, end positions)."""

    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        task_plan = plan
        ctx = TaskContext.get()
        if ctx is not None and ctx.attemptNumber() > 0:
            # A retried task: its failed attempt may have written part of this partition.
            seen, _ = written_ids(plan)
            task_plan = BatchPlan(**{**plan.__dict__, "skip": plan.skip | frozenset(seen)})
        producer = kc.cached("producer", {**plan.client, **plan.producer})
        counts, skipped, ends = produce(producer, task_plan, (r for b in batches for r in record_rows(b)))
        yield summary_batch(counts, skipped, ends)

    return write


def summary_batch(counts: dict[str, int], skipped: int, ends: Positions) -> pa.RecordBatch:
    rows: list[tuple[str, str, int, int]] = [("count", t, -1, n) for t, n in counts.items()]
    rows.append(("skipped", "", -1, skipped))
    rows += [("end", t, int(p), off) for t, parts in ends.items() for p, off in parts.items()]
    kind, topic, part, value = (list(c) for c in zip(*rows, strict=True))
    return pa.RecordBatch.from_arrays(
        [
            pa.array(kind, pa.string()),
            pa.array(topic, pa.string()),
            pa.array(part, pa.int32()),
            pa.array(value, pa.int64()),
        ],
        names=["kind", "topic", "partition", "value"],
    )


@dataclass
class BatchResult:
    counts: dict[str, int]
    skipped: int
    ends: Positions

    @classmethod
    def from_rows(cls, rows: Iterable[Any]) -> BatchResult:
        counts: dict[str, int] = {}
        skipped = 0
        ends: Positions = {}
        for kind, topic, part, value in rows:
            if kind == "count":
                counts[topic] = counts.get(topic, 0) + int(value)
            elif kind == "skipped":
                skipped += int(value)
            else:
                ends = merge_positions(ends, {topic: {str(part): int(value)}})
        return cls(counts, skipped, ends)


class ExactlyOnceSink:
    """Driver side: commit markers in ``commit_topic`` and the plan for each batch.

    Use :meth:`foreach_batch` as the query's ``foreachBatch`` function and call
    :meth:`bind` with the query's id once it has started (the id survives
    restarts on the same checkpoint, so markers of earlier runs count).
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
        # False until this process has committed a batch: the next batch may follow a crash.
        self._clean = False
        self._offsets: kc.Offsets | None = None
        self._producer: Any = None
        self._scanned: Positions = {}
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
    def producer(self) -> Any:
        if self._producer is None:
            # linger 0: the driver sends one marker per batch and waits for it.
            self._producer = kc.make_producer({**self.client, **self.producer_conf}, **{"linger.ms": 0})
        return self._producer

    # -- commit log -----------------------------------------------------------------------------
    def last_marker(self) -> Marker | None:
        """The newest marker of this query in the commit topic (read once per process)."""
        if self._loaded:
            return self._last
        query = self.query_id.encode()
        tps = [(self.commit_topic, p) for p in self.offsets.partitions().get(self.commit_topic, [])]
        ends = self.offsets.latest(tps)
        best: Marker | None = None
        consumer = kc.make_consumer(self.client)
        try:
            for (topic, part), end in ends.items():
                for msgs in kc.read_range(
                    consumer, topic, part, 0, end, timeout_s=self.timeout_s, fail_on_data_loss=False
                ):
                    for m in msgs:
                        raw = m.value()
                        if m.key() == query and raw:
                            marker = Marker.from_json(raw)
                            if best is None or marker.batch_id >= best.batch_id:
                                best = marker
        finally:
            consumer.close()
        self._last, self._loaded = best, True
        return best

    def _write_marker(self, marker: Marker) -> None:
        delivery = _Delivery()
        self.producer.produce(
            self.commit_topic,
            key=marker.query_id.encode(),
            value=marker.to_json(),
            headers=[(H_QUERY, marker.query_id.encode()), (H_BATCH, str(marker.batch_id).encode())],
            on_delivery=delivery,
        )
        if self.producer.flush(self.timeout_s) or delivery.errors:
            raise SinkError(f"cannot write the commit marker for batch {marker.batch_id}: {delivery.errors}")
        self._last = marker

    def current_ends(self) -> Positions:
        known = self.offsets.partitions()
        tps = [(t, p) for t in self.topics for p in known.get(t, [])]
        out: Positions = {}
        for (t, p), off in self.offsets.latest(tps).items():
            out.setdefault(t, {})[str(p)] = off
        return out

    # -- batches --------------------------------------------------------------------------------
    def begin(self, batch_id: int) -> BatchPlan | None:
        """The plan for ``batch_id``, or None when a marker says it is already written."""
        last = self.last_marker()
        if last is None:
            # A new query: mark where the output topics end, so a crash in batch 0 is scanned from here.
            last = Marker(self.query_id, -1, self.current_ends())
            self._write_marker(last)
            self._clean = True
        if batch_id <= last.batch_id:
            log.info("batch %d already committed (last marker %d): skipping", batch_id, last.batch_id)
            return None
        plan = BatchPlan(
            query_id=self.query_id,
            batch_id=batch_id,
            topics=self.topics,
            client=self.client,
            producer=self.producer_conf,
            start=last.positions,
            latest_by=self.latest_by,
            timeout_s=self.timeout_s,
        )
        if not self._clean:
            seen, scanned = written_ids(plan, self.offsets)
            plan = BatchPlan(**{**plan.__dict__, "skip": frozenset(seen)})
            if seen:
                print(
                    f"[sparkscore] {self.name}: batch {batch_id} was partly written before a restart; "
                    f"skipping its {len(seen):,} records already in the output",
                    flush=True,
                )
            self._scanned = scanned
        else:
            self._scanned = {}
        self._clean = False
        return plan

    def commit(self, plan: BatchPlan, result: BatchResult) -> Marker:
        positions = merge_positions(merge_positions(plan.start, self._scanned), result.ends)
        counts = {**result.counts, "skipped": result.skipped}
        marker = Marker(plan.query_id, plan.batch_id, positions, counts)
        self._write_marker(marker)
        self._clean = True
        self.batches += 1
        for k, v in counts.items():
            self.totals[k] = self.totals.get(k, 0) + v
        return marker

    def write_local(
        self, plan: BatchPlan, records: Iterable[tuple[int, Any, Any, Any, str, list[Any]]]
    ) -> BatchResult:
        """Produce a small batch from the driver (window statistics, small scoring batches)."""
        counts, skipped, ends = produce(self.producer, plan, records)
        self.local_batches += 1
        return BatchResult(counts, skipped, ends)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(self.timeout_s)
            self._producer = None
        if self._offsets is not None:
            self._offsets.close()
            self._offsets = None
