"""``kafka_py``: a Kafka source on PySpark's Python Data Source API, with the JVM source's contract.

Same schema (``key, value, topic, partition, offset, timestamp, timestampType``
and ``headers`` with ``includeHeaders``), same options (``kafka.bootstrap.servers``
and any ``kafka.*`` client setting, ``subscribe`` / ``subscribePattern`` /
``assign``, ``startingOffsets``, ``endingOffsets`` for batch reads,
``maxOffsetsPerTrigger``, ``minPartitions``, ``failOnDataLoss``,
``includeHeaders``) and offsets in the JVM's JSON shape ``{"topic": {"0": 23}}``,
so a query can switch between ``format("kafka")`` and ``format("kafka_py")``
without changing anything downstream.

Options of this source only (the JVM source ignores them):

* ``latestOffsetsBy``: ``listOffsets`` (default; right on Kafka) or
  ``fetchProbe``, which takes the log end from a fetch response's high
  watermark. Use ``fetchProbe`` with Tansu, whose ListOffsets "latest" is the
  base offset of the last record batch: with ``listOffsets`` a query would stop
  short of the newest records until more arrive.
* ``kafkaConsumer.pollTimeoutMs`` (the JVM name; default 120000): how long a read
  or an offset lookup waits for the broker before failing the batch.

Driver side, the stream reader keeps one admin client and one consumer for
offset lookups. Each Spark task reads one partition range [start, end) with
its own ``assign()``-ed consumer (cached per Python worker) and yields Arrow
record batches; the same range always yields the same records.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from pyspark.sql.datasource import DataSource, DataSourceReader, DataSourceStreamReader, InputPartition
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.streaming.datasource import (
    ReadAllAvailable,
    ReadLimit,
    ReadMaxRows,
    SupportsTriggerAvailableNow,
)
from pyspark.sql.types import (
    ArrayType,
    BinaryType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from streaming import kafka_client as kc
from udfs.errors import SparkscoreError

log = logging.getLogger("sparkscore.streaming.source")

NAME = "kafka_py"
EARLIEST, LATEST = -2, -1

# librdkafka timestamp types -> Kafka's TimestampType ids (what the JVM source reports).
_TS_TYPE = {1: 0, 2: 1, 0: -1}

# What the JVM source refuses too: this source manages offsets and deserialisation itself.
_FORBIDDEN = {
    "auto.offset.reset": "set startingOffsets instead",
    "enable.auto.commit": "the source never commits offsets to Kafka",
    "key.deserializer": "keys are always returned as bytes",
    "value.deserializer": "values are always returned as bytes",
    "interceptor.classes": "interceptors are not supported",
}

# Source options that are not kafka.* client settings; anything else is a typo.
_KNOWN = {
    "subscribe",
    "subscribepattern",
    "assign",
    "startingoffsets",
    "endingoffsets",
    "maxoffsetspertrigger",
    "minoffsetspertrigger",
    "maxtriggerdelay",
    "minpartitions",
    "failondataloss",
    "includeheaders",
    "latestoffsetsby",
    "kafkaconsumer.polltimeoutms",
    "path",
}


class SourceOptionError(SparkscoreError):
    """An option of the kafka_py source is missing, unknown or malformed."""


def kafka_schema(include_headers: bool = False) -> StructType:
    """The JVM Kafka source's schema."""
    fields = [
        StructField("key", BinaryType()),
        StructField("value", BinaryType()),
        StructField("topic", StringType()),
        StructField("partition", IntegerType()),
        StructField("offset", LongType()),
        StructField("timestamp", TimestampType()),
        StructField("timestampType", IntegerType()),
    ]
    if include_headers:
        header = StructType([StructField("key", StringType()), StructField("value", BinaryType())])
        fields.append(StructField("headers", ArrayType(header)))
    return StructType(fields)


def _bool(options: dict[str, str], name: str, default: bool) -> bool:
    raw = options.get(name.lower())
    if raw is None:
        return default
    if raw.strip().lower() in ("true", "false"):
        return raw.strip().lower() == "true"
    raise SourceOptionError(f"option {name} must be true or false, got {raw!r}")


