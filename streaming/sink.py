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
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa
from confluent_kafka import KafkaError, KafkaException, Producer

from streaming import faults
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

# Commit topic settings for a topic this job creates: compacted (the newest marker per key is
# kept for ever, older ones go), and segments that roll hourly so compaction keeps the part a
# restart must read small.
COMMIT_TOPIC_CONFIGS = {"cleanup.policy": "compact", "segment.ms": "3600000"}

# Bytes a record costs on top of its key, value and header bytes in a one-record batch.
RECORD_OVERHEAD = 128
# librdkafka's own default for the largest message it sends.
CLIENT_MAX_BYTES = 1_000_000

Positions = dict[str, dict[str, int]]  # topic -> partition (str) -> next offset
Header = tuple[str, str | bytes | None]
Record = tuple[int, bytes | None, bytes | None, str | None, str, list[Header]]


class SinkError(RuntimeError):
    """Records could not be delivered, or the commit log cannot be read or trusted."""


@dataclass(frozen=True)
class Marker:
    """A batch marker: ``batch_id`` is committed; the output ends at ``positions`` after it."""

    query_id: str
    batch_id: int
    positions: Positions
    counts: dict[str, int] = field(default_factory=dict)
    writers: int = 0  # task writers (p0..p<writers-1>) this query has used: fenced on recovery

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "kind": "batch",
                "query_id": self.query_id,
                "batch_id": self.batch_id,
                "positions": self.positions,
                "counts": self.counts,
                "writers": self.writers,
                "committed_at": time.time(),
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Marker:
        d = json.loads(raw)
        return cls(
            d["query_id"],
            int(d["batch_id"]),
            d.get("positions", {}),
            d.get("counts", {}),
            int(d.get("writers", 0)),
        )


