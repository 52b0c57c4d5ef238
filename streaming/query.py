"""Query wiring: the scoring query (events -> predictions + DLQ) and the statistics query.

The scoring query reads the input topic with the chosen backend, parses,
scores with the core and writes through :class:`streaming.sink.ExactlyOnceSink`
in ``foreachBatch``: executors produce their partitions' records, the driver
commits a marker per batch. The statistics query reads the predictions topic
and writes window aggregates through a second sink (driver-side, they are few).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streaming import backends, kafka_client
from streaming.config import StreamConfig
from streaming.pipeline import count_metrics, event_schema, parse_events, score_events, to_records
from streaming.sink import SUMMARY_SCHEMA, BatchResult, ExactlyOnceSink, record_rows, write_partition
from streaming.stats import collect_windows, stats_records, window_stats

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
    path = checkpoint.removeprefix("file:")
    if batch_id < 1 or "://" in path:
        return None
    try:
        prev, cur = (_offset_entry(Path(path) / "offsets" / str(b)) for b in (batch_id - 1, batch_id))
        return sum(
            int(off) - int(prev[topic][part]) for topic, parts in cur.items() for part, off in parts.items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _offset_entry(path: Path) -> dict[str, dict[str, int]]:
    # An offset log file: "v1", the batch metadata, then one line per source.
    lines = path.read_text().splitlines()
    entry = json.loads(lines[2]) if len(lines) > 2 else None
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: not a Kafka offset entry")
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
        opts["subscribe"] = topic
        opts["startingOffsets"] = starting or "earliest"
        return opts
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


def _sink(cfg: StreamConfig, topics: tuple[str, ...], name: str) -> ExactlyOnceSink:
    return ExactlyOnceSink(
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


def stop_between_batches(query: StreamingQuery, gate: BatchGate, *, timeout_s: float = 60.0) -> None:
    """Stop ``query`` once its current batch (if any) has finished; after ``timeout_s``, stop anyway."""
    if query.isActive:
        gate.wait_idle(timeout_s)
        query.stop()


def ensure_output_topics(cfg: StreamConfig) -> None:
    topics = {cfg.output.topic: cfg.output.partitions, cfg.output.dlq_topic: cfg.output.partitions}
    topics[cfg.output.commit_topic] = 1
    if cfg.stats.enabled:
        topics[cfg.stats.topic] = 1
    kafka_client.ensure_topics(cfg.kafka.client_conf, topics, timeout_s=cfg.kafka.poll_timeout_ms / 1000)


def scoring_frame(spark: SparkSession, cfg: StreamConfig, model: ResolvedModel, backend: str) -> DataFrame:
    """The streaming frame of output records, counts observed into the progress."""
    ev = cfg.events
    return (
        backends.read_kafka(spark, backend, source_options(cfg))
        .transform(parse_events(ev.schema, user_id=ev.user_id, timestamp=ev.timestamp))
        .transform(score_events(model, user_id=ev.user_id, timestamp=ev.timestamp))
        .transform(to_records(model, user_id=ev.user_id, timestamp=ev.timestamp))
        .transform(count_metrics)
    )


def start_scoring(
    spark: SparkSession,
    cfg: StreamConfig,
    model: ResolvedModel,
    backend: str,
    *,
    trigger: str | None = None,
    gate: BatchGate | None = None,
) -> tuple[StreamingQuery, ExactlyOnceSink]:
    records = scoring_frame(spark, cfg, model, backend)
    sink = _sink(cfg, (cfg.output.topic, cfg.output.dlq_topic), "scoring")
    checkpoint = f"{cfg.job.checkpoint.rstrip('/')}/scoring"

    gate = gate or BatchGate()

    def run_batch(batch: DataFrame, batch_id: int) -> None:
        with gate:
            score_and_write(batch, batch_id)

    def score_and_write(batch: DataFrame, batch_id: int) -> None:
        started = time.monotonic()
        plan = sink.begin(batch_id)
        if plan is None:
            print(f"[sparkscore] batch {batch_id}: already committed before a restart, skipped", flush=True)
            return
        size = batch_size(checkpoint, batch_id)
        if size is not None and size <= DRIVER_WRITE_MAX_EVENTS:
            # Same records, same headers, same markers as the executors' path; no extra Python stage.
            table = batch.toArrow()
            result = sink.write_local(plan, (r for b in table.to_batches() for r in record_rows(b)))
        else:
            result = BatchResult.from_rows(batch.mapInArrow(write_partition(plan), SUMMARY_SCHEMA).collect())
        sink.commit(plan, result)
        preds = result.counts.get(cfg.output.topic, 0)
        dlq = result.counts.get(cfg.output.dlq_topic, 0)
        skipped = f", {result.skipped:,} already written" if result.skipped else ""
        print(
            f"[sparkscore] batch {batch_id}: {preds + dlq + result.skipped:,} events -> {preds:,} predictions, "
            f"{dlq:,} dead-lettered{skipped} ({time.monotonic() - started:.2f} s)",
            flush=True,
        )

    writer = (
        records.writeStream.queryName(cfg.job.query_name)
        .option("checkpointLocation", checkpoint)
        .foreachBatch(run_batch)
    )
    query = _trigger(writer, trigger or cfg.job.trigger).start()
    sink.bind(query.id)
    return query, sink


def start_stats(
    spark: SparkSession,
    cfg: StreamConfig,
    backend: str,
    *,
    trigger: str | None = None,
    gate: BatchGate | None = None,
) -> tuple[StreamingQuery, ExactlyOnceSink]:
    st = cfg.stats
    windows = backends.read_kafka(spark, backend, source_options(cfg, topic=cfg.output.topic)).transform(
        window_stats(
            column=st.column, window=st.window, watermark=st.watermark, timestamp=cfg.events.timestamp
        )
    )
    sink = _sink(cfg, (st.topic,), "stats")

    gate = gate or BatchGate()

    def run_batch(batch: DataFrame, batch_id: int) -> None:
        with gate:
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

    writer = (
        windows.writeStream.queryName(f"{cfg.job.query_name}_stats")
        .outputMode(st.output_mode)
        .option("checkpointLocation", st.checkpoint or f"{cfg.job.checkpoint.rstrip('/')}/stats")
        .foreachBatch(run_batch)
    )
    query = _trigger(writer, trigger or cfg.job.trigger).start()
    sink.bind(query.id)
    return query, sink


class QueryFailed(RuntimeError):
    """A streaming query stopped with an error (its first line is in the message)."""


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
        t = self.totals
        preds, dlq, skipped = t.get(cfg.output.topic, 0), t.get(cfg.output.dlq_topic, 0), t.get("skipped", 0)
        return (
            f"[sparkscore] source {self.backend}: {self.batches} batch(es), {preds + dlq + skipped:,} events -> "
            f"{preds:,} predictions on {cfg.output.topic!r}, {dlq:,} on {cfg.output.dlq_topic!r}"
            + (f", {skipped:,} already written before a restart" if skipped else "")
            + f"; {self.stats_windows} stats record(s) on {cfg.stats.topic!r}; {self.seconds:.1f} s"
        )


def run(
    spark: SparkSession,
    cfg: StreamConfig,
    model: ResolvedModel,
    *,
    available_now: bool = False,
    duration_s: float | None = None,
) -> StreamSummary:
    """Run the scoring (and statistics) queries; availableNow drains the input then returns."""
    started = time.monotonic()
    backend = backends.choose_backend(spark, cfg.kafka.source)
    from streaming.pipeline import check_event_schema

    # A wrong address or a stopped broker is the most common mistake: say so before Spark starts work.
    kafka_client.check_reachable(cfg.kafka.client_conf, timeout_s=min(15.0, cfg.kafka.poll_timeout_ms / 1000))
    check_event_schema(
        event_schema(cfg.events.schema),
        user_id=cfg.events.user_id,
        timestamp=cfg.events.timestamp,
        model=model,
    )
    if cfg.output.create_topics:
        ensure_output_topics(cfg)
    trigger = "availableNow" if available_now else cfg.job.trigger
    print(
        f"[sparkscore] reading {source_options(cfg).get('subscribe', cfg.input.subscribe_pattern or cfg.input.assign)} "
        f"with the {backend} source ({trigger} trigger)",
        flush=True,
    )
    scoring_gate, stats_gate = BatchGate(), BatchGate()
    scoring, sink = start_scoring(spark, cfg, model, backend, trigger=trigger, gate=scoring_gate)
    queries = [(scoring, scoring_gate)]
    stats_sink = None
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    try:
        if trigger == "availableNow":
            _await(scoring, stop, None)
            if cfg.stats.enabled and not stop.is_set():
                stats, stats_sink = start_stats(spark, cfg, backend, trigger=trigger, gate=stats_gate)
                queries.append((stats, stats_gate))
                _await(stats, stop, None)
        else:
            if cfg.stats.enabled:
                stats, stats_sink = start_stats(
                    spark, cfg, backend, trigger=cfg.stats.trigger, gate=stats_gate
                )
                queries.append((stats, stats_gate))
            deadline = None if duration_s is None else time.monotonic() + duration_s
            while not stop.is_set() and all(q.isActive for q, _ in queries):
                if deadline is not None and time.monotonic() > deadline:
                    break
                time.sleep(0.2)
    finally:
        for q, gate in queries:
            stop_between_batches(q, gate)
        sink.close()
        if stats_sink is not None:
            stats_sink.close()
    for q, _ in queries:
        exc = q.exception()
        if exc is not None:
            raise QueryFailed(f"query {q.name} failed: {str(exc).strip().splitlines()[0]}") from exc
    return StreamSummary(
        backend=backend,
        seconds=time.monotonic() - started,
        totals=sink.totals,
        batches=sink.batches,
        driver_batches=sink.local_batches,
        stats_windows=(stats_sink.totals.get(cfg.stats.topic, 0) if stats_sink else 0),
        progress=[json.loads(p.json) for p in scoring.recentProgress],
    )


def _await(query: StreamingQuery, stop: threading.Event, timeout_s: float | None) -> None:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while query.isActive and not stop.is_set():
        if deadline is not None and time.monotonic() > deadline:
            return
        query.awaitTermination(1)
