"""The stream job's predictions in a Delta table, exactly once: ``[output] kind = "delta"``.

Each micro-batch is scored by the same pipeline as for Kafka output (``streaming.pipeline``);
only the writing differs. Inside ``foreachBatch`` the scored batch is appended to the Delta table
with Delta's idempotent-write options: ``txnAppId`` = ``sparkscore.<query id>.predictions`` and
``txnVersion`` = the micro-batch id. Delta records the pair in the same commit as the rows, and
skips a write whose version is not above the one recorded for that app id. Spark re-runs a
micro-batch whose commit-log entry is missing (a crash after the Delta commit and before
Spark's own), and that replay is then skipped by Delta itself: every event's prediction is in
the table once.

The query id is Spark's, kept in the checkpoint (``<checkpoint>/metadata``): a restart on the
same checkpoint keeps it; a new checkpoint gets a new one, so its batch ids (from 0 again) are
never mistaken for batches already written.

Dead letters go to the Kafka dead-letter topic (through :class:`streaming.sink.EffectivelyOnceSink`,
so they are effectively once too), or with ``dlq_path`` / ``dlq_table`` to a Delta table of their
own with ``txnAppId`` = ``sparkscore.<query id>.dead_letters``.

Prediction table columns: the user id (``[events] user_id``), the core's prediction columns,
the event time, ``model_version``, the source position (``source_topic``, ``source_partition``,
``source_offset``, and ``source_id``: the record id the Kafka sink puts in its headers) and
``scored_at`` (the micro-batch's time). Dead-letter table columns: ``key`` and ``value`` (the
input message's bytes; a Delta source's row as JSON), ``error`` (why), the source position,
``headers`` (a Kafka source's message headers) and ``scored_at``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyspark.sql import Column
from pyspark.sql import functions as F

from streaming import faults
from streaming.pipeline import (
    DEST_DLQ,
    DEST_OUTPUT,
    HEADERS,
    prediction_columns,
    problem,
    record_id,
    to_records,
)
from streaming.plan import SinkError
from udfs import delta
from udfs.core import MODEL_VERSION
from udfs.errors import ConfigError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from streaming.config import OutputConfig
    from streaming.sink import EffectivelyOnceSink
    from udfs.spec import ResolvedModel

PREDICTIONS, DEAD_LETTERS = "predictions", "dead_letters"
PROVENANCE = ("source_topic", "source_partition", "source_offset", "source_id")
SCORED_AT = "scored_at"


def app_id(query_id: str, what: str) -> str:
    """Delta's ``txnAppId`` for one of this query's tables."""
    return f"sparkscore.{query_id}.{what}"


def with_dest(df: DataFrame) -> DataFrame:
    """Scored rows + ``dest`` (0: a prediction, 1: a dead letter), as the Kafka records have it."""
    return df.withColumn("dest", F.when(problem(df).isNull(), F.lit(DEST_OUTPUT)).otherwise(F.lit(DEST_DLQ)))


def _provenance(df: DataFrame) -> list[Column]:
    return [
        F.col("topic").alias("source_topic"),
        F.col("partition").alias("source_partition"),
        F.col("offset").alias("source_offset"),
        record_id(df).alias("source_id"),
    ]


def prediction_rows(
    model: ResolvedModel, *, user_id: str = "user_id", timestamp: str = "timestamp"
) -> Callable[[DataFrame], DataFrame]:
    """Scored rows -> the prediction table's rows (good rows only), columns as the Kafka record's body."""

    def transform(df: DataFrame) -> DataFrame:
        preds = [c for c in prediction_columns(model) if c != MODEL_VERSION]
        return df.where(problem(df).isNull()).select(
            user_id,
            *preds,
            timestamp,
            MODEL_VERSION,
            *_provenance(df),
            F.current_timestamp().alias(SCORED_AT),
        )

    return transform


def dead_letter_rows(df: DataFrame) -> DataFrame:
    """Scored rows -> the dead-letter table's rows: the input's bytes, why, where from."""
    headers = [F.col(HEADERS)] if HEADERS in df.columns else []
    return df.where(problem(df).isNotNull()).select(
        "key",
        "value",
        problem(df).alias("error"),
        *_provenance(df),
        *headers,
        F.current_timestamp().alias(SCORED_AT),
    )


@dataclass(frozen=True)
class DeltaTarget:
    """A Delta table by path or catalog name; appends are idempotent by (app id, version)."""

    path: str | None = None
    table: str | None = None
    partition_by: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return str(self.table or self.path)

    @property
    def sql(self) -> str:
        return delta.sql_name(self.table, self.path)

    def exists(self, spark: SparkSession) -> bool:
        if self.table is not None:
            return bool(spark.catalog.tableExists(self.table))
        assert self.path is not None
        return delta.is_delta_path(spark, self.path)

    def check(self, spark: SparkSession, columns: list[str], what: str) -> None:
        """One sentence when the table cannot take these rows (not Delta; partition columns absent)."""
        missing = [c for c in self.partition_by if c not in columns]
        if missing:
            raise ConfigError(f"[output] partition_by {missing} are not columns of the {what} ({columns})")
        if self.table is not None and self.exists(spark) and not delta.is_delta_table(spark, self.table):
            raise ConfigError(f"{self.table!r} is not a Delta table; name a Delta table or a new one")
        if self.version(spark) is not None:
            have = (
                spark.read.table(self.table)
                if self.table
                else spark.read.format("delta").load(str(self.path))
            )
            extra = [c for c in columns if c not in have.columns]
            if extra:
                raise ConfigError(
                    f"the {what} {self.name!r} has no columns {extra} that this job writes (it has "
                    f"{have.columns}); name a new table, or one an earlier run of this config created"
                )
        if self.path is not None and not self.exists(spark):
            from pathlib import Path

            local = Path(self.path.removeprefix("file:"))
            if "://" not in self.path and local.exists() and any(local.iterdir()):
                raise ConfigError(
                    f"{self.path!r} holds files but no Delta table (no _delta_log); name an empty or new "
                    "folder, or a Delta table"
                )

    def version(self, spark: SparkSession) -> int | None:
        """The table's newest version (None: no table yet)."""
        try:
            return delta.latest_version(spark, self.sql)
        except Exception:  # noqa: BLE001 - no table there (yet): Delta's and the catalog's errors differ
            return None

    def append(self, df: DataFrame, app: str, batch_id: int) -> None:
        """Append ``df`` unless this (app, batch) is already in the table (Delta's idempotent write)."""
        writer = (
            df.write.format("delta")
            .mode("append")
            .option("txnAppId", app)
            .option("txnVersion", str(batch_id))
        )
        if self.partition_by:
            writer = writer.partitionBy(*self.partition_by)
        if self.table is not None:
            writer.saveAsTable(self.table)
        else:
            writer.save(str(self.path))