def _positive_int(options: dict[str, str], name: str) -> int | None:
    raw = options.get(name.lower())
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise SourceOptionError(f"option {name} must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise SourceOptionError(f"option {name} must be a positive integer, got {raw!r}")
    return value


def _offsets_spec(options: dict[str, str], name: str, default: str) -> str | dict[str, dict[str, int]]:
    raw = options.get(name.lower(), default).strip()
    if raw.lower() in ("earliest", "latest"):
        return raw.lower()
    try:
        parsed = json.loads(raw)
        return {t: {str(int(p)): int(o) for p, o in parts.items()} for t, parts in parsed.items()}
    except (ValueError, AttributeError, TypeError):
        raise SourceOptionError(
            f'option {name} must be "earliest", "latest" or JSON like {{"topic": {{"0": 23, "1": -2}}}} '
            f"(-2 = earliest, -1 = latest), got {raw!r}"
        ) from None


@dataclass(frozen=True)
class SourceOptions:
    """The parsed options: small and picklable (it travels inside every input partition)."""

    client: dict[str, str]
    subscribe: tuple[str, ...] = ()
    subscribe_pattern: str | None = None
    assign: dict[str, tuple[int, ...]] = field(default_factory=dict)
    starting: str | dict[str, dict[str, int]] = "latest"
    ending: str | dict[str, dict[str, int]] = "latest"
    max_offsets_per_trigger: int | None = None
    min_partitions: int | None = None
    fail_on_data_loss: bool = True
    include_headers: bool = False
    latest_by: str = kc.LIST_OFFSETS
    poll_timeout_s: float = 120.0

    @classmethod
    def parse(cls, options: Any, *, streaming: bool) -> SourceOptions:
        opts = {str(k).lower(): str(v) for k, v in dict(options).items()}
        client = {k[len("kafka.") :]: v for k, v in opts.items() if k.startswith("kafka.")}
        if "bootstrap.servers" not in client:
            raise SourceOptionError(
                "option kafka.bootstrap.servers is required (e.g. 127.0.0.1:9092); "
                f"given options: {sorted(opts)}"
            )
        for key, why in _FORBIDDEN.items():
            if key in client:
                raise SourceOptionError(f"option kafka.{key} is not supported: {why}")
        unknown = sorted(k for k in opts if not k.startswith("kafka.") and k not in _KNOWN)
        if unknown:
            raise SourceOptionError(f"unknown option(s) {unknown} for the {NAME} source")
        chosen = [k for k in ("subscribe", "subscribepattern", "assign") if k in opts]
        if len(chosen) != 1:
            raise SourceOptionError(
                f"give exactly one of the options subscribe, subscribePattern, assign; got {chosen or 'none'}"
            )
        subscribe: tuple[str, ...] = ()
        pattern = None
        assign: dict[str, tuple[int, ...]] = {}
        if "subscribe" in opts:
            subscribe = tuple(t.strip() for t in opts["subscribe"].split(",") if t.strip())
            if not subscribe:
                raise SourceOptionError("option subscribe must list at least one topic")
        elif "subscribepattern" in opts:
            pattern = opts["subscribepattern"]
            try:
                re.compile(pattern)
            except re.error as exc:
                raise SourceOptionError(f"option subscribePattern is not a valid regex: {exc}") from None
        else:
            try:
                parsed = json.loads(opts["assign"])
                assign = {t: tuple(sorted(int(p) for p in parts)) for t, parts in parsed.items()}
            except (ValueError, AttributeError, TypeError):
                raise SourceOptionError(
                    f'option assign must be JSON like {{"topic": [0, 1]}}, got {opts["assign"]!r}'
                ) from None
        latest_by = opts.get("latestoffsetsby", kc.LIST_OFFSETS)
        if latest_by not in kc.LATEST_OFFSET_MODES:
            raise SourceOptionError(
                f"option latestOffsetsBy must be one of {list(kc.LATEST_OFFSET_MODES)}, got {latest_by!r}"
            )
        timeout_ms = _positive_int(opts, "kafkaConsumer.pollTimeoutMs") or 120_000
        ending = _offsets_spec(opts, "endingOffsets", "latest")
        if streaming and "endingoffsets" in opts:
            raise SourceOptionError("option endingOffsets applies to batch reads only")
        if ending == "earliest":
            raise SourceOptionError('option endingOffsets cannot be "earliest"')
        return cls(
            client=client,
            subscribe=subscribe,
            subscribe_pattern=pattern,
            assign=assign,
            starting=_offsets_spec(opts, "startingOffsets", "latest" if streaming else "earliest"),
            ending=ending,
            max_offsets_per_trigger=_positive_int(opts, "maxOffsetsPerTrigger"),
            min_partitions=_positive_int(opts, "minPartitions"),
            fail_on_data_loss=_bool(opts, "failOnDataLoss", True),
            include_headers=_bool(opts, "includeHeaders", False),
            latest_by=latest_by,
            poll_timeout_s=timeout_ms / 1000,
        )


Offsets = dict[kc.TP, int]


def to_json(offsets: Offsets) -> dict[str, dict[str, int]]:
    """Offsets in the JVM's shape; keys are strings because offsets go through JSON on every call."""
    out: dict[str, dict[str, int]] = {}
    for (topic, part), off in sorted(offsets.items()):
        out.setdefault(topic, {})[str(part)] = int(off)
    return out


def from_json(offsets: dict[str, Any] | None) -> Offsets:
    return {(t, int(p)): int(o) for t, parts in (offsets or {}).items() for p, o in parts.items()}


def rate_limit(start: Offsets, latest: Offsets, max_rows: int) -> Offsets:
    """End offsets that admit at most ``max_rows`` records, shared in proportion to each backlog.

    Unlike the JVM source (which rounds small shares up and can exceed the limit by
    a few records), the shares here add up to exactly ``min(max_rows, backlog)``:
    floors first, then the remainder one record at a time to the largest fractions.
    """
    sizes = {tp: end - start.get(tp, end) for tp, end in latest.items() if end > start.get(tp, end)}
    total = sum(sizes.values())
    if total <= max_rows:
        return dict(latest)
    shares = {tp: max_rows * size / total for tp, size in sizes.items()}
    take = {tp: int(s) for tp, s in shares.items()}
    left = max_rows - sum(take.values())
    for tp in sorted(shares, key=lambda tp: (take[tp] - shares[tp], tp))[:left]:
        take[tp] += 1
    return {tp: start.get(tp, end) + take.get(tp, 0) for tp, end in latest.items()}


@dataclass(frozen=True)
class KafkaInputPartition(InputPartition):
    """One Spark task's work: records [start, end) of one topic partition."""

    topic: str
    partition: int
    start: int
    end: int
    options: SourceOptions


class _KafkaReaderBase:
    """Topic discovery, offset resolution and partition planning shared by stream and batch reads."""

    def __init__(self, options: SourceOptions, schema: StructType) -> None:
        self.opts = options
        self.schema = schema
        self._offsets: kc.Offsets | None = None

    def __getstate__(self) -> dict[str, Any]:
        # The reader is pickled to executors for read(); its driver-side clients stay behind.
        state = dict(self.__dict__)
        state["_offsets"] = None
        return state

    @property
    def offsets(self) -> kc.Offsets:
        if self._offsets is None:
            self._offsets = kc.Offsets(
                self.opts.client, latest_by=self.opts.latest_by, timeout_s=self.opts.poll_timeout_s
            )
        return self._offsets

    def topic_partitions(self) -> list[kc.TP]:
        if self.opts.assign:
            return [(t, p) for t, parts in self.opts.assign.items() for p in parts]
        known = self.offsets.partitions()
        if self.opts.subscribe_pattern is not None:
            pattern = re.compile(self.opts.subscribe_pattern)
            topics = [t for t in known if pattern.fullmatch(t)]
        else:
            topics = [t for t in self.opts.subscribe if t in known]
        return sorted((t, p) for t in topics for p in known[t])

    def resolve(self, spec: str | dict[str, dict[str, int]], tps: list[kc.TP], what: str) -> Offsets:
        """earliest / latest / JSON (-2, -1 allowed) -> concrete offsets for ``tps``."""
        if spec == "earliest":
            return self.offsets.earliest(tps)
        if spec == "latest":
            return self.offsets.latest(tps)
        assert isinstance(spec, dict)
        given = from_json(spec)
        missing = sorted(set(tps) - set(given))
        if missing:
            raise SourceOptionError(
                f"{what} gives offsets for {sorted(given)} but the query reads {tps}; "
                f"add {missing} (-2 = earliest, -1 = latest)"
            )
        earliest = self.offsets.earliest([tp for tp, o in given.items() if o == EARLIEST])
        latest = self.offsets.latest([tp for tp, o in given.items() if o == LATEST])
        return {tp: earliest.get(tp, latest.get(tp, given[tp])) for tp in tps}

    def plan(self, start: Offsets, end: Offsets) -> list[KafkaInputPartition]:
        """One input partition per topic partition with records, split further for minPartitions."""
        new = [tp for tp in end if tp not in start]
        if new:
            # A partition that appeared after the start offsets were fixed is read from its beginning.
            start = {**self.offsets.earliest(new), **start}
        ranges = [(tp, start[tp], off) for tp, off in sorted(end.items()) if off > start[tp]]
        pieces = 1
        if self.opts.min_partitions and ranges and self.opts.min_partitions > len(ranges):
            pieces = -(-self.opts.min_partitions // len(ranges))
        parts = []
        for (topic, part), lo, hi in ranges:
            bounds = np.linspace(lo, hi, min(pieces, hi - lo) + 1).astype(np.int64)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                if b > a:
                    parts.append(KafkaInputPartition(topic, part, int(a), int(b), self.opts))
        return parts

    def read(self, partition: InputPartition) -> Iterator[pa.RecordBatch]:
        assert isinstance(partition, KafkaInputPartition)
        return read_partition(partition, to_arrow_schema(self.schema, timezone="UTC"))

    def close(self) -> None:
        if self._offsets is not None:
            self._offsets.close()
            self._offsets = None


class KafkaStreamReader(_KafkaReaderBase, DataSourceStreamReader, SupportsTriggerAvailableNow):
    """Micro-batch reads with admission control (maxOffsetsPerTrigger) and availableNow."""

    def __init__(self, options: SourceOptions, schema: StructType) -> None:
        super().__init__(options, schema)
        self._target: Offsets | None = None
        self._latest: Offsets | None = None
        _shield_from_stop_signals()

    def initialOffset(self) -> dict[str, dict[str, int]]:
        return to_json(self.resolve(self.opts.starting, self.topic_partitions(), "startingOffsets"))

    def getDefaultReadLimit(self) -> ReadLimit:
        if self.opts.max_offsets_per_trigger:
            return ReadMaxRows(self.opts.max_offsets_per_trigger)
        return ReadAllAvailable()

    def prepareForTriggerAvailableNow(self) -> None:
        # Everything up to the log ends of now, and nothing that arrives later.
        self._target = self.offsets.latest(self.topic_partitions())

    def latestOffset(self, start: dict[str, Any], limit: ReadLimit) -> dict[str, dict[str, int]]:
        begin = from_json(start)
        if self._target is not None:
            latest = dict(self._target)
        else:
            latest = self.offsets.latest(self.topic_partitions())
        self._latest = latest
        begin = self._check_loss(begin, latest)
        new = [tp for tp in latest if tp not in begin]
        if new:
            begin = {**begin, **self.offsets.earliest(new)}
        if isinstance(limit, ReadMaxRows):
            end = rate_limit(begin, latest, limit.max_rows)
        elif isinstance(limit, ReadAllAvailable):
            end = latest
        else:
            raise SourceOptionError(f"the {NAME} source supports maxOffsetsPerTrigger only, got {limit}")
        return to_json(end)

    def _check_loss(self, begin: Offsets, latest: Offsets) -> Offsets:
        gone = sorted(tp for tp in begin if tp not in latest)
        behind = sorted(tp for tp in begin if tp in latest and latest[tp] < begin[tp])
        problems = []
        if gone:
            problems.append(
                f"partition(s) {', '.join(f'{t}/{p}' for t, p in gone)} were read up to offset(s) "
                f"{', '.join(str(begin[tp]) for tp in gone)} but no longer exist"
            )
        if behind:
            problems.append(
                ", ".join(f"{t}/{p} now ends at offset {latest[(t, p)]}" for t, p in behind)
                + " but the query already read up to offset(s) "
                + ", ".join(str(begin[tp]) for tp in behind)
            )
        if problems:
            problems[-1] += (
                " (the broker lost its data, e.g. restarted without its log, or the topic was deleted "
                "and created again)"
            )
        if problems:
            kc.data_loss(self.opts.fail_on_data_loss, "; ".join(problems))
            log.warning("data loss: %s; continuing (failOnDataLoss=false)", "; ".join(problems))
            begin = {tp: (latest[tp] if tp in behind else off) for tp, off in begin.items() if tp not in gone}
        return begin

    def reportLatestOffset(self) -> dict[str, dict[str, int]] | None:
        return None if self._latest is None else to_json(self._latest)

    def partitions(self, start: dict[str, Any], end: dict[str, Any]) -> list[KafkaInputPartition]:
        return self.plan(from_json(start), from_json(end))

    def commit(self, end: dict[str, Any]) -> None:
        """Nothing to do: like the JVM source, offsets live in the checkpoint, never in Kafka."""

    def stop(self) -> None:
        self.close()


class KafkaBatchReader(_KafkaReaderBase, DataSourceReader):
    """``spark.read.format("kafka_py")``: startingOffsets (default earliest) to endingOffsets (latest)."""

    def partitions(self) -> list[KafkaInputPartition]:  # type: ignore[override]
        tps = self.topic_partitions()
        start = self.resolve(self.opts.starting, tps, "startingOffsets")
        end = self.resolve(self.opts.ending, tps, "endingOffsets")
        parts = self.plan(start, end)
        self.close()
        return parts


class KafkaPyDataSource(DataSource):
    """The ``kafka_py`` data source (streaming and batch reads)."""

    @classmethod
    def name(cls) -> str:
        return NAME

    def schema(self) -> StructType:
        return kafka_schema(_bool({k.lower(): v for k, v in self.options.items()}, "includeHeaders", False))

    def streamReader(self, schema: StructType) -> KafkaStreamReader:
        return KafkaStreamReader(SourceOptions.parse(self.options, streaming=True), schema)

    def reader(self, schema: StructType) -> KafkaBatchReader:
        return KafkaBatchReader(SourceOptions.parse(self.options, streaming=False), schema)


# Spark runs a streaming Python source's driver side (offsets, commits) in this module's process.
SOURCE_RUNNER = "pyspark.sql.streaming.python_streaming_source_runner"


def _shield_from_stop_signals() -> None:
    """In Spark's Python process for a streaming source: stop signals are the job's to handle.

    Ctrl-C, ``kill -TERM -<pgid>`` and supervisors that signal a whole process group reach this
    process too (Spark starts it in the job's group; its worker daemons get groups of their own).
    Killed, it fails the query at its next offset request ("EOFException") instead of letting the
    job stop between micro-batches by itself. So it ignores SIGINT and moves into a group of its
    own; Spark still ends it by closing its socket when the query stops or the JVM exits.
    """
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name == SOURCE_RUNNER:
        with contextlib.suppress(OSError):  # already a group leader
            os.setpgid(0, 0)


def read_partition(part: KafkaInputPartition, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """Executor side: the records of one range as Arrow batches, from a per-worker cached consumer."""
    opts = part.options
    consumer = kc.cached("consumer", opts.client)

    def earliest() -> int:
        low, _ = consumer.get_watermark_offsets(
            kc.TopicPartition(part.topic, part.partition), timeout=opts.poll_timeout_s, cached=False
        )
        return int(low)

    for msgs in kc.read_range(
        consumer,
        part.topic,
        part.partition,
        part.start,
        part.end,
        timeout_s=opts.poll_timeout_s,
        fail_on_data_loss=opts.fail_on_data_loss,
        earliest=earliest,
    ):
        yield messages_to_batch(msgs, schema, opts.include_headers)


def messages_to_batch(msgs: list[Any], schema: pa.Schema, include_headers: bool) -> pa.RecordBatch:
    """Records of one partition (at least one) as a batch of the source's Arrow schema."""
    n = len(msgs)
    stamps = [m.timestamp() for m in msgs]
    cols = [
        pa.array([m.key() for m in msgs], pa.binary()),
        pa.array([m.value() for m in msgs], pa.binary()),
        pa.array([msgs[0].topic()] * n, pa.string()),
        pa.array(np.full(n, msgs[0].partition(), dtype=np.int32)),
        pa.array(np.fromiter((m.offset() for m in msgs), dtype=np.int64, count=n)),
        pa.array(
            np.fromiter((s[1] for s in stamps), dtype=np.int64, count=n) * 1000,
            schema.field("timestamp").type,
        ),
        pa.array(np.fromiter((_TS_TYPE.get(s[0], -1) for s in stamps), dtype=np.int32, count=n)),
    ]
    if include_headers:
        headers = [[{"key": k, "value": v} for k, v in (m.headers() or [])] for m in msgs]
        cols.append(pa.array(headers, schema.field("headers").type))
    return pa.RecordBatch.from_arrays(cols, schema=schema)
