"""The streaming job's config (``conf/stream.toml``): strict TOML -> frozen dataclasses."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from streaming.kafka_client import FETCH_PROBE, LIST_OFFSETS, check_transaction_timeouts
from udfs.spec import ModelSpec

Backend = Literal["auto", "kafka", "kafka_py"]
_DURATION = re.compile(r"^\s*\d+(\.\d+)?\s+(millisecond|second|minute|hour|day)s?\s*$", re.IGNORECASE)


def _check_duration(name: str, value: str) -> None:
    if not _DURATION.match(value):
        raise ValueError(f"{name} must be a duration like '30 seconds' or '1 minute', got {value!r}")


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str
    # "auto": the JVM connector when it is on the classpath, else kafka_py.
    source: Backend = "auto"
    # How kafka_py (and the sink) find log ends: "fetchProbe" for Tansu, "listOffsets" for Kafka.
    latest_offsets_by: Literal["listOffsets", "fetchProbe"] = "listOffsets"
    poll_timeout_ms: int = 120_000
    # How long the broker may stay unreachable while the job runs before it fails (one sentence
    # naming the broker) instead of waiting out every client's own timeouts.
    broker_timeout_ms: int = 30_000
    # Client settings for every consumer, producer and admin client (no "kafka." prefix),
    # e.g. "security.protocol" = "SASL_SSL".
    client: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.bootstrap_servers.strip():
            raise ValueError("bootstrap_servers must name at least one broker, e.g. '127.0.0.1:9092'")
        if self.latest_offsets_by not in (LIST_OFFSETS, FETCH_PROBE):
            raise ValueError(f"latest_offsets_by must be {LIST_OFFSETS!r} or {FETCH_PROBE!r}")
        if self.poll_timeout_ms < 1:
            raise ValueError(f"poll_timeout_ms must be positive, got {self.poll_timeout_ms}")
        if self.broker_timeout_ms < 1:
            raise ValueError(f"broker_timeout_ms must be positive, got {self.broker_timeout_ms}")

    @property
    def client_conf(self) -> dict[str, str]:
        return {"bootstrap.servers": self.bootstrap_servers, **self.client}


@dataclass(frozen=True)
class InputConfig:
    # Exactly one of topic (a comma list: subscribe), subscribe_pattern, assign (JSON).
    topic: str | None = None
    subscribe_pattern: str | None = None
    assign: str | None = None
    starting_offsets: str = "latest"  # earliest | latest | JSON {"events": {"0": 23}}
    max_offsets_per_trigger: int | None = None
    min_partitions: int | None = None
    fail_on_data_loss: bool = True
    # An --available-now run whose input topic does not exist fails (exit 2) unless this is true.
    allow_missing_topic: bool = False

    def __post_init__(self) -> None:
        given = [k for k in ("topic", "subscribe_pattern", "assign") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of topic, subscribe_pattern, assign; got {given or 'none'}")
        if self.max_offsets_per_trigger is not None and self.max_offsets_per_trigger < 1:
            raise ValueError(f"max_offsets_per_trigger must be >= 1, got {self.max_offsets_per_trigger}")


@dataclass(frozen=True)
class EventsConfig:
    format: Literal["json"] = "json"
    # Spark DDL of one event; the model's input_columns must be among these fields.
    schema: str = "user_id STRING, features ARRAY<DOUBLE>, timestamp TIMESTAMP"
    user_id: str = "user_id"  # the output key
    timestamp: str = "timestamp"  # event time (ISO-8601 string or epoch seconds)


@dataclass(frozen=True)
class OutputConfig:
    topic: str = "predictions"
    dlq_topic: str = "events.dlq"
    commit_topic: str = "sparkscore.commits"
    create_topics: bool = True  # create missing output topics at start
    partitions: int = 1  # for topics this job creates
    replication_factor: int = 1  # for every topic this job creates (output, dead-letter, stats, commit)
    # Topic-level configs for the output, dead-letter and stats topics this job creates,
    # e.g. {"retention.ms" = "604800000", "min.insync.replicas" = "2"}.
    topic_configs: dict[str, str] = field(default_factory=dict)
    # Added to (or overriding) the commit topic's own: cleanup.policy = compact, segment.ms = 1 hour.
    commit_topic_configs: dict[str, str] = field(default_factory=dict)
    producer: dict[str, str] = field(default_factory=dict)  # extra producer settings

    def __post_init__(self) -> None:
        names = [self.topic, self.dlq_topic, self.commit_topic]
        if len(set(names)) != len(names):
            raise ValueError(f"topic, dlq_topic and commit_topic must differ, got {names}")
        if self.partitions < 1 or self.replication_factor < 1:
            raise ValueError("partitions and replication_factor must be >= 1")
        check_transaction_timeouts(self.producer)


@dataclass(frozen=True)
class StatsConfig:
    enabled: bool = True
    topic: str = "prediction-stats"
    window: str = "1 minute"  # tumbling, on event time
    watermark: str = "1 minute"  # how late an event may be and still count
    column: str = "prediction"  # a numeric output column
    # append: one final record per window once the watermark passes it; update: a record per change.
    output_mode: Literal["append", "update"] = "append"
    checkpoint: str | None = None  # default: <job.checkpoint>/stats
    # Windows close once a minute or so: a batch every few seconds is plenty, and leaves the query
    # idle between batches, where a stop is clean. availableNow runs use availableNow here too.
    trigger: str = "10 seconds"

    def __post_init__(self) -> None:
        _check_duration("window", self.window)
        _check_duration("watermark", self.watermark)
        _check_duration("trigger", self.trigger)


@dataclass(frozen=True)
class JobConfig:
    checkpoint: str = "build/stream/checkpoint"
    # A processing-time interval ("0 seconds": as fast as possible) or "availableNow".
    trigger: str = "0 seconds"
    query_name: str = "sparkscore_stream"
    # Look at [model] path again (a registry alias: one lookup) at most this often, between
    # micro-batches; a new version applies from the next batch. 0: resolved once, at start.
    model_refresh_s: float = 0.0

    def __post_init__(self) -> None:
        if self.trigger != "availableNow":
            _check_duration("trigger", self.trigger)
        if self.model_refresh_s < 0:
            raise ValueError(f"model_refresh_s must be >= 0, got {self.model_refresh_s}")


@dataclass(frozen=True)
class StreamConfig:
    model: ModelSpec
    kafka: KafkaConfig
    input: InputConfig
    events: EventsConfig = EventsConfig()
    output: OutputConfig = OutputConfig()
    stats: StatsConfig = StatsConfig()
    job: JobConfig = JobConfig()
    spark: dict[str, str] = field(default_factory=dict)
