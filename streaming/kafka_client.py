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
import contextlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import (
    Consumer,
    IsolationLevel,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, OffsetSpec, ResourceType

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


READ_COMMITTED = "read_committed"
READ_UNCOMMITTED = "read_uncommitted"


class RateLimitedLog(logging.Filter):
    """librdkafka's log lines, at most one per kind of message per ``every_s``, then a count of the rest.

    A broker that goes away makes every client (the driver's, each Python worker's) log a
    ``Connect ... failed`` line per reconnect attempt: thousands of lines that bury the one
    error that matters. Lines that differ only in numbers (ports, timings) count as one kind.
    """

    def __init__(self, every_s: float = 30.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, int]] = {}  # kind -> (last shown, suppressed since)

    def filter(self, record: logging.LogRecord) -> bool:
        kind = re.sub(r"\d+", "#", record.getMessage())
        now = time.monotonic()
        with self._lock:
            shown, suppressed = self._seen.get(kind, (-1e18, 0))
            if now - shown < self.every_s:
                self._seen[kind] = (shown, suppressed + 1)
                return False
            self._seen[kind] = (now, 0)
        if suppressed:
            record.msg = f"{record.getMessage()} ({suppressed} similar line(s) in the last {self.every_s:g} s not shown)"
            record.args = ()
        return True


LOG = logging.getLogger("sparkscore.kafka")
LOG.addFilter(RateLimitedLog())
if not LOG.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s librdkafka %(message)s"))
    LOG.addHandler(_handler)
    LOG.propagate = False


def _client_defaults() -> dict[str, Any]:
    # librdkafka logs through LOG (rate-limited) instead of straight to stderr.
    return {"logger": LOG}


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


def committed_reader_conf(conf: dict[str, Any]) -> dict[str, Any]:
    """``conf`` for reading only committed records (the sink's own output and commit topic)."""
    return {**conf, "isolation.level": READ_COMMITTED}


def make_consumer(conf: dict[str, Any], **overrides: Any) -> Consumer:
    try:
        return Consumer({**_client_defaults(), **consumer_conf(conf, **overrides)})
    except KafkaException as exc:
        raise KafkaConfigError(
            f"cannot create a Kafka consumer: {exc.args[0]}; check the kafka.* options"
        ) from None


def make_admin(conf: dict[str, Any]) -> AdminClient:
    keep = {k: v for k, v in conf.items() if not _consumer_only(k)}
    try:
        return AdminClient({**_client_defaults(), **keep})
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
        **_client_defaults(),
    }
    base.update({k: v for k, v in conf.items() if not _consumer_only(k)})
    base.update(overrides)
    try:
        return Producer(base)
    except KafkaException as exc:
        raise KafkaConfigError(f"cannot create a Kafka producer: {exc.args[0]}") from None


def transactional_producer(
    conf: dict[str, Any], transactional_id: str, *, delivery_timeout_s: float, **overrides: Any
) -> Producer:
    """A transactional producer (``init_transactions`` is the caller's: it fences older ones with the id).

    ``delivery_timeout_s`` bounds how long a record may stay unacknowledged
    (``message.timeout.ms``) unless ``conf`` sets it; librdkafka's default is 300 s, so a
    ``flush`` with a shorter timeout could return with records still queued, to be delivered
    later. ``transaction.timeout.ms`` and ``message.timeout.ms`` in ``conf`` win over these
    defaults (the config checks them, see :func:`check_transaction_timeouts`).
    """
    message_timeout_ms = int(conf.get("message.timeout.ms") or max(1000, int(delivery_timeout_s * 1000)))
    settings: dict[str, Any] = {
        "transactional.id": transactional_id,
        "message.timeout.ms": message_timeout_ms,
        # An open transaction of a crashed writer holds back read_committed consumers until the
        # broker aborts it (or the writer's successor fences it): keep that bound modest.
        "transaction.timeout.ms": int(
            conf.get("transaction.timeout.ms") or max(60_000, message_timeout_ms + 10_000)
        ),
    }
    return make_producer(conf, **{**settings, **overrides})


# Kafka brokers refuse a transaction timeout above transaction.max.timeout.ms (15 min by default).
MAX_TRANSACTION_TIMEOUT_MS = 900_000


