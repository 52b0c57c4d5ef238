"""Incremental scoring: only the rows a Delta table gained since the last successful run.

``[input] incremental = true`` (or ``--incremental``) reads the input as a Delta stream with
``trigger(availableNow=True)`` and a checkpoint of its own (``[input] checkpoint``): Spark's Delta
source records which table versions it has read, so the next run starts where the last one
committed, scores what is new and stops. Each micro-batch is appended (or merged by ``merge_on``)
to the output; a Delta append carries ``txnAppId`` / ``txnVersion`` (the checkpoint's id and the
batch id), so a batch rerun after a crash between Delta's commit and the checkpoint's is skipped
by Delta instead of written twice.

The checkpoint folder also holds ``_sparkscore_input`` (the input's name and Delta table id): a
checkpoint that belongs to another table is refused in one sentence before anything is read.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from udfs.errors import ConfigError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from udfs.batch import BatchConfig, Written

MARKER = "_sparkscore_input"


def _source_name(cfg: BatchConfig) -> str:
    from udfs import delta

    return delta.sql_name(cfg.input.table, cfg.input.path)


def app_id(checkpoint: str) -> str:
    """The Delta transaction app id of this checkpoint's writes (a new checkpoint, a new id)."""
    return "sparkscore-" + hashlib.sha256(checkpoint.rstrip("/").encode()).hexdigest()[:16]


def check_checkpoint(spark: SparkSession, cfg: BatchConfig) -> None:
    """Refuse a checkpoint that another table's incremental runs wrote; claim a new one."""
    from udfs import delta

    checkpoint = str(cfg.input.checkpoint)
    name = _source_name(cfg)
    this = {"input": cfg.input.table or cfg.input.path, "table_id": delta.table_id(spark, name)}
    marker = f"{checkpoint.rstrip('/')}/{MARKER}"
    try:
        row = spark.read.schema("input string, table_id string").json(marker).first()
    except Exception:  # noqa: BLE001 - no marker yet: a new checkpoint
        row = None
    if row is None:
        spark.createDataFrame([this]).coalesce(1).write.mode("overwrite").json(marker)
        return
    if row["table_id"] != this["table_id"]:
        raise ConfigError(
            f"incremental checkpoint {checkpoint!r} belongs to input {row['input']!r} (Delta table id "
            f"{row['table_id']}), not to {this['input']!r} (id {this['table_id']}); give each input a "
            "checkpoint of its own"
        )


def read_new_rows(spark: SparkSession, cfg: BatchConfig) -> DataFrame:
    """The input as a Delta stream (what the checkpoint has not seen), filtered by ``where``."""
    reader = spark.readStream.format("delta")
    df = reader.table(cfg.input.table) if cfg.input.table else reader.load(str(cfg.input.path))
    return df.where(cfg.input.where) if cfg.input.where else df


def score_new_rows(scored: DataFrame, cfg: BatchConfig, *, columns: list[str]) -> tuple[Written, int]:
    """Run the stream of scored new rows to the output until it has caught up; (what was written,
    how many micro-batches)."""
    from pyspark.sql import Observation
    from pyspark.sql import functions as F

    from udfs.batch import Written, write_output
    from udfs.core import ERROR

    out = cfg.output
    checkpoint = str(cfg.input.checkpoint).rstrip("/")
    txn = app_id(checkpoint)
    counts = {"rows": 0, "bad": 0, "batches": 0}

    def write_batch(batch: DataFrame, batch_id: int) -> None:
        seen = Observation(f"sparkscore_incremental_{batch_id}")
        rows = batch.select(*columns).observe(
            seen, F.count(F.lit(1)).alias("rows"), F.count(ERROR).alias("bad")
        )
        options: dict[str, Any] = dict(out.options)
        if out.delta and out.mode != "merge":
            options |= {"txnAppId": txn, "txnVersion": str(batch_id)}
        write_output(rows, replace(out, options=options))
        got = seen.get
        counts["rows"] += int(got.get("rows", 0))
        counts["bad"] += int(got.get("bad", 0))
        counts["batches"] += 1

    started = time.monotonic()
    query = (
        scored.writeStream.foreachBatch(write_batch)
        .option("checkpointLocation", f"{checkpoint}/stream")
        .trigger(availableNow=True)
        .queryName(f"sparkscore_incremental_{txn}")
        .start()
    )
    query.awaitTermination()
    written = Written(counts["rows"], counts["rows"], counts["bad"], time.monotonic() - started)
    return written, counts["batches"]
