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
    # Required whenever the job reads or writes Kafka (checked by StreamConfig); a Delta -> Delta job
    # with its dead letters in Delta and [stats] off needs no [kafka] table.
    bootstrap_servers: str = ""
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
        if self.latest_offsets_by not in (LIST_OFFSETS, FETCH_PROBE):
            raise ValueError(f"latest_offsets_by must be {LIST_OFFSETS!r} or {FETCH_PROBE!r}")
        if self.poll_timeout_ms < 1:
            raise ValueError(f"poll_timeout_ms must be positive, got {self.poll_timeout_ms}")
        if self.broker_timeout_ms < 1:
            raise ValueError(f"broker_timeout_ms must be positive, got {self.broker_timeout_ms}")

    @property
    def client_conf(self) -> dict[str, str]:
        return {"bootstrap.servers": self.bootstrap_servers, **self.client}


SourceKind = Literal["kafka", "delta"]


def _one_table(where: str, path: str | None, table: str | None) -> None:
    """A Delta table is named by exactly one of ``path`` and ``table``."""
    given = [k for k, v in (("path", path), ("table", table)) if v]
    if len(given) != 1:
        raise ValueError(
            f'kind = "delta" needs exactly one of {where} path = "/data/table" (a Delta path) or '
            f'table = "db.name" (a catalog table); got {given or "neither"}'
        )


@dataclass(frozen=True)
class InputConfig:
    # "kafka": the topic below; "delta": the Delta table at ``path`` or the catalog ``table``,
    # read with spark.readStream.format("delta") (its columns are the event's fields).
    kind: SourceKind = "kafka"
    # Kafka: exactly one of topic (a comma list: subscribe), subscribe_pattern, assign (JSON).
    topic: str | None = None
    subscribe_pattern: str | None = None
    assign: str | None = None
    starting_offsets: str = "latest"  # earliest | latest | JSON {"events": {"0": 23}}
    max_offsets_per_trigger: int | None = None
    min_partitions: int | None = None
    fail_on_data_loss: bool = True
    # An --available-now run whose input topic does not exist fails (exit 2) unless this is true.
    allow_missing_topic: bool = False
    # Delta: the table, Delta's admission control and where a new query starts (a restart resumes
    # from its checkpoint). max_bytes_per_trigger is Delta's size string ("64m", "1g") or bytes.
    path: str | None = None
    table: str | None = None
    max_files_per_trigger: int | None = None
    max_bytes_per_trigger: str | int | None = None
    starting_version: int | Literal["latest"] | None = None
    # A "format" alias of kind, for configs written like the batch job's [input].
    format: SourceKind | None = None

    def __post_init__(self) -> None:
        if self.format is not None and self.format != self.kind:
            if self.kind != "kafka":
                raise ValueError(
                    f"kind = {self.kind!r} and format = {self.format!r} disagree; give one of them"
                )
            object.__setattr__(self, "kind", self.format)
        kafka_keys = [
            k
            for k in ("topic", "subscribe_pattern", "assign", "max_offsets_per_trigger", "min_partitions")
            if getattr(self, k) is not None
        ]
        delta_keys = [
            k
            for k in ("path", "table", "max_files_per_trigger", "max_bytes_per_trigger", "starting_version")
            if getattr(self, k) is not None
        ]
        if self.kind == "delta":
            if kafka_keys:
                raise ValueError(
                    f'{kafka_keys} are Kafka settings; kind = "delta" reads path or table instead'
                )
            _one_table("[input]", self.path, self.table)
            if self.max_files_per_trigger is not None and self.max_files_per_trigger < 1:
                raise ValueError(f"max_files_per_trigger must be >= 1, got {self.max_files_per_trigger}")
            if isinstance(self.starting_version, int) and self.starting_version < 0:
                raise ValueError(f"starting_version must be >= 0 or 'latest', got {self.starting_version}")
            return
        if delta_keys:
            raise ValueError(f'{delta_keys} are Delta settings: set kind = "delta" to read a Delta table')
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
    # "kafka": the predictions topic below (effectively once, streaming/sink.py); "delta": the Delta
    # table at ``path`` or the catalog ``table``, exactly once (streaming/delta_sink.py).
    kind: Literal["kafka", "delta"] = "kafka"
    path: str | None = None
    table: str | None = None
    partition_by: tuple[str, ...] = ()  # Delta: the table's partition columns (when this job creates it)
    # Delta output: dead letters go to dlq_topic on Kafka unless one of these names a Delta table.
    dlq_path: str | None = None
    dlq_table: str | None = None
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
        if self.kind == "delta":
            _one_table("[output]", self.path, self.table)
            if self.dlq_path and self.dlq_table:
                raise ValueError(
                    "give at most one of dlq_path and dlq_table (or neither: dead letters on dlq_topic)"
                )
            if (
                self.dlq_path
                and self.dlq_path == self.path
                or self.dlq_table
                and self.dlq_table == self.table
            ):
                raise ValueError("the dead-letter table must differ from the predictions table")
        else:
            delta_keys = [
                k for k in ("path", "table", "dlq_path", "dlq_table") if getattr(self, k) is not None
            ] + (["partition_by"] if self.partition_by else [])
            if delta_keys:
                raise ValueError(
                    f'{delta_keys} are Delta settings: set kind = "delta" to write a Delta table'
                )
        names = [self.topic, self.dlq_topic, self.commit_topic]
        if len(set(names)) != len(names):
            raise ValueError(f"topic, dlq_topic and commit_topic must differ, got {names}")
        if self.partitions < 1 or self.replication_factor < 1:
            raise ValueError("partitions and replication_factor must be >= 1")
        check_transaction_timeouts(self.producer)

    @property
    def delta_dlq(self) -> bool:
        """Whether dead letters go to a Delta table of their own."""
        return bool(self.dlq_path or self.dlq_table)

    @property
    def target(self) -> str:
        """Where predictions go, as the summary names it."""
        if self.kind == "delta":
            return f"Delta table {self.table or self.path!r}"
        return repr(self.topic)

    @property
    def dlq_target(self) -> str:
        """Where dead letters go, as the summary names it."""
        if self.delta_dlq:
            return f"Delta table {self.dlq_table or self.dlq_path!r}"
        return repr(self.dlq_topic)


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
    input: InputConfig
    kafka: KafkaConfig = KafkaConfig()
    events: EventsConfig = EventsConfig()
    output: OutputConfig = OutputConfig()
    stats: StatsConfig = StatsConfig()
    job: JobConfig = JobConfig()
    spark: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kafka_uses and not self.kafka.bootstrap_servers.strip():
            raise ValueError(
                f"[kafka] bootstrap_servers must name at least one broker, e.g. '127.0.0.1:9092' "
                f"(this job uses Kafka for {', '.join(self.kafka_uses)})"
            )

    @property
    def kafka_uses(self) -> list[str]:
        """What this job reads or writes on Kafka ([] for Delta -> Delta, dead letters in Delta, no stats)."""
        uses = []
        if self.input.kind == "kafka":
            uses.append("its input")
        if self.output.kind == "kafka":
            uses.append("its predictions")
        elif not self.output.delta_dlq:
            uses.append("its dead letters ([output] dlq_topic; or set dlq_path / dlq_table)")
        if self.stats.enabled:
            uses.append("[stats] (its topic; or set [stats] enabled = false)")
        return uses

    @property
    def uses_delta(self) -> bool:
        """Whether the job reads or writes Delta Lake (its session then needs Delta)."""
        return self.input.kind == "delta" or self.output.kind == "delta"