def check_transaction_timeouts(producer: dict[str, str]) -> None:
    """Raise ValueError unless the producer settings' two timeouts are within safe limits.

    ``message.timeout.ms`` (how long a record may wait to be acknowledged) must end before the
    transaction may be aborted (``transaction.timeout.ms``), which must be at least 10 s (a
    shorter one aborts healthy batches) and at most the broker default's 15 min (beyond it the
    broker refuses the writer; a crashed writer's transaction also holds back every
    ``read_committed`` reader of its partitions that long).
    """
    values: dict[str, int] = {}
    for key in ("message.timeout.ms", "transaction.timeout.ms"):
        if key in producer:
            try:
                values[key] = int(producer[key])
            except ValueError:
                raise ValueError(
                    f"producer {key} must be a whole number of ms, got {producer[key]!r}"
                ) from None
    txn = values.get("transaction.timeout.ms")
    if txn is not None and not 10_000 <= txn <= MAX_TRANSACTION_TIMEOUT_MS:
        raise ValueError(
            f"producer transaction.timeout.ms must be between 10000 and {MAX_TRANSACTION_TIMEOUT_MS}, got {txn}"
        )
    msg = values.get("message.timeout.ms")
    if msg is not None:
        limit = txn if txn is not None else max(60_000, msg + 10_000)
        if not 1000 <= msg < limit:
            raise ValueError(
                f"producer message.timeout.ms must be at least 1000 and below transaction.timeout.ms "
                f"({limit}), got {msg}"
            )


def discard_producer(producer: Producer) -> None:
    """Drop everything ``producer`` still holds (queued or in flight), so none of it is sent later."""
    with contextlib.suppress(KafkaException, RuntimeError):
        producer.purge(in_queue=True, in_flight=True, blocking=False)
        producer.poll(0)


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


def evict(kind: str, conf: dict[str, Any]) -> None:
    """Forget the cached client for ``conf`` (a producer is purged first: nothing it queued is sent)."""
    key = (kind, frozenset((k, str(v)) for k, v in conf.items()))
    client = _CACHE.pop(key, None)
    if isinstance(client, Producer):
        discard_producer(client)
    elif isinstance(client, Consumer):
        with contextlib.suppress(KafkaException, RuntimeError):
            client.close()


@atexit.register
def _close_cached() -> None:
    # At interpreter exit the log stream may be closed already: what closing says is not needed.
    LOG.disabled = True
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


@dataclass(frozen=True)
class TopicSpec:
    """How to create a topic: partitions, replication factor, topic-level configs."""

    partitions: int = 1
    replication_factor: int = 1
    configs: dict[str, str] = field(default_factory=dict)


def ensure_topics(
    conf: dict[str, Any], topics: dict[str, int | TopicSpec], *, timeout_s: float = 30.0
) -> list[str]:
    """Create the topics that do not exist yet (name -> partitions or a TopicSpec); return those created.

    Existing topics are left alone (their settings are the operator's).
    """
    admin = make_admin(conf)
    existing = topic_partitions(admin, timeout_s)
    specs = {name: spec if isinstance(spec, TopicSpec) else TopicSpec(spec) for name, spec in topics.items()}
    missing = [
        NewTopic(
            name,
            num_partitions=spec.partitions,
            replication_factor=spec.replication_factor,
            config=dict(spec.configs),
        )
        for name, spec in specs.items()
        if name not in existing
    ]
    if not missing:
        return []
    for name, fut in admin.create_topics(missing, request_timeout=timeout_s).items():
        try:
            fut.result()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                spec = specs[name]
                raise KafkaConfigError(
                    f"cannot create topic {name!r} ({spec.partitions} partition(s), replication factor "
                    f"{spec.replication_factor}, configs {spec.configs}): {exc.args[0].str()}"
                ) from None
    # Metadata catches up asynchronously; wait until every new topic is visible.
    deadline = time.monotonic() + timeout_s
    while not all(name in topic_partitions(admin, timeout_s) for name in topics):
        if time.monotonic() > deadline:
            raise KafkaTimeoutError(f"topics {sorted(topics)} did not appear within {timeout_s:g} s")
        time.sleep(0.05)
    return [t.topic for t in missing]


def topic_configs(conf: dict[str, Any], topics: Iterable[str], timeout_s: float) -> dict[str, dict[str, str]]:
    """Topic-level configs (name -> value) of ``topics``; empty for a broker that cannot describe them."""
    admin = make_admin(conf)
    resources = [ConfigResource(ResourceType.TOPIC, t) for t in topics]
    out: dict[str, dict[str, str]] = {}
    try:
        futures = admin.describe_configs(resources, request_timeout=timeout_s)
    except (KafkaException, ValueError, TypeError):
        return {}
    for res, fut in futures.items():
        with contextlib.suppress(KafkaException, ValueError, TypeError):
            out[res.name] = {name: entry.value for name, entry in fut.result().items()}
    return out


