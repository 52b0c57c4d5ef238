"""The executor path: one Spark task's records in one fenced transaction, with its writer marker."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from confluent_kafka import KafkaException, Producer

from streaming import faults
from streaming import kafka_client as kc
from streaming.dead_letters import record_rows
from streaming.markers import WriterMarker, writer_markers, written_ids
from streaming.plan import BatchPlan, Positions, SinkError, merge_positions
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

log = logging.getLogger("sparkscore.streaming.sink")

SUMMARY_SCHEMA = "kind string, topic string, partition int, value long"

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
    """Write one Spark task's records in one transaction; return its summary (counts, skipped, ends).

    The task's records are computed (read, parsed, scored: the work upstream of ``batches``)
    before the transaction begins, so the transaction spans producing and committing only: a
    slow task cannot outlive ``transaction.timeout.ms`` and be aborted by the coordinator on
    every retry. The records of one task are held in memory meanwhile (Arrow batches; bound a
    micro-batch with ``maxOffsetsPerTrigger``).
    """
    writer = f"p{partition}"
    # Opening the producer (a round trip to the transaction coordinator, which fences the
    # older attempts) overlaps with computing the records.
    opened: dict[str, Any] = {}

    def open_in_background() -> None:
        try:
            opened["producer"] = open_producer(plan, writer)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the task's thread
            opened["error"] = exc

    opener = threading.Thread(target=open_in_background, daemon=True)
    opener.start()
    try:
        computed = [b for b in batches if b.num_rows]
    except BaseException:
        opener.join()
        if "producer" in opened:
            kc.discard_producer(opened["producer"])
        raise
    opener.join()
    if "error" in opened:
        raise opened["error"]
    producer: Producer = opened["producer"]

    def at(name: str) -> None:
        faults.point(plan.fault, name, batch=plan.batch_id, writer=writer, attempt=attempt)

    try:
        if not computed:
            return summary_batch(dict.fromkeys(plan.topics, 0), 0, {}, writer=partition)
        first_id = str(computed[0].column("rid")[0].as_py())
        last_id = str(computed[-1].column("rid")[-1].as_py())
        n = sum(b.num_rows for b in computed)
        offsets = _worker_offsets(plan)
        done = writer_markers(plan, offsets).get(writer)
        if done is not None and done.covers(first_id, last_id, n):
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
        rows = (r for b in computed for r in record_rows(b))
        counts, skipped, ends = produce(
            producer, plan, rows, skip=skip, where="writer", writer=writer, attempt=attempt
        )
        at("writer.before_commit")
        marker = WriterMarker(plan.query_id, plan.batch_id, writer, first_id, n, attempt, last_id, plan.model)
        delivery = Delivery()
        producer.produce(
            plan.commit_topic,
            key=marker.key,
            value=marker.to_json(),
            partition=plan.commit_partition,
            on_delivery=delivery,
        )
        flush(producer, delivery, plan.timeout_s, f"batch {plan.batch_id}'s {writer} marker")
        commit_transaction(producer, plan.timeout_s, f"batch {plan.batch_id} ({writer})")
        at("writer.after_commit")
        return summary_batch(counts, skipped, ends, writer=partition)
    except faults.InjectedFault:
        ABANDONED.append(producer)
        raise
    except KafkaException as exc:
        abort(producer, plan.timeout_s)
        raise SinkError(f"cannot write batch {plan.batch_id} ({writer}): {reason_of(exc)}") from None
    except BaseException:
        abort(producer, plan.timeout_s)
        raise
    finally:
        if producer not in ABANDONED:
            kc.discard_producer(producer)


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
