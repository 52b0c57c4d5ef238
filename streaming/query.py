"""Query wiring: the scoring query (events -> predictions + DLQ) and the statistics query.

The scoring query reads the input topic with the chosen backend, parses,
scores with the core and writes through :class:`streaming.sink.EffectivelyOnceSink`
in ``foreachBatch``: executors produce their partitions' records, the driver
commits a marker per batch. The statistics query reads the predictions topic
(``read_committed``) and writes window aggregates through a second sink
(driver-side, they are few).

Stopping: Ctrl-C or SIGTERM (to the Python driver or to the ``spark-submit`` JVM)
stops each query between micro-batches and returns the summary. Failing: a broker
that stays unreachable for ``[kafka] broker_timeout_ms`` fails the run with one
sentence naming it; a query that dies reports the sentence of its cause.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError, KafkaException

from streaming import backends, kafka_client
from streaming.config import StreamConfig
from streaming.delta_sink import DEAD_LETTERS, PREDICTIONS, DeltaSink, with_dest
from streaming.markers import writer_markers
from streaming.model_refresh import ModelRefresher, record_of
from streaming.pipeline import count_metrics, event_schema, parse_events, score_events, to_records
from streaming.plan import BatchPlan
from streaming.sink import (
    COMMIT_TOPIC_CONFIGS,
    SUMMARY_SCHEMA,
    BatchResult,
    EffectivelyOnceSink,
    record_rows,
    write_partition,
)
from streaming.stats import collect_windows, stats_records, window_aggregates, window_stats
from udfs.errors import ConfigError

# The scoring query's source name for a Delta input (summary, messages).
DELTA = "delta"

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.streaming import StreamingQuery

    from udfs.spec import ResolvedModel

SPARK_DEFAULTS = {
    # Event times go in and out as UTC whatever the machine's zone.
    "spark.sql.session.timeZone": "UTC",
    # The statistics' state store has one partition per shuffle partition: keep it small.
    "spark.sql.shuffle.partitions": "2",
    "spark.sql.streaming.metricsEnabled": "true",
    # A progress bar per micro-batch is noise in a long-running job's log.
    "spark.ui.showConsoleProgress": "false",
    # Python workers that let Ctrl-C through fail the running batch; the job stops between batches.
    "spark.python.daemon.module": "streaming.daemon",
}

# Small batches are written by the driver: each chained Python stage costs every task a
# worker round trip (about 0.1 s on 2 busy cores), a large share of a small batch's time.
# Large batches stay on the executors, where the writing runs in parallel.
DRIVER_WRITE_MAX_EVENTS = 20_000


def batch_size(checkpoint: str, batch_id: int) -> int | None:
    """Source records in micro-batch ``batch_id``, from the query's offset log; None when unknown.

    Spark writes the batch's end offsets before it runs the batch, so the difference to
    the previous entry is the exact size. Only local checkpoints are read (a remote one,
    batch 0, or an offset shape other than ``{"topic": {"0": n}}`` gives None).
    """
    ranges = batch_ranges(checkpoint, batch_id)
    return None if ranges is None else sum(end - start for start, end in ranges.values())


def batch_ranges(
    checkpoint: str,
    batch_id: int,
    *,
    read: Callable[[str], str] | None = None,
    starting: str | None = None,
) -> dict[tuple[str, int], tuple[int, int]] | None:
    """(topic, partition) -> [start, end) of micro-batch ``batch_id`` from the offset log; None when unknown.

    Local checkpoints are read directly; others (``hdfs://``, ``s3a://``, ...) only with
    ``read`` (a path -> text function, e.g. :func:`hadoop_reader`). Batch 0 starts where the
    JVM source recorded its initial offsets (``sources/0/0``), else at ``starting`` (the
    ``startingOffsets`` option) when that is JSON with concrete offsets.
    """
    local = checkpoint.removeprefix("file:")
    if read is None:
        if "://" in local:
            return None
        root, read = local, _read_local
    else:
        root = checkpoint
    root = root.rstrip("/")
    try:
        cur = _offset_entry(read(f"{root}/offsets/{batch_id}"))
        if batch_id > 0:
            prev = _offset_entry(read(f"{root}/offsets/{batch_id - 1}"))
        else:
            prev = _initial_offsets(read, root, starting)
        return {
            (topic, int(part)): (int(prev[topic][part]), int(off))
            for topic, parts in cur.items()
            for part, off in parts.items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    except Exception as exc:  # a Py4J error from the JVM reader: unknown, not a failure
        if type(exc).__name__ in ("Py4JJavaError", "Py4JError"):
            return None
        raise


def _read_local(path: str) -> str:
    return Path(path).read_text()


def _initial_offsets(
    read: Callable[[str], str], root: str, starting: str | None
) -> dict[str, dict[str, int]]:
    """Batch 0's start: the JVM source's record of it, or concrete JSON startingOffsets."""
    try:
        # KafkaSourceInitialOffsetWriter: a 0 byte (Spark 2.1 compatibility), "v1", then the JSON.
        text = read(f"{root}/sources/0/0").lstrip("\x00")
        for line in text.splitlines():
            if line.startswith("{"):
                found = json.loads(line)
                if isinstance(found, dict):
                    return found
    except Exception as exc:
        if not isinstance(exc, OSError) and type(exc).__name__ not in ("Py4JJavaError", "Py4JError"):
            raise
    given = json.loads(starting or "null") if (starting or "").lstrip().startswith("{") else None
    if not isinstance(given, dict):
        raise ValueError("batch 0's start offsets are unknown")
    # -2 / -1 (earliest / latest) are resolved by the source: those partitions stay unknown.
    return {t: {p: o for p, o in parts.items() if int(o) >= 0} for t, parts in given.items()}


def hadoop_reader(spark: SparkSession) -> Callable[[str], str]:
    """A path -> text function through Hadoop's FileSystem (any scheme the JVM can read)."""
    sc = spark.sparkContext
    jvm, conf = sc._jvm, sc._jsc.hadoopConfiguration()  # type: ignore[union-attr]
    assert jvm is not None

    def read(path: str) -> str:
        p = jvm.org.apache.hadoop.fs.Path(path)
        stream = p.getFileSystem(conf).open(p)
        try:
            return str(jvm.org.apache.commons.io.IOUtils.toString(stream, "UTF-8"))
        finally:
            stream.close()

    return read


def lost_offsets(
    ranges: dict[tuple[str, int], tuple[int, int]], earliest: dict[tuple[str, int], int], read: int
) -> int:
    """Offsets of a batch that were gone before the source read them (``failOnDataLoss = false``).

    Retention and ``deleteRecords`` remove a partition's oldest records, so what the batch
    could not read is ``[start, log start)`` of each range; at most the records it missed.
    A partition missing from ``earliest`` no longer exists: all of its range is gone.
    """
    gone = sum(max(0, min(earliest.get(tp, end), end) - start) for tp, (start, end) in ranges.items())
    missed = sum(end - start for start, end in ranges.values()) - read
    return max(0, min(gone, missed))


def _offset_entry(text: str) -> dict[str, dict[str, int]]:
    # An offset log file: "v1", the batch metadata, then one line per source.
    lines = text.splitlines()
    entry = json.loads(lines[2]) if len(lines) > 2 else None
    if not isinstance(entry, dict):
        raise ValueError("not a Kafka offset entry")
    return entry


def source_options(
    cfg: StreamConfig, *, topic: str | None = None, starting: str | None = None
) -> dict[str, str]:
    """Options for ``format("kafka")`` / ``format("kafka_py")``: the input topic, or ``topic`` when given."""
    k, i = cfg.kafka, cfg.input
    opts = {f"kafka.{key}": str(v) for key, v in k.client_conf.items()}
    opts["failOnDataLoss"] = str(i.fail_on_data_loss).lower()
    opts["kafkaConsumer.pollTimeoutMs"] = str(k.poll_timeout_ms)
    opts["latestOffsetsBy"] = k.latest_offsets_by
    if topic is not None:
        # Our own transactional output: only what its writers committed.
        opts["kafka.isolation.level"] = kafka_client.READ_COMMITTED
        opts["subscribe"] = topic
        opts["startingOffsets"] = starting or "earliest"
        return opts
    # Dead letters keep the input message's headers.
    opts["includeHeaders"] = "true"
    if i.topic:
        opts["subscribe"] = i.topic
    elif i.subscribe_pattern:
        opts["subscribePattern"] = i.subscribe_pattern
    else:
        opts["assign"] = str(i.assign)
    opts["startingOffsets"] = starting or i.starting_offsets
    if i.max_offsets_per_trigger:
        opts["maxOffsetsPerTrigger"] = str(i.max_offsets_per_trigger)
    if i.min_partitions:
        opts["minPartitions"] = str(i.min_partitions)
    return opts


def _trigger(writer: Any, trigger: str) -> Any:
    if trigger == "availableNow":
        return writer.trigger(availableNow=True)
    return writer.trigger(processingTime=trigger)


def _start(
    writer: Any,
    checkpoint: str,
    run_batch: Callable[[DataFrame, int], None],
    trigger: str | None,
    cfg: StreamConfig,
) -> StreamingQuery:
    """Start a foreachBatch query on ``checkpoint`` with the job's trigger (or ``trigger``)."""
    writer = writer.option("checkpointLocation", checkpoint).foreachBatch(run_batch)
    return _trigger(writer, trigger or cfg.job.trigger).start()


def _sink(cfg: StreamConfig, topics: tuple[str, ...], name: str) -> EffectivelyOnceSink:
    return EffectivelyOnceSink(
        client=cfg.kafka.client_conf,
        topics=topics,
        commit_topic=cfg.output.commit_topic,
        producer=cfg.output.producer,
        latest_by=cfg.kafka.latest_offsets_by,
        timeout_s=cfg.kafka.poll_timeout_ms / 1000,
        name=name,
    )


class BatchGate:
    """Whether a ``foreachBatch`` call is running, so that a stop can wait for the batch boundary.

    Stopping a query inside ``foreachBatch`` makes the Python callback fail with a long Py4J error.
    Spark decides whether that error was "just the stop" with a regular expression over the whole
    message (``StreamExecution.isInterruptionException``), which overflows the stack on a long
    message: the query thread dies with a ``StackOverflowError`` trace in the log. Between batches
    the interrupt lands in Spark's own code and the stop is clean.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._running = False

    def __enter__(self) -> BatchGate:
        with self._cv:
            self._running = True
        return self

    def __exit__(self, *_: object) -> None:
        with self._cv:
            self._running = False
            self._cv.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no batch is running (at most ``timeout_s``); True when idle."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._running, timeout_s)


class BatchFailed(RuntimeError):
    """A ``foreachBatch`` call failed; the message is short (see :func:`short_errors`)."""


# The JVM exceptions Spark reads as "the query was stopped" in a Python foreachBatch error
# (StreamExecution.IO_EXCEPTION_NAMES), and the shape it looks for (StreamExecution.PROXY_ERROR).
_INTERRUPTIONS = re.compile(
    r"\b(java\.lang\.InterruptedException|java\.io\.InterruptedIOException|"
    r"java\.nio\.channels\.ClosedByInterruptException)\b"
)


_SPARK_SAID = re.compile(r"^\S.*(Job aborted|Exception: |Error: )")


@contextlib.contextmanager
def short_errors() -> Any:
    """Re-raise a ``foreachBatch`` failure as :class:`BatchFailed` with a message of a few lines.

    Spark decides whether a Python ``foreachBatch`` error was only the query being stopped
    with a regular expression over the whole Python traceback (``StreamExecution.PROXY_ERROR``,
    a greedy ``.+`` in a group), and the JVM's regex engine recurses per character: a failed
    Spark job's traceback (tens of kB, e.g. every job cancelled when the broker is lost)
    overflows the stack, and the query thread dies with a ``StackOverflowError`` of about
    1,000 log lines. The short message keeps what matters: our error's sentence, the stop
    signature Spark looks for, and a checkpoint helper killed by a stop signal.
    """
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised, shortened
        ours = f"{type(exc).__name__}: {exc}"
        full = "\n".join(_exception_texts(exc))
        text = (ours if _CAUSE.match(ours) else failure_reason(exc))[:2000]
        if not _CAUSE.match(text):
            # Not one of ours: add what the Spark job said (e.g. "Job aborted due to stage failure").
            said = [line.strip()[:300] for line in full.splitlines() if _SPARK_SAID.search(line)]
            text = "\n".join(dict.fromkeys([text, *said[:2]]))
        extra = []
        if (found := _INTERRUPTIONS.search(full)) is not None:
            extra.append(
                "py4j.protocol.Py4JJavaError: An error occurred while calling foreachBatch.\n"
                f": {found.group(1)}"
            )
        if (killed := _KILLED_HELPER.search(full)) is not None:
            extra.append(killed.group(0))
        raise BatchFailed("\n".join([text, *extra])) from None


def stop_between_batches(query: StreamingQuery, gate: BatchGate, *, timeout_s: float = 60.0) -> None:
    """Stop ``query`` once its current batch (if any) has finished; after ``timeout_s``, stop anyway."""
    if query.isActive:
        gate.wait_idle(timeout_s)
        query.stop()


def ensure_output_topics(cfg: StreamConfig) -> None:
    """Create the missing output, dead-letter, stats and commit topics with the configured settings."""
    o = cfg.output
    data = kafka_client.TopicSpec(o.partitions, o.replication_factor, dict(o.topic_configs))
    topics: dict[str, int | kafka_client.TopicSpec] = {}
    # A Delta output writes no predictions topic, and with a Delta dead-letter table no DLQ topic.
    if o.kind == "kafka":
        topics[o.topic] = data
    if not o.delta_dlq:
        topics[o.dlq_topic] = data
    if not topics and not cfg.stats.enabled:
        return  # Kafka is only the input: no sink writes markers
    # The commit topic holds the markers of every Kafka sink: the output's, the DLQ's, the stats'.
    # topic_configs apply to it too (min.insync.replicas, ...), except its cleanup policy: markers
    # must be compacted, never deleted by age.
    shared = {k: v for k, v in o.topic_configs.items() if k != "cleanup.policy"}
    topics[o.commit_topic] = kafka_client.TopicSpec(
        1, o.replication_factor, {**COMMIT_TOPIC_CONFIGS, **shared, **o.commit_topic_configs}
    )
    if cfg.stats.enabled:
        topics[cfg.stats.topic] = kafka_client.TopicSpec(1, o.replication_factor, dict(o.topic_configs))
    timeout_s = cfg.kafka.poll_timeout_ms / 1000
    try:
        kafka_client.ensure_topics(cfg.kafka.client_conf, topics, timeout_s=timeout_s)
    except kafka_client.KafkaConfigError as exc:
        raise ConfigError(f"{exc}; check [output] replication_factor / topic_configs") from None
    policy = kafka_client.topic_configs(cfg.kafka.client_conf, [o.commit_topic], timeout_s).get(
        o.commit_topic, {}
    )
    if policy and "compact" not in policy.get("cleanup.policy", ""):
        print(
            f"[sparkscore] warning: the commit topic {o.commit_topic!r} is not compacted "
            f"(cleanup.policy={policy.get('cleanup.policy')}): once retention removes a query's newest "
            "marker, its restart stops with an error instead of resuming; set cleanup.policy=compact",
            file=sys.stderr,
            flush=True,
        )


def check_input_topics(cfg: StreamConfig) -> None:
    """An --available-now run over an input topic that does not exist is a mistake unless allowed."""
    i = cfg.input
    if i.allow_missing_topic:
        return
    known = kafka_client.topic_partitions(
        kafka_client.make_admin(cfg.kafka.client_conf), cfg.kafka.poll_timeout_ms / 1000
    )
    if i.topic:
        missing = [t.strip() for t in i.topic.split(",") if t.strip() and t.strip() not in known]
    elif i.subscribe_pattern:
        missing = [] if any(re.fullmatch(i.subscribe_pattern, t) for t in known) else [i.subscribe_pattern]
    else:
        missing = [t for t in json.loads(i.assign or "{}") if t not in known]
    if missing:
        raise ConfigError(
            f"input topic {', '.join(repr(t) for t in missing)} does not exist on "
            f"{cfg.kafka.bootstrap_servers}, so --available-now has nothing to read; create it (or check "
            "[input] topic), or set [input] allow_missing_topic = true to let the run finish with 0 events"
        )


def check_spark_conf(spark: SparkSession) -> None:
    """Settings the effectively-once sink cannot work with."""
    if (spark.conf.get("spark.speculation", "false") or "").strip().lower() == "true":
        raise ConfigError(
            "spark.speculation=true runs a second copy of slow write tasks whose transactions fence each "
            "other's; set spark.speculation=false for the stream job"
        )


def scoring_frame(
    spark: SparkSession, cfg: StreamConfig, model: ResolvedModel, backend: str, *, per_batch: bool = False
) -> DataFrame:
    """The streaming frame of output records, counts observed into the progress.

    ``per_batch`` ([job] model_refresh_s): the parsed events only; each micro-batch is scored inside
    ``foreachBatch`` with the model chosen for it (:func:`score_records`), and its counts are in the
    job's batch lines and summary rather than the query progress.
    """
    ev = cfg.events
    if cfg.input.kind == "delta":
        from streaming.delta_source import read_delta

        # The table's rows; each micro-batch becomes events (as_events) and is scored in foreachBatch.
        return read_delta(spark, cfg.input)
    parsed = backends.read_kafka(spark, backend, source_options(cfg)).transform(
        parse_events(ev.schema, user_id=ev.user_id, timestamp=ev.timestamp)
    )
    if per_batch:
        return parsed
    return parsed.transform(score_records(cfg, model)).transform(count_metrics)


def score_records(cfg: StreamConfig, model: ResolvedModel) -> Callable[[DataFrame], DataFrame]:
    """Parsed events -> what the output takes: the Kafka sink's records, or for a Delta output the
    scored rows with their ``dest`` (streaming.delta_sink)."""
    ev = cfg.events

    def transform(df: DataFrame) -> DataFrame:
        scored = df.transform(score_events(model, user_id=ev.user_id, timestamp=ev.timestamp))
        if cfg.output.kind == "delta":
            return with_dest(scored)
        return scored.transform(to_records(model, user_id=ev.user_id, timestamp=ev.timestamp))

    return transform


def batch_events(cfg: StreamConfig) -> Callable[[DataFrame], DataFrame]:
    """A micro-batch of the source as parsed events (a Delta source's rows get the Kafka layout)."""
    if cfg.input.kind != "delta":
        return lambda df: df
    from streaming.delta_source import as_events, name_of

    return as_events(name_of(cfg.input), user_id=cfg.events.user_id, timestamp=cfg.events.timestamp)


def replayed_model(sink: EffectivelyOnceSink, plan: BatchPlan) -> str:
    """The model a crashed run recorded for a batch it partly wrote ("" when it wrote none)."""
    if not plan.skip:
        return ""
    markers = writer_markers(plan, sink.offsets)
    return next((m.model for m in markers.values() if m.model), "")


def start_scoring(
    spark: SparkSession,
    cfg: StreamConfig,
    model: ResolvedModel,
    backend: str,
    *,
    trigger: str | None = None,
    gate: BatchGate | None = None,
) -> tuple[StreamingQuery, EffectivelyOnceSink | DeltaSink]:
    refresher = (
        ModelRefresher(cfg.model, model, cfg.job.model_refresh_s) if cfg.job.model_refresh_s > 0 else None
    )
    # Scored inside foreachBatch: with a model chosen per batch, and for a Delta source (its row ids).
    per_batch = refresher is not None or cfg.input.kind == "delta"
    records = scoring_frame(spark, cfg, model, backend, per_batch=per_batch)
    checkpoint = f"{cfg.job.checkpoint.rstrip('/')}/scoring"
    gate = gate or BatchGate()
    if cfg.output.kind == "delta":
        return start_delta_scoring(spark, cfg, model, records, per_batch, refresher, trigger, gate)
    sink = _sink(cfg, (cfg.output.topic, cfg.output.dlq_topic), "scoring")

    def run_batch(batch: DataFrame, batch_id: int) -> None:
        with gate, short_errors():
            score_and_write(batch, batch_id)

    def score_and_write(batch: DataFrame, batch_id: int) -> None:
        started = time.monotonic()
        plan = sink.begin(batch_id, writers=lambda: batch.rdd.getNumPartitions())
        if plan is None:
            print(f"[sparkscore] batch {batch_id}: already committed before a restart, skipped", flush=True)
            return
        if refresher is not None:
            # The model for this whole batch, chosen before any of its tasks starts.
            current = refresher.for_batch(batch_id, replayed_model(sink, plan))
            batch = batch.transform(batch_events(cfg)).transform(score_records(cfg, current))
            plan = replace(plan, model=record_of(current))
        elif per_batch:
            batch = batch.transform(batch_events(cfg)).transform(score_records(cfg, model))
        remote = "://" in checkpoint.removeprefix("file:")
        ranges = batch_ranges(
            checkpoint,
            batch_id,
            read=hadoop_reader(batch.sparkSession) if remote else None,
            starting=cfg.input.starting_offsets,
        )
        size = None if ranges is None else sum(end - start for start, end in ranges.values())
        # Batch 0 (usually a backlog) always goes to the executors.
        if batch_id > 0 and size is not None and size <= DRIVER_WRITE_MAX_EVENTS:
            # Same records, same headers, same markers as the executors' path; no extra Python stage.
            table = batch.toArrow()
            result = sink.write_local(plan, (r for b in table.to_batches() for r in record_rows(b)))
        else:
            result = BatchResult.from_rows(batch.mapInArrow(write_partition(plan), SUMMARY_SCHEMA).collect())
        preds = result.counts.get(cfg.output.topic, 0)
        dlq = result.counts.get(cfg.output.dlq_topic, 0)
        read = preds + dlq + result.skipped
        if not cfg.input.fail_on_data_loss and ranges is not None and read < (size or 0):
            earliest = sink.offsets.earliest(list(ranges), missing_ok=True)
            result.counts["lost"] = lost_offsets(ranges, earliest, read)
        sink.commit(plan, result)
        skipped = f", {result.skipped:,} already written" if result.skipped else ""
        lost = result.counts.get("lost", 0)
        gone = f"; {lost:,} offsets were gone from the broker (failOnDataLoss=false)" if lost else ""
        print(
            f"[sparkscore] batch {batch_id}: {read:,} events -> {preds:,} predictions, "
            f"{dlq:,} dead-lettered{skipped}{gone} ({time.monotonic() - started:.2f} s)",
            flush=True,
        )

    query = _start(records.writeStream.queryName(cfg.job.query_name), checkpoint, run_batch, trigger, cfg)
    sink.bind(query.id)
    return query, sink


def start_delta_scoring(
    spark: SparkSession,
    cfg: StreamConfig,
    model: ResolvedModel,
    records: DataFrame,
    per_batch: bool,
    refresher: ModelRefresher | None,
    trigger: str | None,
    gate: BatchGate,
) -> tuple[StreamingQuery, DeltaSink]:
    """The scoring query with a Delta output: the same scored rows, appended exactly once
    (streaming.delta_sink); dead letters to Kafka (effectively once) or a Delta table."""
    ev = cfg.events
    dlq = None if cfg.output.delta_dlq else _sink(cfg, (cfg.output.dlq_topic,), "dead letters")
    sink = DeltaSink(cfg.output, model, user_id=ev.user_id, timestamp=ev.timestamp, dlq=dlq)
    # Refused before the query starts: a table that cannot take these rows (per batch: the columns
    # of the source's empty schema scored).
    probe = records
    if per_batch:
        probe = spark.createDataFrame([], records.schema).transform(batch_events(cfg))
        probe = probe.transform(score_records(cfg, model))
    sink.check(spark, probe)
    sink.create(spark, probe)
    checkpoint = f"{cfg.job.checkpoint.rstrip('/')}/scoring"

    def run_batch(batch: DataFrame, batch_id: int) -> None:
        with gate, short_errors():
            started = time.monotonic()
            if per_batch:
                current = refresher.for_batch(batch_id) if refresher is not None else model
                batch = batch.transform(batch_events(cfg)).transform(score_records(cfg, current))
            preds, dlq_rows, skipped = sink.write(batch, batch_id)
            again = f" ({skipped:,} of them written before a restart: skipped)" if skipped else ""
            print(
                f"[sparkscore] batch {batch_id}: {preds + dlq_rows:,} events -> {preds:,} predictions, "
                f"{dlq_rows:,} dead-lettered{again} ({time.monotonic() - started:.2f} s)",
                flush=True,
            )

    query = _start(records.writeStream.queryName(cfg.job.query_name), checkpoint, run_batch, trigger, cfg)
    sink.bind(query.id)
    return query, sink


def start_stats(
    spark: SparkSession,
    cfg: StreamConfig,
    backend: str,
    *,
    trigger: str | None = None,
    gate: BatchGate | None = None,
) -> tuple[StreamingQuery, EffectivelyOnceSink]:
    st = cfg.stats
    shape = {
        "column": st.column,
        "window": st.window,
        "watermark": st.watermark,
        "timestamp": cfg.events.timestamp,
    }
    if cfg.output.kind == "delta":
        # The predictions table's new rows (committed appends only, each once), as the topic's records.
        o = cfg.output
        reader = spark.readStream.format("delta")
        rows = reader.table(o.table) if o.table else reader.load(str(o.path))
        if st.column not in rows.columns:
            raise ConfigError(
                f"[stats] column = {st.column!r} is not a column of the predictions table (it has {rows.columns})"
            )
        windows = rows.transform(window_aggregates(**shape))
    else:
        windows = backends.read_kafka(spark, backend, source_options(cfg, topic=cfg.output.topic)).transform(
            window_stats(**shape)
        )
    sink = _sink(cfg, (st.topic,), "stats")

    gate = gate or BatchGate()

    def run_batch(batch: DataFrame, batch_id: int) -> None:
        with gate, short_errors():
            write_windows(batch, batch_id)

    def write_windows(batch: DataFrame, batch_id: int) -> None:
        plan = sink.begin(batch_id)
        if plan is None:
            return
        rows = collect_windows(batch)
        result = sink.write_local(plan, stats_records(rows))
        sink.commit(plan, result)
        if rows:
            print(
                f"[sparkscore] stats batch {batch_id}: {len(rows)} window(s) written to {st.topic}",
                flush=True,
            )

    writer = windows.writeStream.queryName(f"{cfg.job.query_name}_stats").outputMode(st.output_mode)
    query = _start(
        writer, st.checkpoint or f"{cfg.job.checkpoint.rstrip('/')}/stats", run_batch, trigger, cfg
    )
    sink.bind(query.id)
    return query, sink


class QueryFailed(RuntimeError):
    """A streaming query stopped with an error, or the broker was lost (one sentence in the message)."""


# Our own errors, as they appear inside a Python traceback that Spark wraps in its own message.
_CAUSE = re.compile(
    r"(?:[\w.]+\.)?(DataLossError|SinkError|KafkaTimeoutError|KafkaConfigError|SourceOptionError|InjectedFault)"
    r": (.+)"
)


def failure_reason(exc: BaseException) -> str:
    """The sentence that says why a query died: our error's message when it is in there, else the first line."""
    text = str(exc).strip()
    found = _CAUSE.search(text) or _BATCH_FAILED.search(text)
    if found:
        return f"{found.group(1)}: {found.group(2).strip()}"
    return text.splitlines()[0] if text else type(exc).__name__


# A foreachBatch failure that is not one of our errors, as short_errors re-raised it.
_BATCH_FAILED = re.compile(r"[\w.]*\b(BatchFailed): (.+)")


# Hadoop runs `chmod` for local checkpoint files when its native library is missing; a Ctrl-C or a
# SIGTERM sent to the job's whole process group kills it too (exit 128 + SIGINT or SIGTERM), or
# kills the JDK's jspawnhelper before it has exec'd `chmod` ("Failed to exec spawn helper: pid: N,
# signal: 2", seen in a full-suite run).
_KILLED_HELPER = re.compile(
    r"ExitCodeException exitCode=(130|143)\b|Failed to exec spawn helper: pid: \d+, signal: (2|15)\b"
)


def killed_by_the_stop_signal(exc: BaseException) -> bool:
    """Whether a query died only because the user's stop signal killed a helper its JVM had forked.

    Checkpoint files are written between batches: a batch whose commit log entry is missing has its
    marker already (a restart skips it), and an offset log entry cut short is planned again. That is
    a stop, not a failure.
    """
    return any(_KILLED_HELPER.search(text) for text in _exception_texts(exc))


def _exception_texts(exc: BaseException) -> list[str]:
    """The texts of ``exc``, its PySpark causes and their JVM exceptions' cause chains (at most 20)."""
    texts: list[str] = []
    seen: Any = exc
    while seen is not None and len(texts) < 20:  # PySpark's captured causes: the helper's exit code
        texts.append(str(seen))
        origin = getattr(seen, "_origin", None)  # and the JVM exception's own cause chain
        while origin is not None and len(texts) < 20:
            try:
                texts.append(str(origin.toString()))
                origin = origin.getCause()
            except Exception:  # noqa: BLE001 - a Py4J call on a gone JVM; what was read is enough
                break
        seen = (
            getattr(seen, "_cause", None)
            or getattr(seen, "__cause__", None)
            or getattr(seen, "__context__", None)
        )
    return texts


class BrokerWatch:
    """Notices a broker that stops answering while queries run (a metadata request every ``every_s``).

    Without it, a stopped broker surfaces only when every client's own timeout has passed
    (minutes) and under thousands of reconnect log lines.
    """

    def __init__(self, conf: dict[str, str], timeout_s: float, every_s: float = 1.0) -> None:
        self.conf = conf
        self.timeout_s = timeout_s
        self.every_s = every_s
        self.lost: str | None = None
        self.event = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="sparkscore-broker-watch", daemon=True)

    def start(self) -> BrokerWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        admin = kafka_client.make_admin(self.conf)
        last_ok = time.monotonic()
        reason = "no answer"
        while not self._done.wait(self.every_s):
            try:
                admin.list_topics(timeout=min(5.0, self.timeout_s))
                last_ok = time.monotonic()
                continue
            except KafkaException as exc:
                err = exc.args[0]
                reason = err.str() if isinstance(err, KafkaError) else str(err)
            if time.monotonic() - last_ok >= self.timeout_s:
                self.lost = (
                    f"lost the Kafka broker at {self.conf.get('bootstrap.servers')!r}: no answer for "
                    f"{self.timeout_s:g} s ({reason}); the job stopped, and a restart resumes from the "
                    "checkpoint once the broker is back"
                )
                self.event.set()
                return


class _JvmSignalHandler:
    """A ``sun.misc.SignalHandler`` implemented in Python (Py4J callback)."""

    def __init__(self, on_signal: Callable[[], None]) -> None:
        self.on_signal = on_signal

    def handle(self, _signal: Any) -> None:
        self.on_signal()

    class Java:
        implements = ["sun.misc.SignalHandler"]


def install_stop_signals(spark: SparkSession, stop: threading.Event) -> Callable[[], None]:
    """Ctrl-C / SIGTERM set ``stop`` (a second one exits at once); returns a function restoring the old handlers.

    Under ``spark-submit`` the signals also reach the JVM that launched this Python driver,
    whose default reaction is to exit and stop the SparkContext under the running batch: it
    gets the same handler (a Py4J callback). Only the main thread can set Python handlers.
    """

    presses = 0

    def on_signal(from_python: bool = True) -> None:
        nonlocal presses
        # One Ctrl-C reaches both this process and the spark-submit JVM: only this process's
        # own signals count towards "a second one exits at once".
        presses += from_python
        if presses > 1:
            print("[sparkscore] second stop signal: exiting at once", file=sys.stderr, flush=True)
            os._exit(130)
        if not stop.is_set():
            print("[sparkscore] stopping after the current micro-batch (again to exit at once)", flush=True)
            stop.set()

    restores: list[Callable[[], object]] = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            old = signal.signal(sig, lambda *_: on_signal())
            restores.append(functools.partial(signal.signal, sig, old))
    if "PYSPARK_GATEWAY_PORT" in os.environ:
        # spark-submit started the JVM and then this process (not the other way round).
        from pyspark.java_gateway import ensure_callback_server_started

        sc = spark.sparkContext
        ensure_callback_server_started(sc._gateway)
        jvm = sc._jvm
        assert jvm is not None
        handler = _JvmSignalHandler(functools.partial(on_signal, False))
        for name in ("INT", "TERM"):
            jsig = jvm.sun.misc.Signal(name)
            old_handler = jvm.sun.misc.Signal.handle(jsig, handler)
            restores.append(functools.partial(jvm.sun.misc.Signal.handle, jsig, old_handler))

    def restore() -> None:
        for undo in reversed(restores):
            with contextlib.suppress(Exception):  # the JVM may be gone already
                undo()

    return restore


@dataclass
class StreamSummary:
    backend: str
    seconds: float
    totals: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    driver_batches: int = 0  # scoring batches the driver wrote itself (small ones)
    stats_windows: int = 0
    progress: list[dict[str, Any]] = field(default_factory=list)  # the scoring query's recent progress

    def render(self, cfg: StreamConfig) -> str:
        t, o = self.totals, cfg.output
        keys = (o.topic, o.dlq_topic) if o.kind == "kafka" else (PREDICTIONS, DEAD_LETTERS)
        preds, dlq, skipped = t.get(keys[0], 0), t.get(keys[1], 0), t.get("skipped", 0)
        lost = t.get("lost", 0)
        # The Delta sink counts a replayed batch among its rows (Delta skipped writing them again).
        events = preds + dlq + (skipped if o.kind == "kafka" else 0)
        stats = f"; {self.stats_windows} stats record(s) on {cfg.stats.topic!r}" if cfg.stats.enabled else ""
        return (
            f"[sparkscore] source {self.backend}: {self.batches} batch(es), {events:,} events -> "
            f"{preds:,} predictions on {o.target}, {dlq:,} on {o.dlq_target}"
            + (f", {skipped:,} already written before a restart" if skipped else "")
            + (f", {lost:,} offsets gone from the broker before they were read" if lost else "")
            + f"{stats}; {self.seconds:.1f} s"
            + (f"\n[sparkscore] {breakdown}" if (breakdown := batch_time_breakdown(self.progress)) else "")
        )


# Spark's names for the parts of a micro-batch (StreamingQueryProgress.durationMs), in running order.
BATCH_PARTS = (
    ("latestOffset", "finding the offsets"),
    ("walCommit", "offset log"),
    ("queryPlanning", "planning"),
    ("addBatch", "scoring and writing"),
    ("commitOffsets", "commit log"),
)


def batch_time_breakdown(progress: list[dict[str, Any]]) -> str | None:
    """Where a micro-batch's time goes: medians of Spark's ``durationMs`` over the batches that had input."""
    busy = [p["durationMs"] for p in progress if p.get("numInputRows", 0) > 0 and p.get("durationMs")]
    if not busy:
        return None
    median = {
        k: statistics.median(d.get(k, 0) for d in busy) for k in ("triggerExecution", *dict(BATCH_PARTS))
    }
    parts = ", ".join(f"{label} {median[k]:,.0f}" for k, label in BATCH_PARTS)
    return (
        f"a micro-batch takes {median['triggerExecution']:,.0f} ms (median of the last {len(busy)} "
        f"with input): {parts}"
    )


def run(
    spark: SparkSession,
    cfg: StreamConfig,
    model: ResolvedModel,
    *,
    available_now: bool = False,
    duration_s: float | None = None,
) -> StreamSummary:
    """Run the scoring (and statistics) queries; availableNow drains the input then returns.

    Stops between micro-batches on Ctrl-C / SIGTERM or after ``duration_s``; raises
    :class:`QueryFailed` (one sentence) when a query dies or the broker stays unreachable.
    """
    started = time.monotonic()
    check_spark_conf(spark)
    delta_in = cfg.input.kind == "delta"
    if cfg.uses_delta:
        from udfs import delta

        delta.check_session(spark)
    backend = DELTA if delta_in else backends.choose_backend(spark, cfg.kafka.source)
    from streaming.pipeline import check_event_schema

    if cfg.kafka_uses:
        # A wrong address or a stopped broker is the most common mistake: say so before Spark starts work.
        kafka_client.check_reachable(
            cfg.kafka.client_conf, timeout_s=min(15.0, cfg.kafka.poll_timeout_ms / 1000)
        )
    if delta_in:
        from streaming.delta_source import table_schema

        schema = table_schema(spark, cfg.input)
    else:
        schema = event_schema(cfg.events.schema)
    check_event_schema(schema, user_id=cfg.events.user_id, timestamp=cfg.events.timestamp, model=model)
    if available_now and not delta_in:
        check_input_topics(cfg)
    if cfg.output.create_topics and cfg.kafka_uses:
        ensure_output_topics(cfg)
    trigger = "availableNow" if available_now else cfg.job.trigger
    what = (
        f"the Delta table {cfg.input.table or cfg.input.path}"
        if delta_in
        else f"{source_options(cfg).get('subscribe', cfg.input.subscribe_pattern or cfg.input.assign)} "
        f"with the {backend} source"
    )
    print(f"[sparkscore] reading {what} ({trigger} trigger)", flush=True)
    stop = threading.Event()
    restore_signals = install_stop_signals(spark, stop)
    watch = BrokerWatch(cfg.kafka.client_conf, cfg.kafka.broker_timeout_ms / 1000)
    if cfg.kafka_uses:
        watch.start()
    halt = _Halt(stop, watch)
    scoring_gate, stats_gate = BatchGate(), BatchGate()
    sinks: list[EffectivelyOnceSink | DeltaSink] = []
    queries: list[tuple[StreamingQuery, BatchGate]] = []
    try:
        scoring, sink = start_scoring(spark, cfg, model, backend, trigger=trigger, gate=scoring_gate)
        queries.append((scoring, scoring_gate))
        sinks.append(sink)
        stats_sink = None
        if trigger == "availableNow":
            _await(scoring, halt)
            if cfg.stats.enabled and not halt.is_set():
                stats, stats_sink = start_stats(spark, cfg, backend, trigger=trigger, gate=stats_gate)
                queries.append((stats, stats_gate))
                sinks.append(stats_sink)
                _await(stats, halt)
        else:
            if cfg.stats.enabled:
                stats, stats_sink = start_stats(
                    spark, cfg, backend, trigger=cfg.stats.trigger, gate=stats_gate
                )
                queries.append((stats, stats_gate))
                sinks.append(stats_sink)
            deadline = None if duration_s is None else time.monotonic() + duration_s
            while not halt.is_set() and all(q.isActive for q, _ in queries):
                if deadline is not None and time.monotonic() > deadline:
                    break
                time.sleep(0.2)
    finally:
        if watch.lost is not None:
            # The running batch cannot finish: fail its Spark job and its driver-side waits now.
            for s in sinks:
                s.cancel.set()
            spark.sparkContext.cancelAllJobs()
            _stop_all_within(queries, timeout_s=STOP_AFTER_BROKER_LOST_S)
        else:
            for q, gate in queries:
                stop_between_batches(q, gate)
        watch.stop()
        for s in sinks:
            s.close()
        restore_signals()
    if watch.lost is not None:
        raise QueryFailed(watch.lost)
    for q, _ in queries:
        exc = q.exception()
        if exc is not None and stop.is_set() and killed_by_the_stop_signal(exc):
            print(
                f"[sparkscore] query {q.name}: the stop signal also reached a helper process Spark had "
                "forked to write its checkpoint; nothing is lost, and the next start resumes from the "
                "checkpoint without writing any record twice",
                flush=True,
            )
        elif exc is not None:
            raise QueryFailed(f"query {q.name} failed: {failure_reason(exc)}") from exc
    return StreamSummary(
        backend=backend,
        seconds=time.monotonic() - started,
        totals=sink.totals,
        batches=sink.batches,
        driver_batches=sink.local_batches,
        stats_windows=(stats_sink.totals.get(cfg.stats.topic, 0) if stats_sink else 0),
        progress=[json.loads(p.json) for p in scoring.recentProgress],
    )


class _Halt:
    """Whether the run should end early: a stop signal, or a lost broker."""

    def __init__(self, stop: threading.Event, watch: BrokerWatch) -> None:
        self.stop = stop
        self.watch = watch

    def is_set(self) -> bool:
        return self.stop.is_set() or self.watch.event.is_set()


# After the broker is lost, how long the job waits for its queries to stop (all of them together)
# before it exits anyway: the sinks' waits end at once (cancelled) and the batches' Spark jobs are
# cancelled, so this is the time a query thread takes to notice.
STOP_AFTER_BROKER_LOST_S = 10.0


def _stop_all_within(queries: list[tuple[StreamingQuery, BatchGate]], *, timeout_s: float) -> None:
    """Stop queries that cannot finish their batches, side by side; give up after ``timeout_s`` in all."""
    deadline = time.monotonic() + timeout_s

    def stop(query: StreamingQuery, gate: BatchGate) -> None:
        with contextlib.suppress(Exception):  # a query that died meanwhile, or a JVM going away
            if query.isActive:
                gate.wait_idle(max(0.0, deadline - time.monotonic()))
                query.stop()

    stoppers = [threading.Thread(target=stop, args=qg, daemon=True) for qg in queries]
    for t in stoppers:
        t.start()
    for t in stoppers:
        t.join(max(0.0, deadline - time.monotonic()))


def _await(query: StreamingQuery, halt: _Halt) -> None:
    from pyspark.errors import StreamingQueryException

    while query.isActive and not halt.is_set():
        try:
            query.awaitTermination(1)
        except StreamingQueryException:
            return  # it failed: run() reports query.exception()