def list_offsets(
    admin: AdminClient,
    tps: Iterable[TP],
    spec: str,
    timeout_s: float,
    isolation: str = READ_UNCOMMITTED,
    *,
    missing_ok: bool = False,
) -> dict[TP, int]:
    """ListOffsets "earliest" or "latest" for many partitions in one request.

    With ``read_committed`` isolation "latest" is the last stable offset (no open transaction before it).
    """
    pending = list(tps)
    if not pending:
        return {}
    offset_spec = OffsetSpec.earliest() if spec == "earliest" else OffsetSpec.latest()
    level = IsolationLevel.READ_COMMITTED if isolation == READ_COMMITTED else IsolationLevel.READ_UNCOMMITTED
    deadline = time.monotonic() + timeout_s
    out: dict[TP, int] = {}
    while pending:
        futures = admin.list_offsets(
            {TopicPartition(t, p): offset_spec for t, p in pending},
            isolation_level=level,
            request_timeout=max(1.0, deadline - time.monotonic()),
        )
        pending = []
        metadata: list[Any] = []  # asked at most once a round, however many partitions failed
        for tp, fut in futures.items():
            try:
                offset = int(fut.result().offset)
                if offset < 0:
                    # librdkafka can answer OFFSET_INVALID (-1001) with no error for a partition no
                    # broker answered for (seen with the broker stopping under load): no answer,
                    # never a log end, which would read as lost data.
                    raise KafkaException(KafkaError(KafkaError._TRANSPORT, f"no offset (got {offset})"))
                out[(tp.topic, tp.partition)] = offset
            except KafkaException as exc:
                err = exc.args[0]
                # A partition that a broker says does not exist is data loss (or, with missing_ok,
                # left out). Any other error is asked again until the deadline: a leader being
                # elected (a topic just created, a broker restarting) answers NOT_LEADER for a
                # moment, a deleted topic "no leaders found", a broker shutting down odd errors
                # ("leader epoch is older than broker epoch"), and one that is down "unknown
                # partition": a broker going away must be reported as such (the job's broker
                # watch), never as lost data.
                if not metadata:
                    metadata.append(_metadata(admin, min(5.0, timeout_s)))
                if _gone_in(metadata[0], tp.topic, tp.partition):
                    if missing_ok:
                        continue
                    _raise_list_offsets_error(tp, KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
                if time.monotonic() < deadline:
                    pending.append((tp.topic, tp.partition))
                    continue
                reason = err.str() if isinstance(err, KafkaError) else str(err)
                if isinstance(err, KafkaError) and err.code() in _GONE:
                    reason = f"no broker answered within {timeout_s:g} s ({reason})"
                raise KafkaTimeoutError(
                    f"cannot list offsets of {tp.topic}/{tp.partition}: {reason}"
                ) from None
        if pending:
            time.sleep(0.1)
    return out


_GONE = (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_PARTITION, KafkaError._UNKNOWN_TOPIC)


def _raise_list_offsets_error(tp: TopicPartition, err: object) -> None:
    if isinstance(err, KafkaError) and err.code() in _GONE:
        raise DataLossError(
            f"{tp.topic}/{tp.partition} no longer exists on the broker (deleted, or the broker lost its data)"
        ) from None
    reason = err.str() if isinstance(err, KafkaError) else str(err)
    raise KafkaTimeoutError(f"cannot list offsets of {tp.topic}/{tp.partition}: {reason}") from None


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
    """Earliest / latest lookups with the chosen way of finding the log end.

    "Latest" follows the ``isolation.level`` of ``conf``: with ``read_committed`` it is the
    last stable offset (where a ``read_committed`` consumer stops while a transaction is open),
    as the JVM source plans it; otherwise the high watermark. ``fetchProbe`` is for brokers
    without isolation levels (Tansu), where the two are the same.
    """

    def __init__(self, conf: dict[str, Any], *, latest_by: str = LIST_OFFSETS, timeout_s: float = 30.0):
        self.conf = conf
        self.latest_by = latest_by
        self.timeout_s = timeout_s
        self.isolation = str(conf.get("isolation.level", READ_UNCOMMITTED))
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

    def earliest(self, tps: Iterable[TP], *, missing_ok: bool = False) -> dict[TP, int]:
        """Log starts; with ``missing_ok`` a partition that no longer exists is left out, not data loss."""
        return list_offsets(self.admin, tps, "earliest", self.timeout_s, missing_ok=missing_ok)

    def latest(self, tps: Iterable[TP]) -> dict[TP, int]:
        listed = list_offsets(self.admin, tps, "latest", self.timeout_s, self.isolation)
        if self.latest_by == FETCH_PROBE:
            return probe_end_offsets(self.consumer, listed, self.timeout_s)
        return listed

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        self._admin = None


@dataclass
class LostOffsets:
    """Offsets a read had to skip because they were gone (``failOnDataLoss = false``)."""

    count: int = 0
    ranges: list[tuple[str, int, int, int]] = field(default_factory=list)  # (topic, partition, first, last)

    def add(self, topic: str, partition: int, first: int, last: int) -> None:
        if last >= first:
            self.count += last - first + 1
            self.ranges.append((topic, partition, first, last))


def partition_gone(client: Consumer | AdminClient, topic: str, partition: int, timeout_s: float) -> bool:
    """True only when a broker answers a metadata request without ``topic``/``partition`` in it.

    librdkafka also reports a partition as unknown when no broker answers at all (a stopped
    broker, while a read is in flight): that is not data loss, so an "unknown" error is only
    believed once a broker has confirmed it. Asks for every topic (asking for one could make a
    broker with ``auto.create.topics.enable`` create it again).
    """
    return _gone_in(_metadata(client, timeout_s), topic, partition)


def _metadata(client: Consumer | AdminClient, timeout_s: float) -> Any:
    """Every topic's metadata from a broker; None when no broker answers."""
    try:
        md = client.list_topics(timeout=max(1.0, timeout_s))
    except KafkaException:
        return None  # nobody answered: the broker is down, not the partition gone
    return md if md.brokers else None


def _gone_in(md: Any, topic: str, partition: int) -> bool:
    if md is None:
        return False
    found = md.topics.get(topic)
    if found is None:
        return True
    err = found.error
    if err is not None:
        return err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART
    return partition not in found.partitions


def _watermarks(consumer: Consumer, topic: str, partition: int, timeout_s: float) -> tuple[int, int] | None:
    """(log start, high watermark) from the broker; None when it does not answer (down, restarting).

    Raises :class:`DataLossError` when a broker confirms that the partition does not exist.
    """
    try:
        low, high = consumer.get_watermark_offsets(
            TopicPartition(topic, partition), timeout=timeout_s, cached=False
        )
    except KafkaException as exc:
        err = exc.args[0]
        if (
            isinstance(err, KafkaError)
            and err.code() in _GONE
            and partition_gone(consumer, topic, partition, timeout_s)
        ):
            raise DataLossError(
                f"{topic}/{partition} no longer exists on the broker (deleted, or the broker lost its data)"
            ) from None
        return None
    if low < 0 or high < 0:
        return None  # OFFSET_INVALID: librdkafka got no answer, which is not an empty log
    return int(low), int(high)


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
    lost: LostOffsets | None = None,
    committed: bool = False,
    check_every_s: float = 3.0,
    cancel: threading.Event | None = None,
) -> Iterator[list[Message]]:
    """Records of one partition with offsets in [start, end), in lists of at most ``max_batch``.

    Gaps inside the range (compaction, transaction markers, aborted records) are normal.
    Data loss is a range that starts before the earliest offset still stored, or a log
    that ends before ``end`` (or a partition that no longer exists); it raises
    :class:`DataLossError`. With ``fail_on_data_loss`` off, the records still stored are
    returned (reading resumes at the log start) and the skipped offsets go into ``lost``.
    ``earliest`` is a callable giving the partition's earliest offset, asked only when
    the first record is past ``start``. ``committed``: the consumer reads with
    ``read_committed``, so it may stop at the last stable offset while a transaction is
    open; the read waits for it to close instead of calling that data loss.

    When no record arrives for ``check_every_s`` the broker is asked where the
    partition starts and ends, so a log that lost its data fails within seconds rather
    than after ``timeout_s``. A set ``cancel`` (the job is failing: the broker is lost) ends
    the wait with :class:`KafkaTimeoutError`.
    """
    if end <= start:
        return
    where = f"{topic}/{partition}"
    tp = TopicPartition(topic, partition)
    next_offset = start
    lost = lost if lost is not None else LostOffsets()

    def skip_to(low: int) -> bool:
        """Records below ``low`` are gone; True when nothing of the range is left."""
        nonlocal next_offset
        data_loss(
            fail_on_data_loss,
            f"offsets {next_offset}..{min(low, end) - 1} of {where} are gone (the log starts at {low}); "
            "they aged out or were deleted before the query read them",
        )
        lost.add(topic, partition, next_offset, min(low, end) - 1)
        log_warning(
            "data loss: offsets %d..%d of %s are gone; continuing at %d (failOnDataLoss=false)",
            next_offset,
            min(low, end) - 1,
            where,
            low,
        )
        if low >= end:
            return True
        next_offset = low
        consumer.assign([TopicPartition(topic, partition, low)])
        return False

    consumer.assign([TopicPartition(topic, partition, start)])
    deadline = time.monotonic() + timeout_s
    next_check = time.monotonic() + check_every_s
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
                        if log_end >= end:
                            done = True
                            break
                        if committed:
                            continue  # at the last stable offset: an open transaction, wait for it
                        data_loss(
                            fail_on_data_loss,
                            f"{where} ends at offset {log_end} but the batch needs offsets up to {end - 1}",
                        )
                        lost.add(topic, partition, max(next_offset, log_end), end - 1)
                        done = True
                        break
                    if err.code() in (KafkaError.OFFSET_OUT_OF_RANGE, KafkaError._AUTO_OFFSET_RESET):
                        marks = _watermarks(consumer, topic, partition, min(timeout_s, 10.0))
                        if marks is not None and marks[0] > next_offset:
                            done = skip_to(marks[0])
                            break
                        data_loss(
                            fail_on_data_loss, f"offset {next_offset} of {where} is out of range: {err}"
                        )
                        lost.add(topic, partition, next_offset, end - 1)
                        done = True
                        break
                    if err.code() in _GONE and partition_gone(consumer, topic, partition, 5.0):
                        data_loss(
                            fail_on_data_loss,
                            f"{where} no longer exists on the broker (deleted, or the broker lost its data)",
                        )
                        lost.add(topic, partition, next_offset, end - 1)
                        done = True
                        break
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
                            f"offsets {start}..{low - 1} of {where} are gone (the log starts at {low}); "
                            "they aged out or were deleted before the query read them",
                        )
                        lost.add(topic, partition, start, min(low, end) - 1)
                out.append(m)
                next_offset = off + 1
            if out:
                yield out
                deadline = time.monotonic() + timeout_s
                next_check = time.monotonic() + check_every_s
            if done or next_offset >= end:
                return
            if out:
                continue
            # Nothing new: the rest of the range may be transaction markers or aborted records.
            if cancel is not None and cancel.is_set():
                raise KafkaTimeoutError(
                    f"stopped reading {where} at offset {next_offset}: the broker is unreachable"
                )
            position = consumer.position([tp])[0].offset
            if position >= end:
                return
            now = time.monotonic()
            if now >= next_check:
                next_check = now + check_every_s
                try:
                    marks = _watermarks(consumer, topic, partition, min(check_every_s, 5.0))
                except DataLossError as exc:
                    data_loss(fail_on_data_loss, str(exc))
                    lost.add(topic, partition, next_offset, end - 1)
                    log_warning("data loss: %s; skipping offsets %d..%d", exc, next_offset, end - 1)
                    return
                if marks is not None:
                    low, high = marks
                    if low > next_offset:
                        if skip_to(low):
                            return
                        continue
                    if high < end and not committed:
                        data_loss(
                            fail_on_data_loss,
                            f"{where} now ends at offset {high} but the batch needs offsets up to {end - 1} "
                            "(the broker lost data, or the topic was deleted and created again)",
                        )
                        lost.add(topic, partition, max(next_offset, high), end - 1)
                        return
            if now > deadline:
                what = (
                    "an open transaction holds back the last stable offset"
                    if committed
                    else "is the broker up?"
                )
                raise KafkaTimeoutError(
                    f"no records from {where} at offset {next_offset} for {timeout_s:g} s "
                    f"(the batch reads up to offset {end - 1}); {what}"
                )
    finally:
        consumer.unassign()


def log_warning(msg: str, *args: Any) -> None:
    logging.getLogger("sparkscore.streaming").warning(msg, *args)


def data_loss(fail: bool, message: str) -> bool:
    """Raise DataLossError, or return True (the caller skips) when failOnDataLoss is off."""
    if fail:
        raise DataLossError(
            message + ". Set failOnDataLoss=false to skip lost offsets instead of failing the query."
        )
    return True
