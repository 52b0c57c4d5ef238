"""confluent-kafka helpers shared by the source, the sink, the benchmark and the tests.

Reads go through ``assign()``: no consumer-group join (slow on Tansu, and it
would commit offsets nobody asked for), so a range [start, end) is read the
same way every time. End offsets come from ListOffsets (right on Kafka) or
from a fetch probe: assign each partition at its listed end, poll until the
partition answers, and take the high watermark of that fetch response. The
probe exists for Tansu, whose ListOffsets "latest" is the base offset of the
last record batch rather than the log end; it is also correct on Kafka.
"""

from __future__ import annotations

import atexit
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

from udfs.errors import SparkscoreError

TP = tuple[str, int]

LIST_OFFSETS = "listOffsets"
FETCH_PROBE = "fetchProbe"
LATEST_OFFSET_MODES = (LIST_OFFSETS, FETCH_PROBE)


class KafkaConfigError(SparkscoreError):
    """A kafka.* setting that the client refuses, or a broker that cannot be reached."""


class DataLossError(RuntimeError):
    """Offsets a query expected are gone (aged out, truncated, or the partition was deleted)."""


class KafkaTimeoutError(TimeoutError):
    """The broker did not answer within the poll timeout."""


def consumer_conf(conf: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """A consumer config for assign()-only reading: never joins a group, never commits."""
    base: dict[str, Any] = {
        # librdkafka wants a group id even when it never joins; it is never used to commit.
        "group.id": f"sparkscore-{uuid.uuid4().hex[:12]}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "error",
        # The JVM Kafka source reads uncommitted records unless told otherwise; so does this one.
        "isolation.level": "read_uncommitted",
        "fetch.wait.max.ms": 50,
    }
    base.update(conf)
    base.update(overrides)
    return base


def make_consumer(conf: dict[str, Any], **overrides: Any) -> Consumer:
    try:
        return Consumer(consumer_conf(conf, **overrides))
    except KafkaException as exc:
        raise KafkaConfigError(
            f"cannot create a Kafka consumer: {exc.args[0]}; check the kafka.* options"
        ) from None


def make_admin(conf: dict[str, Any]) -> AdminClient:
    keep = {k: v for k, v in conf.items() if not _consumer_only(k)}
    try:
        return AdminClient(keep)
    except KafkaException as exc:
        raise KafkaConfigError(f"cannot create a Kafka admin client: {exc.args[0]}") from None


def make_producer(conf: dict[str, Any], **overrides: Any) -> Producer:
    """An idempotent producer: retries never duplicate or reorder a partition's records."""
    base: dict[str, Any] = {
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        # The Java client's partitioner, so a key lands where JVM producers would put it.
        "partitioner": "murmur2_random",
    }
    base.update({k: v for k, v in conf.items() if not _consumer_only(k)})
    base.update(overrides)
    try:
        return Producer(base)
    except KafkaException as exc:
        raise KafkaConfigError(f"cannot create a Kafka producer: {exc.args[0]}") from None


_CONSUMER_ONLY = {
    "group.id",
    "isolation.level",
    "fetch.wait.max.ms",
    "fetch.min.bytes",
    "fetch.max.bytes",
    "max.partition.fetch.bytes",
    "enable.partition.eof",
    "auto.offset.reset",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "session.timeout.ms",
    "max.poll.interval.ms",
}


def _consumer_only(key: str) -> bool:
    return key in _CONSUMER_ONLY


_CACHE: dict[tuple[str, frozenset[tuple[str, str]]], Any] = {}


def cached(kind: str, conf: dict[str, Any]) -> Any:
    """A per-process client ("consumer" or "producer") for ``conf``, made once and reused across tasks."""
    key = (kind, frozenset((k, str(v)) for k, v in conf.items()))
    client = _CACHE.get(key)
    if client is None:
        client = make_consumer(conf) if kind == "consumer" else make_producer(conf)
        _CACHE[key] = client
    return client


@atexit.register
def _close_cached() -> None:
    for client in _CACHE.values():
        try:
            if isinstance(client, Consumer):
                client.close()
            else:
                client.flush(5)
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass
    _CACHE.clear()


def check_reachable(conf: dict[str, Any], timeout_s: float) -> None:
    """Fail fast, naming the address, when no broker answers: before any query starts."""
    try:
        make_admin(conf).list_topics(timeout=timeout_s)
    except KafkaException as exc:
        err = exc.args[0]
        reason = err.str() if isinstance(err, KafkaError) else str(err)
        raise KafkaConfigError(
            f"no Kafka broker answered at {conf.get('bootstrap.servers')!r} within {timeout_s:g} s ({reason}); "
            "is it running? Locally: make broker"
        ) from None


def topic_partitions(client: Consumer | AdminClient, timeout_s: float) -> dict[str, list[int]]:
    """Every topic the broker knows, with its partition ids (internal ``__`` topics left out)."""
    try:
        md = client.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise KafkaConfigError(f"cannot list Kafka topics: {exc.args[0]}") from None
    return {
        name: sorted(t.partitions)
        for name, t in md.topics.items()
        if not name.startswith("__") and t.error is None
    }


def ensure_topics(conf: dict[str, Any], topics: dict[str, int], *, timeout_s: float = 30.0) -> None:
    """Create the topics that do not exist yet (name -> partitions); existing ones are left alone."""
    admin = make_admin(conf)
    existing = topic_partitions(admin, timeout_s)
    missing = [
        NewTopic(name, num_partitions=n, replication_factor=1)
        for name, n in topics.items()
        if name not in existing
    ]
    if not missing:
        return
    for name, fut in admin.create_topics(missing, request_timeout=timeout_s).items():
        try:
            fut.result()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise KafkaConfigError(f"cannot create topic {name!r}: {exc.args[0]}") from None
    # Metadata catches up asynchronously; wait until every new topic is visible.
    deadline = time.monotonic() + timeout_s
    while not all(name in topic_partitions(admin, timeout_s) for name in topics):
        if time.monotonic() > deadline:
            raise KafkaTimeoutError(f"topics {sorted(topics)} did not appear within {timeout_s:g} s")
        time.sleep(0.05)


def list_offsets(admin: AdminClient, tps: Iterable[TP], spec: str, timeout_s: float) -> dict[TP, int]:
    """ListOffsets "earliest" or "latest" for many partitions in one request."""
    tps = list(tps)
    if not tps:
        return {}
    offset_spec = OffsetSpec.earliest() if spec == "earliest" else OffsetSpec.latest()
    futures = admin.list_offsets(
        {TopicPartition(t, p): offset_spec for t, p in tps}, request_timeout=timeout_s
    )
    out: dict[TP, int] = {}
    for tp, fut in futures.items():
        try:
            out[(tp.topic, tp.partition)] = fut.result().offset
        except KafkaException as exc:
            raise DataLossError(f"cannot list offsets of {tp.topic}/{tp.partition}: {exc.args[0]}") from None
    return out


def probe_end_offsets(consumer: Consumer, listed: dict[TP, int], timeout_s: float) -> dict[TP, int]:
    """The true log ends: fetch at each listed end and read the high watermark of the response."""
    if not listed:
        return {}
    consumer.assign([TopicPartition(t, p, off) for (t, p), off in listed.items()])
    pending = set(listed)
    deadline = time.monotonic() + timeout_s
    try:
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise KafkaTimeoutError(
                    f"no fetch answer within {timeout_s:g} s for {sorted(pending)} while probing end offsets"
                )
            msg = consumer.poll(min(left, 0.5))
            if msg is None:
                continue
            err = msg.error()
            if err is not None and err.code() != KafkaError._PARTITION_EOF:
                raise DataLossError(f"probing {msg.topic()}/{msg.partition()}: {err}")
            # Any answer means a fetch response arrived and its high watermark is cached.
            pending.discard((msg.topic(), msg.partition()))
        ends = {}
        for (t, p), off in listed.items():
            _, high = consumer.get_watermark_offsets(TopicPartition(t, p), cached=True)
            ends[(t, p)] = max(high, off)
        return ends
    finally:
        consumer.unassign()


class Offsets:
    """Earliest / latest lookups with the chosen way of finding the log end."""

    def __init__(self, conf: dict[str, Any], *, latest_by: str = LIST_OFFSETS, timeout_s: float = 30.0):
        self.conf = conf
        self.latest_by = latest_by
        self.timeout_s = timeout_s
        self._admin: AdminClient | None = None
        self._consumer: Consumer | None = None

    @property
    def admin(self) -> AdminClient:
        if self._admin is None:
            self._admin = make_admin(self.conf)
        return self._admin

    @property
    def consumer(self) -> Consumer:
        if self._consumer is None:
            # Short fetch waits: a probe at the log end waits this long for data that is not coming.
            self._consumer = make_consumer(self.conf, **{"fetch.wait.max.ms": 10})
        return self._consumer

    def partitions(self) -> dict[str, list[int]]:
        return topic_partitions(self.consumer, self.timeout_s)

    def earliest(self, tps: Iterable[TP]) -> dict[TP, int]:
        return list_offsets(self.admin, tps, "earliest", self.timeout_s)

    def latest(self, tps: Iterable[TP]) -> dict[TP, int]:
        listed = list_offsets(self.admin, tps, "latest", self.timeout_s)
        if self.latest_by == FETCH_PROBE:
            return probe_end_offsets(self.consumer, listed, self.timeout_s)
        return listed

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        self._admin = None


def read_range(
    consumer: Consumer,
    topic: str,
    partition: int,
    start: int,
    end: int,
    *,
    timeout_s: float,
    fail_on_data_loss: bool = True,
    max_batch: int = 10_000,
    earliest: Any = None,
) -> Iterator[list[Message]]:
    """Records of one partition with offsets in [start, end), in lists of at most ``max_batch``.

    Gaps inside the range (compaction, transaction markers) are normal. Data loss is
    a range that starts before the earliest offset still stored, or a log that ends
    before ``end``; it raises :class:`DataLossError`, or with ``fail_on_data_loss``
    off the readable part is returned. ``earliest`` is a callable giving the
    partition's earliest offset, asked only when the first record is past ``start``.
    """
    if end <= start:
        return
    where = f"{topic}/{partition}"
    consumer.assign([TopicPartition(topic, partition, start)])
    next_offset = start
    deadline = time.monotonic() + timeout_s
    try:
        while next_offset < end:
            msgs = consumer.consume(min(end - next_offset, max_batch), timeout=0.2)
            out: list[Message] = []
            done = False
            for m in msgs:
                if m.topic() != topic or m.partition() != partition:
                    continue  # left over from this cached consumer's previous assignment
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        # Records up to ``end`` were below the high watermark when the batch was
                        # planned; a log that now ends earlier has lost them.
                        log_end = int(m.offset() or 0)
                        if log_end < end:
                            data_loss(
                                fail_on_data_loss,
                                f"{where} ends at offset {log_end} but the batch needs offsets up to {end - 1}",
                            )
                        done = True
                        break
                    if err.code() in (KafkaError.OFFSET_OUT_OF_RANGE, KafkaError._AUTO_OFFSET_RESET):
                        done = data_loss(
                            fail_on_data_loss, f"offset {next_offset} of {where} is out of range: {err}"
                        )
                        continue
                    raise KafkaException(err)
                off = int(m.offset() or 0)
                if off < next_offset:
                    continue
                if off >= end:
                    done = True
                    break
                if off > next_offset and next_offset == start and earliest is not None:
                    low = earliest()
                    if low > start:
                        data_loss(
                            fail_on_data_loss,
                            f"offsets {start}..{low - 1} of {where} are gone (earliest is {low}); "
                            "they aged out before the query read them",
                        )
                out.append(m)
                next_offset = off + 1
            if out:
                yield out
                deadline = time.monotonic() + timeout_s
            if done or next_offset >= end:
                return
            if not out and time.monotonic() > deadline:
                raise KafkaTimeoutError(
                    f"no records from {where} at offset {next_offset} for {timeout_s:g} s "
                    f"(the batch reads up to offset {end - 1}); is the broker up?"
                )
    finally:
        consumer.unassign()


def data_loss(fail: bool, message: str) -> bool:
    """Raise DataLossError, or return True (the caller skips) when failOnDataLoss is off."""
    if fail:
        raise DataLossError(
            message + ". Set failOnDataLoss=false to skip lost offsets instead of failing the query."
        )
    return True
