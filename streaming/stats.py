"""Rolling statistics of the prediction stream: count, mean and max per event-time window.

A second query reads the predictions topic (so it counts exactly what was
emitted, once), parses the records (or, for a Delta output, reads the predictions table's new rows), and aggregates per tumbling window and
model version behind a watermark. In ``append`` mode each window is written
once, after the watermark passes its end; in ``update`` mode every change is
written (the stats topic is keyed by window and version, so the last record
per key is the current value).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, StringType, StructField, StructType, TimestampType

from streaming.sink import Record

STATS_COLUMNS = ("window_start", "window_end", "model_version", "count", "mean", "max")


def prediction_schema(column: str, timestamp: str = "timestamp") -> StructType:
    """The fields of a prediction record that the statistics need."""
    return StructType(
        [
            StructField(column, DoubleType()),
            StructField(timestamp, TimestampType()),
            StructField("model_version", StringType()),
        ]
    )


def window_stats(
    *,
    column: str = "prediction",
    window: str = "1 minute",
    watermark: str = "1 minute",
    timestamp: str = "timestamp",
) -> Callable[[DataFrame], DataFrame]:
    """Kafka rows of prediction records -> one row per (window, model_version): count, mean, max."""

    def transform(df: DataFrame) -> DataFrame:
        rec = F.from_json(
            F.col("value").cast("string"), prediction_schema(column, timestamp), {"timeZone": "UTC"}
        )
        preds = df.select(rec.alias("r")).select("r.*")
        return preds.transform(
            window_aggregates(column=column, window=window, watermark=watermark, timestamp=timestamp)
        )

    return transform


def window_aggregates(
    *,
    column: str = "prediction",
    window: str = "1 minute",
    watermark: str = "1 minute",
    timestamp: str = "timestamp",
) -> Callable[[DataFrame], DataFrame]:
    """Prediction rows (``column``, ``timestamp``, ``model_version``; a Delta output table's, say) ->
    one row per (window, model_version): count, mean, max."""

    def transform(df: DataFrame) -> DataFrame:
        preds = df.select(F.col(column).cast("double").alias(column), timestamp, "model_version").where(
            F.col(timestamp).isNotNull()
        )
        return (
            preds.withWatermark(timestamp, watermark)
            .groupBy(F.window(timestamp, window).alias("w"), "model_version")
            .agg(F.count(column).alias("count"), F.avg(column).alias("mean"), F.max(column).alias("max"))
            .select(
                F.col("w.start").alias("window_start"),
                F.col("w.end").alias("window_end"),
                "model_version",
                "count",
                "mean",
                "max",
            )
        )

    return transform


def collect_windows(batch: DataFrame) -> list[Any]:
    """A micro-batch of window rows, with the bounds as epoch microseconds (no local-time conversion)."""
    return batch.select(
        F.unix_micros("window_start").alias("start_us"),
        F.unix_micros("window_end").alias("end_us"),
        "model_version",
        "count",
        "mean",
        "max",
    ).collect()


def _iso(micros: int) -> str:
    return datetime.fromtimestamp(micros / 1e6, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def stats_records(rows: list[Any]) -> Iterator[Record]:
    """Window rows -> sink records keyed by ``<window start>|<model version>`` (the record id too)."""
    for row in rows:
        start = _iso(row["start_us"])
        key = f"{start}|{row['model_version']}"
        value = {
            "window_start": start,
            "window_end": _iso(row["end_us"]),
            "model_version": row["model_version"],
            "count": int(row["count"]),
            "mean": row["mean"],
            "max": row["max"],
        }
        yield 0, key.encode(), json.dumps(value).encode(), None, key, []