class DeltaSink:
    """Driver side of the Delta output: one call per micro-batch (:meth:`write`), counts for the summary.

    Bind it to the query id after start (:meth:`bind`), as the Kafka sink. ``dlq`` is the
    Kafka sink for dead letters (None when they go to a Delta table).
    """

    def __init__(
        self,
        output: OutputConfig,
        model: ResolvedModel,
        *,
        user_id: str,
        timestamp: str,
        dlq: EffectivelyOnceSink | None = None,
    ) -> None:
        self.output = output
        self.model = model
        self.user_id = user_id
        self.timestamp = timestamp
        self.predictions = DeltaTarget(output.path, output.table, output.partition_by)
        self.dead_letters = DeltaTarget(output.dlq_path, output.dlq_table) if output.delta_dlq else None
        self.dlq = dlq
        self._query_id: str | None = None
        self._bound = threading.Event()
        self._first = True  # the first batch of this process may be a replay of a crashed run's
        self.cancel = threading.Event()
        self.totals: dict[str, int] = {}
        self.batches = 0
        self.local_batches = 0
        self.fault = faults.FaultPlan.from_env()

    def bind(self, query_id: str) -> None:
        self._query_id = str(query_id)
        if self.dlq is not None:
            self.dlq.bind(query_id)
        self._bound.set()

    @property
    def query_id(self) -> str:
        if not self._bound.wait(60):
            raise SinkError("the Delta sink was never bound to a query id; call bind(query.id) after start()")
        assert self._query_id is not None
        return self._query_id

    def check(self, spark: SparkSession, scored: DataFrame) -> None:
        """Before the query starts: the tables can take this job's rows."""
        rows = scored.transform(prediction_rows(self.model, user_id=self.user_id, timestamp=self.timestamp))
        self.predictions.check(spark, rows.columns, "prediction table")
        if self.dead_letters is not None:
            self.dead_letters.check(spark, dead_letter_rows(scored).columns, "dead-letter table")

    def create(self, spark: SparkSession, scored: DataFrame) -> None:
        """Create the prediction table (empty, with its columns and partitioning) when there is none yet,
        so that readers, the statistics query among them, can start before the first batch is written."""
        if self.predictions.version(spark) is not None:
            return
        rows = scored.transform(prediction_rows(self.model, user_id=self.user_id, timestamp=self.timestamp))
        writer = spark.createDataFrame([], rows.schema).write.format("delta").mode("append")
        if self.predictions.partition_by:
            writer = writer.partitionBy(*self.predictions.partition_by)
        if self.predictions.table is not None:
            writer.saveAsTable(self.predictions.table)
        else:
            writer.save(str(self.predictions.path))

    def write(self, scored: DataFrame, batch_id: int) -> tuple[int, int, int]:
        """Write one scored micro-batch; (predictions, dead letters, rows a replay found already written)."""
        spark = scored.sparkSession
        scored = scored.persist()
        try:
            # Scores the batch once, into the cache both writes read.
            row = scored.agg(
                F.count(F.when(F.col("dest") == DEST_OUTPUT, 1)).alias("preds"),
                F.count(F.when(F.col("dest") == DEST_DLQ, 1)).alias("dlq"),
            ).first()
            n_pred, n_dlq = (int(row["preds"]), int(row["dlq"])) if row is not None else (0, 0)
            skipped = 0
            faults.point(self.fault, "delta.before_write", batch=batch_id)
            if n_pred:
                skipped += self._append(
                    spark,
                    self.predictions,
                    scored.transform(
                        prediction_rows(self.model, user_id=self.user_id, timestamp=self.timestamp)
                    ),
                    PREDICTIONS,
                    batch_id,
                    n_pred,
                )
            if self.dead_letters is not None:
                if n_dlq:
                    skipped += self._append(
                        spark, self.dead_letters, dead_letter_rows(scored), DEAD_LETTERS, batch_id, n_dlq
                    )
            else:
                skipped += self._write_kafka_dlq(scored, batch_id)
            faults.point(self.fault, "delta.after_write", batch=batch_id)
        finally:
            scored.unpersist()
        self._first = False
        self.batches += 1
        for key, n in ((PREDICTIONS, n_pred), (DEAD_LETTERS, n_dlq)):
            self.totals[key] = self.totals.get(key, 0) + n
        self.totals["skipped"] = self.totals.get("skipped", 0) + skipped
        return n_pred, n_dlq, skipped

    def _append(
        self, spark: SparkSession, target: DeltaTarget, rows: DataFrame, what: str, batch_id: int, n: int
    ) -> int:
        """Append; on a process's first batch, tell whether Delta skipped it (already written)."""
        before = target.version(spark) if self._first else None
        target.append(rows, app_id(self.query_id, what), batch_id)
        if before is not None and target.version(spark) == before:
            print(
                f"[sparkscore] batch {batch_id}: its {n:,} {what.replace('_', ' ')} were written to "
                f"{target.name!r} before a restart; Delta skipped them (txnVersion {batch_id})",
                flush=True,
            )
            return n
        return 0

    def _write_kafka_dlq(self, scored: DataFrame, batch_id: int) -> int:
        """Dead letters to the Kafka topic through the effectively-once sink (a marker every batch)."""
        assert self.dlq is not None
        from streaming.dead_letters import record_rows

        plan = self.dlq.begin(batch_id)
        if plan is None:
            return 0  # its marker says it was written before a restart
        bad = scored.where(F.col("dest") == DEST_DLQ).transform(
            to_records(self.model, user_id=self.user_id, timestamp=self.timestamp)
        )
        table = bad.toArrow()
        # The sink's only topic is the dead-letter topic: index 0.
        records = ((0, *r[1:]) for b in table.to_batches() for r in record_rows(b))
        result = self.dlq.write_local(plan, records)
        self.dlq.commit(plan, result)
        return result.skipped

    def close(self) -> None:
        if self.dlq is not None:
            self.dlq.close()
