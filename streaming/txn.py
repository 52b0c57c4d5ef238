"""Transactional, fenced producers: opening (fencing), producing a batch's records, flushing, committing, aborting."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from streaming import faults
from streaming import kafka_client as kc
from streaming.dead_letters import CLIENT_MAX_BYTES, RECORD_OVERHEAD, dead_letter_oversized, too_large
from streaming.plan import H_BATCH, H_ERROR, H_ID, H_QUERY, BatchPlan, Positions, Record, SinkError


class Delivery:
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
    delivery: Delivery,
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
        cause = cause_of(exc)
        reason = fatal_reason(producer) if cause is exc and isinstance(exc, SystemError) else None
        reason = reason or (
            "; ".join(delivery.errors) if cause is exc and isinstance(exc, SystemError) else None
        )
        raise SinkError(f"cannot deliver the records of {what}: {reason or reason_of(cause)}") from None
    if delivery.errors:
        # Records purged because the producer hit a fatal error: that error is the reason.
        fatal = fatal_reason(producer)
        if fatal:
            raise SinkError(f"cannot deliver the records of {what}: {fatal}")
        delivery.raise_if_failed(what)
    if left:
        raise SinkError(f"{left} record(s) of {what} were not acknowledged within {timeout_s:g} s")


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
    delivery = Delivery()
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
        why = too_large(plan, topic, key, value, headers) if near or extra else None
        if why is not None:
            topic, key, value, headers = dead_letter_oversized(plan, topic, key, value, headers, error, why)
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


def cause_of(exc: BaseException) -> BaseException | KafkaError:
    """confluent-kafka raises a fatal error (fenced, ...) from a callback as a SystemError caused by it."""
    if isinstance(exc, SystemError) and exc.__cause__ is not None:
        return exc.__cause__
    return exc


def fatal_reason(producer: Producer) -> str | None:
    """The producer's fatal error, if it has one; only for a writer that is failing anyway.

    The next poll raises it, or else aborting the transaction does (the caller aborts it next).
    """
    for probe in (lambda: producer.poll(0), lambda: producer.abort_transaction(5)):
        try:
            probe()
        except (KafkaException, SystemError) as exc:
            cause = cause_of(exc)
            if cause is not exc or isinstance(exc, KafkaException):
                return reason_of(cause)
        except RuntimeError:
            pass
    return None


def open_producer(plan: BatchPlan, writer: str, cancel: threading.Event | None = None) -> Producer:
    """A transactional producer for ``writer``, initialised: every older one with its id is now fenced.

    ``cancel`` (the driver's: set when the broker is lost) ends the wait early.
    """
    producer = kc.transactional_producer(
        {**plan.client, **plan.producer},
        plan.transactional_id(writer),
        delivery_timeout_s=plan.timeout_s,
        **_max_bytes_setting(plan.max_bytes),
    )
    try:
        _until_done(producer.init_transactions, plan.timeout_s, cancel)
    except KafkaException as exc:
        kc.discard_producer(producer)
        raise SinkError(
            f"cannot start the transactional writer {plan.transactional_id(writer)!r}: {reason_of(exc)}"
        ) from None
    return producer


def _max_bytes_setting(max_bytes: dict[str, int]) -> dict[str, Any]:
    # librdkafka packs records into batches of up to batch.size bytes, and a batch must fit the
    # smallest limit of the topics this producer writes; one record is checked against its own
    # topic's limit before it is sent (see too_large), so the per-record cap is the largest.
    if not max_bytes:
        return {}
    smallest, largest = min(max_bytes.values()), max(max_bytes.values())
    settings: dict[str, Any] = {"message.max.bytes": max(CLIENT_MAX_BYTES, largest)}
    if smallest < CLIENT_MAX_BYTES:
        settings["batch.size"] = max(1000, smallest - RECORD_OVERHEAD)
    return settings


def reason_of(exc: BaseException | KafkaError) -> str:
    if isinstance(exc, KafkaError):
        text = exc.str()
    else:
        err = exc.args[0] if exc.args else exc
        text = err.str() if isinstance(err, KafkaError) else str(err)
    return text + FENCED_WHY if "fenced" in text.lower() and FENCED_WHY not in text else text


# The coordinator aborts a transaction that outlives transaction.timeout.ms by bumping the writer's
# epoch: librdkafka then reports the writer as fenced, as it does when a newer attempt starts.
FENCED_WHY = (
    " (a newer attempt of this writer started, or this transaction outlived the producer's "
    "transaction.timeout.ms)"
)


def commit_transaction(
    producer: Producer, timeout_s: float, what: str, cancel: threading.Event | None = None
) -> None:
    try:
        _until_done(producer.commit_transaction, timeout_s, cancel)
    except KafkaException as exc:
        raise SinkError(f"cannot commit the transaction of {what}: {reason_of(exc)}") from None


def _until_done(call: Any, timeout_s: float, cancel: threading.Event | None) -> None:
    """``call(timeout)`` (init / commit a transaction) in steps of 1 s, so that ``cancel`` ends the wait.

    librdkafka lets a transactional call that timed out (or failed with a retriable error, e.g.
    a coordinator still loading) be called again; it picks up where the last one left off. A
    set ``cancel`` raises :class:`SinkError` (the broker is lost).
    """
    if cancel is None:
        call(timeout_s)
        return
    deadline = time.monotonic() + timeout_s
    while True:
        if cancel.is_set():
            raise SinkError("stopped waiting for the transaction coordinator: the broker is unreachable")
        left = deadline - time.monotonic()
        try:
            call(max(0.1, min(1.0, left)))
            return
        except KafkaException as exc:
            err = exc.args[0]
            again = isinstance(err, KafkaError) and (err.code() == KafkaError._TIMED_OUT or err.retriable())
            if not again or time.monotonic() >= deadline:
                raise
            if left > 1.0:
                time.sleep(0.1)


def abort(producer: Producer, timeout_s: float) -> None:
    """Abort the open transaction and drop whatever the producer still holds."""
    kc.discard_producer(producer)
    # Fenced or unreachable: the broker aborts it when the successor fences this id.
    with contextlib.suppress(KafkaException, RuntimeError):
        producer.abort_transaction(min(timeout_s, 10.0))


# Producers of writers that "died" at an injected fault: kept alive, transaction open, like a zombie.
ABANDONED: list[Producer] = []
