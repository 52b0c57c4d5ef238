"""A Delta table as the stream job's source: ``[input] kind = "delta"`` with ``path`` or ``table``.

The table is read with ``spark.readStream.format("delta")`` (``maxFilesPerTrigger``,
``maxBytesPerTrigger`` and ``startingVersion`` passed through); its checkpoint remembers the
table version each micro-batch ended at, so a restart scores only the rows appended since.
Its columns are the event's fields: the model reads them by name, as the batch job reads its
columns (``udfs.spark.with_predictions``, with a typed model's inputs by name). Each micro-batch
is turned into the layout the Kafka parser produces (:func:`as_events`), so scoring and both
sinks are the same code as for Kafka events.

A row's record id is ``<table>/<data file>/<row id in the micro-batch's scan>``: Delta replays a
micro-batch over the same files after a crash, so the id is the same on a replay (the Kafka
sink's recovery scan relies on it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pyspark.sql import functions as F

from streaming.pipeline import HEADERS, JSON_OPTIONS, PARSE_ERROR, RID, SOURCE_COLUMNS
from udfs import delta
from udfs.errors import ConfigError, InputPathError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import StructType

    from streaming.config import InputConfig

RESERVED = (*SOURCE_COLUMNS, HEADERS, RID, PARSE_ERROR)


def name_of(i: InputConfig) -> str:
    """The table as records and messages name it: the catalog name, or the path."""
    return str(i.table or i.path)


def reader_options(i: InputConfig) -> dict[str, str]:
    opts: dict[str, str] = {}
    if i.max_files_per_trigger is not None:
        opts["maxFilesPerTrigger"] = str(i.max_files_per_trigger)
    if i.max_bytes_per_trigger is not None:
        opts["maxBytesPerTrigger"] = str(i.max_bytes_per_trigger)
    if i.starting_version is not None:
        opts["startingVersion"] = str(i.starting_version)
    return opts


def table_schema(spark: SparkSession, i: InputConfig) -> StructType:
    """The source table's schema; one sentence when it is not a Delta table."""
    try:
        if i.table:
            df = spark.read.table(i.table)
            if not delta.is_delta_table(spark, i.table):
                raise InputPathError(
                    f'[input] table = {i.table!r} is not a Delta table; kind = "delta" reads Delta tables only'
                )
        else:
            assert i.path is not None
            if not delta.is_delta_path(spark, i.path):
                raise InputPathError(
                    f"[input] path = {i.path!r} holds no Delta table (no _delta_log there); check the path, "
                    "or create the table before starting the stream job"
                )
            df = spark.read.format("delta").load(i.path)
    except InputPathError:
        raise
    except Exception as exc:  # a missing catalog table, mostly
        if "TABLE_OR_VIEW_NOT_FOUND" in delta.condition(exc) or "not found" in str(exc).lower():
            raise InputPathError(
                f"[input] table = {i.table!r} does not exist; check the name or create the table first"
            ) from None
        raise
    clash = [c for c in df.columns if c in RESERVED]
    if clash:
        raise ConfigError(
            f"the source table's columns {clash} clash with the stream job's own columns {list(RESERVED)}; "
            "read a view of the table that renames them"
        )
    return df.schema


def read_delta(spark: SparkSession, i: InputConfig) -> DataFrame:
    """The streaming frame of the source table's rows."""
    reader = spark.readStream.format("delta").options(**reader_options(i))
    return reader.table(i.table) if i.table else reader.load(str(i.path))


def as_events(
    name: str, *, user_id: str = "user_id", timestamp: str = "timestamp"
) -> Callable[[DataFrame], DataFrame]:
    """A micro-batch of table rows -> the layout :func:`streaming.pipeline.parse_events` produces.

    ``key`` is the user id, ``value`` the row as JSON (what a dead letter carries), ``topic`` the
    table, ``partition`` / ``offset`` null, ``rid`` the row's id; a row without a user id or event
    time is a dead letter, as a Kafka event without them is. Runs on the static frame of one
    micro-batch (``foreachBatch``): the row id needs the file scan under it.
    """

    def transform(df: DataFrame) -> DataFrame:
        cols = df.columns
        data_file = F.regexp_extract(F.input_file_name(), r"[^/]*$", 0)
        error = F.when(F.col(user_id).isNull(), F.lit(f"missing {user_id}")).when(
            F.col(timestamp).isNull(), F.lit(f"missing or unreadable {timestamp}")
        )
        return df.select(
            F.col(user_id).cast("string").cast("binary").alias("key"),
            F.to_json(F.struct(*[F.col(f"`{c}`") for c in cols]), JSON_OPTIONS).cast("binary").alias("value"),
            F.lit(name).alias("topic"),
            F.lit(None).cast("int").alias("partition"),
            F.lit(None).cast("long").alias("offset"),
            F.concat_ws("/", F.lit(name), data_file, F.monotonically_increasing_id().cast("string")).alias(
                RID
            ),
            *[F.col(f"`{c}`") for c in cols],
            error.alias(PARSE_ERROR),
        )

    return transform