@dataclass(frozen=True)
class WriterMarker:
    """A task writer committed ``records`` input records of ``batch_id``, starting at record id ``first``."""

    query_id: str
    batch_id: int
    writer: str
    first: str
    records: int
    attempt: int = 0

    @property
    def key(self) -> bytes:
        return f"{self.query_id}/{self.writer}".encode()

    def to_json(self) -> bytes:
        return json.dumps({"kind": "writer", **self.__dict__, "committed_at": time.time()}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> WriterMarker:
        d = json.loads(raw)
        return cls(
            d["query_id"], int(d["batch_id"]), d["writer"], d["first"], int(d["records"]), int(d["attempt"])
        )


@dataclass(frozen=True)
class BatchPlan:
    """What the writers of one batch need: small and picklable."""

    query_id: str
    batch_id: int
    topics: tuple[str, ...]  # dest index -> output topic (index 1, when present, is the dead-letter topic)
    client: dict[str, str]
    producer: dict[str, str]
    commit_topic: str
    start: Positions  # the output topics' positions after the last committed batch
    commit_partition: int = 0  # every marker of this query goes to this partition of the commit topic
    commit_start: int = 0  # the offset after the last batch marker there: this batch's writer markers follow
    skip: frozenset[str] = frozenset()  # record ids an earlier attempt already committed
    max_bytes: dict[str, int] = field(default_factory=dict)  # topic -> largest record it accepts
    latest_by: str = kc.LIST_OFFSETS
    timeout_s: float = 120.0
    fault: faults.FaultPlan = faults.NO_FAULTS

    def transactional_id(self, writer: str) -> str:
        return f"sparkscore.{self.query_id}.{writer}"


def merge_positions(a: Positions, b: Positions) -> Positions:
    out = {t: dict(parts) for t, parts in a.items()}
    for t, parts in b.items():
        for p, off in parts.items():
            out.setdefault(t, {})[p] = max(out.get(t, {}).get(p, 0), int(off))
    return out


def _committed_records(
    client: dict[str, str],
    offsets: kc.Offsets,
    starts: dict[tuple[str, int], int],
    timeout_s: float,
    *,
    recent: bool = False,
) -> Iterator[Any]:
    """Committed records of the given partitions from ``starts`` to their current ends.

    Reads with ``read_committed`` from the later of ``start`` and the log start (retention or
    ``deleteRecords`` may have removed the early records), up to the high watermark, so a
    transaction still open there is waited for rather than cut off. ``recent``: the starts
    are a moment old (no log start lookup), and the per-worker cached consumer is used.
    """
    if not starts:
        return
    ends = offsets.latest(list(starts))
    earliest = {} if recent else offsets.earliest([tp for tp, end in ends.items() if end > starts[tp]])
    conf = kc.committed_reader_conf(client)
    consumer = kc.cached("consumer", conf) if recent else kc.make_consumer(conf)
    try:
        for (topic, part), end in ends.items():
            begin = max(starts[(topic, part)], earliest.get((topic, part), 0))
            for msgs in kc.read_range(
                consumer,
                topic,
                part,
                begin,
                end,
                timeout_s=timeout_s,
                fail_on_data_loss=False,
                committed=True,
            ):
                yield from msgs
    finally:
        if not recent:
            consumer.close()


def written_ids(plan: BatchPlan, offsets: kc.Offsets | None = None) -> tuple[set[str], Positions]:
    """Record ids this query committed for ``plan.batch_id`` after ``plan.start``, and the ends scanned to."""
    own = offsets is None
    offsets = offsets or kc.Offsets(plan.client, latest_by=plan.latest_by, timeout_s=plan.timeout_s)
    try:
        known = offsets.partitions()
        tps = [(t, p) for t in plan.topics for p in known.get(t, [])]
        starts = {tp: int(plan.start.get(tp[0], {}).get(str(tp[1]), 0)) for tp in tps}
        query, batch = plan.query_id.encode(), str(plan.batch_id).encode()
        ids: set[str] = set()
        scanned: Positions = {}
        for m in _committed_records(plan.client, offsets, starts, plan.timeout_s):
            h = dict(m.headers() or ())
            rid = h.get(H_ID)
            if h.get(H_QUERY) == query and h.get(H_BATCH) == batch and isinstance(rid, bytes):
                ids.add(rid.decode())
            tp_ends = scanned.setdefault(m.topic(), {})
            tp_ends[str(m.partition())] = max(tp_ends.get(str(m.partition()), 0), m.offset() + 1)
        return ids, scanned
    finally:
        if own:
            offsets.close()


def writer_markers(plan: BatchPlan, offsets: kc.Offsets) -> dict[str, WriterMarker]:
    """Writer markers of ``plan``'s batch committed since the batch began (writer -> marker)."""
    starts = {(plan.commit_topic, plan.commit_partition): plan.commit_start}
    prefix = f"{plan.query_id}/".encode()
    found: dict[str, WriterMarker] = {}
    for m in _committed_records(plan.client, offsets, starts, plan.timeout_s, recent=True):
        key, raw = m.key(), m.value()
        if key and raw and key.startswith(prefix):
            d = json.loads(raw)
            if d.get("kind") == "writer" and int(d["batch_id"]) == plan.batch_id:
                marker = WriterMarker.from_json(raw)
                found[marker.writer] = marker
    return found


class _Delivery:
    """Delivery reports of one writer: the furthest offset per partition, and any failure."""

    def __init__(self) -> None:
        self.ends: dict[tuple[str, int], int] = {}
        self.errors: list[str] = []
        self.failed = 0

    def __call__(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.failed += 1
            if len(self.errors) < 5:
                self.errors.append(f"{msg.topic()}: {err.str() if isinstance(err, KafkaError) else err}")
            return
        tp = (msg.topic(), msg.partition())
        if msg.offset() + 1 > self.ends.get(tp, -1):
            self.ends[tp] = msg.offset() + 1

    def raise_if_failed(self, what: str) -> None:
        if self.errors:
            raise SinkError(
                f"{self.failed} record(s) of {what} could not be delivered: {'; '.join(self.errors)}"
            )


def flush(
    producer: Producer,
    delivery: _Delivery,
    timeout_s: float,
    what: str,
    cancel: threading.Event | None = None,
) -> None:
    """Wait until every record is acknowledged or failed; raise :class:`SinkError` naming why not.

    ``cancel`` (the driver's: set when the broker is lost) ends the wait early.
    """
    # message.timeout.ms is the writer's timeout, so by now every record is settled either way;
    # the margin only covers the delivery reports' own latency.
    deadline = time.monotonic() + timeout_s + 10
    try:
        left = producer.flush(0)
        while left and time.monotonic() < deadline:
            if cancel is not None and cancel.is_set():
                raise SinkError(f"stopped waiting for {left} record(s) of {what}: the broker is unreachable")
            left = producer.flush(min(1.0, max(0.0, deadline - time.monotonic())))
    except (KafkaException, SystemError) as exc:
        # A fatal error (e.g. fenced by a newer writer) surfaces from inside flush(), sometimes
        # as a bare SystemError: the error callback keeps its text.
        cause = _cause(exc)
        reason = _fatal_reason(producer) if cause is exc and isinstance(exc, SystemError) else None
        reason = reason or (
            "; ".join(delivery.errors) if cause is exc and isinstance(exc, SystemError) else None
        )
        raise SinkError(f"cannot deliver the records of {what}: {reason or _reason(cause)}") from None
    if delivery.errors:
        # Records purged because the producer hit a fatal error: that error is the reason.
        fatal = _fatal_reason(producer)
        if fatal:
            raise SinkError(f"cannot deliver the records of {what}: {fatal}")
        delivery.raise_if_failed(what)
    if left:
        raise SinkError(f"{left} record(s) of {what} were not acknowledged within {timeout_s:g} s")


def _size(key: bytes | None, value: bytes | None, headers: list[Header]) -> int:
    return (
        len(key or b"")
        + len(value or b"")
        + sum(len(k) + len(v or b"") for k, v in headers)
        + RECORD_OVERHEAD
    )


def _too_large(
    plan: BatchPlan, topic: str, key: bytes | None, value: bytes | None, headers: list[Header]
) -> str | None:
    """Why a record cannot be sent to ``topic`` as it is (None when it fits)."""
    limit = plan.max_bytes.get(topic, CLIENT_MAX_BYTES)
    size = _size(key, value, headers)
    if size <= limit:
        return None
    return f"record of {size:,} bytes is larger than the {limit:,} bytes {topic} accepts"


def produce(
    producer: Producer,
    plan: BatchPlan,
    records: Iterable[Record],
    *,
    skip: frozenset[str] | set[str] | None = None,
    cancel: threading.Event | None = None,
    where: str = "driver",
    writer: str = "driver",
    attempt: int = 0,
) -> tuple[dict[str, int], int, Positions]:
    """Send (dest, key, value, error, record id, extra headers) records; wait until all are acknowledged.

    Returns counts per output topic, the number skipped as already written, and the
    end positions the acknowledgements reached. A record too large for its topic is
    dead-lettered with the reason instead (with its value dropped if even that is too
    large); without a dead-letter topic that is a :class:`SinkError`.
    """
    skip = plan.skip if skip is None else skip
    delivery = _Delivery()
    counts = dict.fromkeys(plan.topics, 0)
    skipped = 0
    sent = 0
    fault_k = plan.fault.records_k(where)
    query, batch = plan.query_id.encode(), str(plan.batch_id).encode()
    what = f"batch {plan.batch_id}"
    for i, (dest, key, value, error, rid, extra) in enumerate(records):
        if rid in skip:
            skipped += 1
            continue
        topic = plan.topics[dest]
        headers = [(H_QUERY, query), (H_BATCH, batch), (H_ID, rid.encode()), *extra]
        if error is not None:
            headers.append((H_ERROR, error.encode()))
        # The exact size only for records near the limit (or carrying an input message's headers).
        near = len(key or b"") + len(value or b"") + 4096 > plan.max_bytes.get(topic, CLIENT_MAX_BYTES)
        why = _too_large(plan, topic, key, value, headers) if near or extra else None
        if why is not None:
            topic, key, value, headers = _dead_letter_oversized(plan, topic, key, value, headers, error, why)
        while True:
            try:
                producer.produce(topic, value=value, key=key, headers=headers, on_delivery=delivery)
                break
            except BufferError:
                producer.poll(0.05)  # local queue full: let deliveries drain
        counts[topic] += 1
        sent += 1
        if fault_k and sent == fault_k:
            producer.flush(plan.timeout_s)  # the k records are on the broker when the fault fires
            faults.point(
                plan.fault,
                f"{where}.after_records",
                batch=plan.batch_id,
                writer=writer,
                attempt=attempt,
                count=sent,
            )
        if i % 2000 == 0:
            producer.poll(0)
    flush(producer, delivery, plan.timeout_s, what, cancel)
    ends: Positions = {}
    for (topic, part), off in delivery.ends.items():
        ends.setdefault(topic, {})[str(part)] = off
    return counts, skipped, ends


def _dead_letter_oversized(
    plan: BatchPlan,
    topic: str,
    key: bytes | None,
    value: bytes | None,
    headers: list[Header],
    error: str | None,
    why: str,
) -> tuple[str, bytes | None, bytes | None, list[Header]]:
    if len(plan.topics) < 2:
        raise SinkError(f"cannot write to {topic}: {why}, and this sink has no dead-letter topic")
    dlq = plan.topics[1]
    reason = why if error is None else f"{error}; {why}"
    headers = [(k, v) for k, v in headers if k != H_ERROR] + [(H_ERROR, reason.encode())]
    dropped = _too_large(plan, dlq, key, value, headers)
    if dropped is not None:
        value = None
        headers = [(k, v) for k, v in headers if k != H_ERROR] + [
            (H_ERROR, f"{reason}; its value was dropped: too large for {dlq} too".encode())
        ]
        if _too_large(plan, dlq, key, value, headers) is not None:
            key = None
    return dlq, key, value, headers


def record_rows(batch: pa.RecordBatch) -> Iterator[Record]:
    """Rows of the pipeline's record layout; the record id is the source ``topic/partition/offset``.

    Dead letters also get the input message's own headers (column ``headers``, when the
    layout has it) and the source position as three headers of their own.
    """
    dests = batch.column("dest").to_numpy(zero_copy_only=False)
    keys, values, rids = (batch.column(name).to_pylist() for name in ("key", "value", "rid"))
    errors = batch.column("error")
    n = batch.num_rows
    errs = [None] * n if errors.null_count == n else errors.to_pylist()
    in_headers: list[Any] = [None] * n
    if "headers" in batch.schema.names and batch.column("headers").null_count < n:
        in_headers = batch.column("headers").to_pylist()
    for dest, key, value, error, rid, hs in zip(dests, keys, values, errs, rids, in_headers, strict=True):
        extra: list[Header] = []
        if error is not None:
            topic, part, off = rid.rsplit("/", 2)
            extra = [(h["key"], h["value"]) for h in hs or ()]
            extra += [(H_TOPIC, topic.encode()), (H_PARTITION, part.encode()), (H_OFFSET, off.encode())]
        yield int(dest), key, value, error, rid, extra


def _cause(exc: BaseException) -> BaseException | KafkaError:
    """confluent-kafka raises a fatal error (fenced, ...) from a callback as a SystemError caused by it."""
    if isinstance(exc, SystemError) and exc.__cause__ is not None:
        return exc.__cause__
    return exc


def _fatal_reason(producer: Producer) -> str | None:
    """The producer's fatal error, if it has one; only for a writer that is failing anyway.

    The next poll raises it, or else aborting the transaction does (the caller aborts it next).
    """
    for probe in (lambda: producer.poll(0), lambda: producer.abort_transaction(5)):
        try:
            probe()
        except (KafkaException, SystemError) as exc:
            cause = _cause(exc)
            if cause is not exc or isinstance(exc, KafkaException):
                return _reason(cause)
        except RuntimeError:
            pass
    return None


def _open_producer(plan: BatchPlan, writer: str) -> Producer:
    """A transactional producer for ``writer``, initialised: every older one with its id is now fenced."""
    producer = kc.transactional_producer(
        {**plan.client, **plan.producer},
        plan.transactional_id(writer),
        delivery_timeout_s=plan.timeout_s,
        **_max_bytes_setting(plan.max_bytes),
    )
    try:
        producer.init_transactions(plan.timeout_s)
    except KafkaException as exc:
        kc.discard_producer(producer)
        raise SinkError(
            f"cannot start the transactional writer {plan.transactional_id(writer)!r}: {_reason(exc)}"
        ) from None
    return producer


def _max_bytes_setting(max_bytes: dict[str, int]) -> dict[str, Any]:
    # librdkafka packs records into batches of up to batch.size bytes, and a batch must fit the
    # smallest limit of the topics this producer writes; one record is checked against its own
    # topic's limit before it is sent (see _too_large), so the per-record cap is the largest.
    if not max_bytes:
        return {}
    smallest, largest = min(max_bytes.values()), max(max_bytes.values())
    settings: dict[str, Any] = {"message.max.bytes": max(CLIENT_MAX_BYTES, largest)}
    if smallest < CLIENT_MAX_BYTES:
        settings["batch.size"] = max(1000, smallest - RECORD_OVERHEAD)
    return settings


def _reason(exc: BaseException | KafkaError) -> str:
    if isinstance(exc, KafkaError):
        return exc.str()
    err = exc.args[0] if exc.args else exc
    return err.str() if isinstance(err, KafkaError) else str(err)


def _commit_transaction(producer: Producer, timeout_s: float, what: str) -> None:
    try:
        producer.commit_transaction(timeout_s)
    except KafkaException as exc:
        raise SinkError(f"cannot commit the transaction of {what}: {_reason(exc)}") from None


def _abort(producer: Producer, timeout_s: float) -> None:
    """Abort the open transaction and drop whatever the producer still holds."""
    kc.discard_producer(producer)
    # Fenced or unreachable: the broker aborts it when the successor fences this id.
    with contextlib.suppress(KafkaException, RuntimeError):
        producer.abort_transaction(min(timeout_s, 10.0))


_OFFSETS: dict[tuple[tuple[str, str], ...], kc.Offsets] = {}


def _worker_offsets(plan: BatchPlan) -> kc.Offsets:
    """One offset-lookup client per Python worker and cluster (tasks of later batches reuse it)."""
    key = tuple(sorted((k, str(v)) for k, v in plan.client.items()))
    offsets = _OFFSETS.get(key)
    if offsets is None:
        offsets = _OFFSETS[key] = kc.Offsets(plan.client, latest_by=plan.latest_by, timeout_s=plan.timeout_s)
    return offsets


def write_task(
    plan: BatchPlan, batches: Iterable[pa.RecordBatch], *, partition: int, attempt: int
) -> pa.RecordBatch:
    """Write one Spark task's records in one transaction; return its summary (counts, skipped, ends)."""
    writer = f"p{partition}"
    batches = iter(batches)
    # Opening the producer (a round trip to the transaction coordinator, which fences the
    # older attempts) overlaps with computing the first records.
    opened: dict[str, Any] = {}

    def open_in_background() -> None:
        try:
            opened["producer"] = _open_producer(plan, writer)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the task's thread
            opened["error"] = exc

    opener = threading.Thread(target=open_in_background, daemon=True)
    opener.start()
    first = next((b for b in batches if b.num_rows), None)
    opener.join()
    if "error" in opened:
        raise opened["error"]
    producer: Producer = opened["producer"]

    def at(name: str) -> None:
        faults.point(plan.fault, name, batch=plan.batch_id, writer=writer, attempt=attempt)

    try:
        if first is None:
            return summary_batch(dict.fromkeys(plan.topics, 0), 0, {}, writer=partition)
        first_id = str(first.column("rid")[0].as_py())
        offsets = _worker_offsets(plan)
        done = writer_markers(plan, offsets).get(writer)
        if done is not None and done.first == first_id:
            # Another attempt of this task committed these records (a retry after it
            # succeeded, or a zombie that opened its producer after the retry committed).
            log.warning(
                "batch %d %s: attempt %d committed it already; skipping", plan.batch_id, writer, done.attempt
            )
            return summary_batch(dict.fromkeys(plan.topics, 0), done.records, {}, writer=partition)
        skip: frozenset[str] | set[str] = plan.skip
        if attempt > 0 or done is not None:
            # A retried task: an earlier attempt may have committed part of this partition.
            seen, _ = written_ids(plan, offsets)
            skip = plan.skip | seen
        at("writer.before_produce")
        producer.begin_transaction()
        rows = (r for b in _chain(first, batches) for r in record_rows(b))
        counted = _Counted(rows)
        counts, skipped, ends = produce(
            producer, plan, counted, skip=skip, where="writer", writer=writer, attempt=attempt
        )
        at("writer.before_commit")
        marker = WriterMarker(plan.query_id, plan.batch_id, writer, first_id, counted.n, attempt)
        delivery = _Delivery()
        producer.produce(
            plan.commit_topic,
            key=marker.key,
            value=marker.to_json(),
            partition=plan.commit_partition,
            on_delivery=delivery,
        )
        flush(producer, delivery, plan.timeout_s, f"batch {plan.batch_id}'s {writer} marker")
        _commit_transaction(producer, plan.timeout_s, f"batch {plan.batch_id} ({writer})")
        at("writer.after_commit")
        return summary_batch(counts, skipped, ends, writer=partition)
    except faults.InjectedFault:
        _ABANDONED.append(producer)
        raise
    except KafkaException as exc:
        _abort(producer, plan.timeout_s)
        raise SinkError(f"cannot write batch {plan.batch_id} ({writer}): {_reason(exc)}") from None
    except BaseException:
        _abort(producer, plan.timeout_s)
        raise
    finally:
        if producer not in _ABANDONED:
            kc.discard_producer(producer)


# Producers of writers that "died" at an injected fault: kept alive, transaction open, like a zombie.
_ABANDONED: list[Producer] = []


class _Counted:
    """An iterator of records that counts what passed through it."""

    def __init__(self, it: Iterator[Record]) -> None:
        self.it = it
        self.n = 0

    def __iter__(self) -> Iterator[Record]:
        for r in self.it:
            self.n += 1
            yield r


def _chain(first: pa.RecordBatch, rest: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    yield first
    yield from rest


def write_partition(plan: BatchPlan) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """A ``mapInArrow`` function: one task's records in one fenced transaction, then its summary."""

    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        partition = ctx.partitionId() if ctx is not None else 0
        attempt = ctx.attemptNumber() if ctx is not None else 0
        yield write_task(plan, batches, partition=partition, attempt=attempt)

    return write


def summary_batch(
    counts: dict[str, int], skipped: int, ends: Positions, *, writer: int = -1
) -> pa.RecordBatch:
    rows: list[tuple[str, str, int, int]] = [("count", t, -1, n) for t, n in counts.items()]
    rows.append(("skipped", "", -1, skipped))
    rows.append(("writer", "", writer, 1))
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
    writers: int = 0  # task writers used (0: the driver wrote the batch)

    @classmethod
    def from_rows(cls, rows: Iterable[Any]) -> BatchResult:
        counts: dict[str, int] = {}
        skipped = 0
        writers = 0
        ends: Positions = {}
        for kind, topic, part, value in rows:
            if kind == "count":
                counts[topic] = counts.get(topic, 0) + int(value)
            elif kind == "skipped":
                skipped += int(value)
            elif kind == "writer":
                writers = max(writers, int(part) + 1)
            else:
                ends = merge_positions(ends, {topic: {str(part): int(value)}})
        return cls(counts, skipped, ends, writers)


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
            self._producer = _open_producer(self._plan(-1, {}), "driver")
        return self._producer

    def _drop_producer(self) -> None:
        """After any failure: abort, purge, and open a new producer next time (nothing old is sent)."""
        if self._producer is not None:
            _abort(self._producer, self.timeout_s)
            self._producer = None
        self._in_txn = False

    def _abandon(self) -> None:
        """An injected crash: leave the transaction open and the producer running, as a dead process would."""
        if self._producer is not None:
            _ABANDONED.append(self._producer)
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
                    f"cannot begin a transaction on {self.commit_topic}'s writer: {_reason(exc)}"
                ) from None
            self._in_txn = True
        return producer

    # -- commit log -----------------------------------------------------------------------------
    def last_marker(self) -> Marker | None:
        """The newest batch marker of this query in the commit topic (read once per process).

        All markers of a query go to one partition of the commit topic (chosen by its id), so
        they are in order there. Reads from the earliest offset still stored: retention or
        ``deleteRecords`` may have removed early markers (compaction keeps the newest per key).
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
        best: Marker | None = None
        position = 0
        for m in _committed_records(
            self.client, self.offsets, {(self.commit_topic, self._commit_partition): 0}, self.timeout_s
        ):
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
        delivery = _Delivery()
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
            _commit_transaction(producer, self.timeout_s, f"batch {marker.batch_id}'s commit marker")
        except (SinkError, KafkaException) as exc:
            self._drop_producer()
            if isinstance(exc, SinkError):
                raise
            raise SinkError(
                f"cannot write the commit marker of batch {marker.batch_id}: {_reason(exc)}"
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
        """Open (and so fence) the task writers ``p0 .. p<writers-1>`` of earlier runs and attempts."""
        if writers <= 0:
            return
        plan = self._plan(-1, {})

        def fence(i: int) -> None:
            kc.discard_producer(_open_producer(plan, f"p{i}"))

        with ThreadPoolExecutor(max_workers=min(8, writers)) as pool:
            list(pool.map(fence, range(writers)))

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
        if batch_id <= last.batch_id:
            log.info("batch %d already committed (last marker %d): skipping", batch_id, last.batch_id)
            if batch_id == last.batch_id:
                # Spark re-runs the batch it had not logged as done: all of it is already written.
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
            seen, scanned = written_ids(plan, self.offsets)
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
            raise SinkError(f"cannot write batch {plan.batch_id}: {_reason(exc)}") from None
        self.local_batches += 1
        return BatchResult(counts, skipped, ends)

    def close(self) -> None:
        if self._producer is not None:
            if self._in_txn:
                _abort(self._producer, self.timeout_s)
            self._producer = None
            self._in_txn = False
        if self._offsets is not None:
            self._offsets.close()
            self._offsets = None
