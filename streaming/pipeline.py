"""The streaming pipeline as pure ``DataFrame -> DataFrame`` transforms.

Kafka rows --:func:`parse_events`--> event fields + ``parse_error``
--:func:`score_events`--> + the scoring core's columns (``udfs.spark.with_predictions``)
--:func:`to_records`--> one output record per event: a prediction for the
output topic, or the original bytes for the dead-letter topic, with the
reason and the source position.

Every transform works on streaming and static frames alike, so tests can
check them on tiny inline data.
"""

from __future__ import annotations

from collections.abc import Callable

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import DataType, StructType, TimestampType

from udfs.core import ERROR, MODEL_VERSION, output_schema
from udfs.errors import ConfigError
from udfs.spark import with_predictions
from udfs.spec import ResolvedModel

PARSE_ERROR = "parse_error"
SOURCE_COLUMNS = ("key", "value", "topic", "partition", "offset")
# The input message's headers (a source read with includeHeaders=true): kept for dead letters.
HEADERS = "headers"
# A record id given by the source itself (a Delta source: table/file/row); else topic/partition/offset.
RID = "rid"
_CORRUPT = "_sparkscore_corrupt"
# Event time goes out as ISO-8601 in UTC with microseconds, whatever the session time zone.
JSON_OPTIONS = {"timestampFormat": "yyyy-MM-dd'T'HH:mm:ss.SSSSSSXXX", "timeZone": "UTC"}

DEST_OUTPUT, DEST_DLQ = 0, 1
# The last year a string timestamp can name (Spark's own range); anything later is a unit mistake.
MAX_EVENT_YEAR = 9999


def event_schema(ddl: str) -> StructType:
    """The event schema from a Spark DDL string (needs an active session)."""
    try:
        schema = DataType.fromDDL(ddl)
    except Exception as exc:  # noqa: BLE001 - Spark's parse errors come in several types
        raise ConfigError(
            f"[events] schema {ddl!r} is not valid Spark DDL: {str(exc).splitlines()[0]}"
        ) from None
    if not isinstance(schema, StructType):
        raise ConfigError(f"[events] schema must list fields like 'user_id STRING, ...', got {ddl!r}")
    return schema


def check_event_schema(schema: StructType, *, user_id: str, timestamp: str, model: ResolvedModel) -> None:
    """Fail before the query starts when the event schema cannot feed the key, event time or model."""
    names = schema.fieldNames()
    for what, name in (("user_id", user_id), ("timestamp", timestamp)):
        if name not in names:
            raise ConfigError(
                f"[events] {what} = {name!r} is not a field of the event schema; it has {names}"
            )
    if not isinstance(schema[timestamp].dataType, TimestampType):
        raise ConfigError(
            f"[events] field {timestamp!r} must be TIMESTAMP for event-time windows, got {schema[timestamp].dataType.simpleString()}"
        )
    missing = [c for c in model.spec.columns if c not in names and c not in by_input_name(model, names)]
    if missing:
        raise ConfigError(f"model input columns {missing} are not fields of the event schema; it has {names}")
    clash = [c for c in output_schema(model).names if c in names]
    if clash:
        raise ConfigError(
            f"event fields {clash} clash with the prediction columns; rename them in [events] schema"
        )


def by_input_name(model: ResolvedModel, names: list[str]) -> dict[str, Column]:
    """A typed model's data columns read from event fields named after its inputs.

    An event may carry each input by name (``{"dense": [13 numbers], "sparse": [8 ids]}``) instead of
    its columns: an input of several columns then takes them from the array's positions (a shorter
    array leaves the rest null: the row's reason names the input and column), an input of one column
    takes the field as it is. Fields named like the columns themselves win."""
    sig = model.spec.signature
    if sig is None:
        return {}
    out: dict[str, Column] = {}
    for spec in sig.fed:
        if spec.name not in names or all(c in names for c in spec.source_columns):
            continue
        if spec.column is not None:
            out[spec.column] = F.col(spec.name)
        else:
            for j, c in enumerate(spec.columns):
                out[c] = F.get(F.col(spec.name), j)
    return out


def parse_events(
    ddl: str, *, user_id: str = "user_id", timestamp: str = "timestamp"
) -> Callable[[DataFrame], DataFrame]:
    """Kafka rows -> the source position, the original key/value, the event's fields and ``parse_error``.

    ``parse_error`` is null for a usable event; otherwise it says why the message
    cannot be scored (empty value, not JSON of the schema, no user id, no event time).
    """

    def transform(df: DataFrame) -> DataFrame:
        schema = event_schema(ddl)
        with_corrupt = StructType([*schema.fields]).add(_CORRUPT, "string")
        parsed = F.from_json(
            F.col("value").cast("string"),
            with_corrupt,
            # No timestampFormat: reading accepts ISO-8601 (T or space, optional fraction and zone;
            # no zone = UTC; a date alone = midnight) and a JSON integer of epoch seconds.
            {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": _CORRUPT, "timeZone": "UTC"},
        )
        source = _source_columns(df)
        out = df.select(*source, parsed.alias("_event"))
        event = F.col("_event")
        error = (
            F.when(F.col("value").isNull() | (F.length("value") == 0), F.lit("empty message value"))
            .when(
                event.isNull() | event[_CORRUPT].isNotNull(),
                F.lit(f"value is not JSON matching the event schema ({ddl})"),
            )
            .when(event[user_id].isNull(), F.lit(f"missing {user_id}"))
            .when(event[timestamp].isNull(), F.lit(f"missing or unreadable {timestamp}"))
            # A JSON number is read as epoch SECONDS: epoch milliseconds land tens of thousands of
            # years ahead instead of failing, and would hold every event-time window open forever.
            .when(
                F.year(event[timestamp]) > MAX_EVENT_YEAR,
                F.lit(
                    f"{timestamp} is after the year {MAX_EVENT_YEAR}: epoch numbers must be seconds, not milliseconds"
                ),
            )
        )
        fields = [event[f.name].alias(f.name) for f in schema.fields]
        return out.select(*source, *fields, error.alias(PARSE_ERROR))

    return transform


def _source_columns(df: DataFrame) -> list[str]:
    return [*SOURCE_COLUMNS, *(c for c in (HEADERS, RID) if c in df.columns)]


def record_id(df: DataFrame) -> Column:
    """Which source record a row stands for: the source's own id, else ``topic/partition/offset``."""
    return F.col(RID) if RID in df.columns else F.concat_ws("/", "topic", "partition", "offset")


def score_events(
    model: ResolvedModel, *, user_id: str = "user_id", timestamp: str = "timestamp"
) -> Callable[[DataFrame], DataFrame]:
    """Append the scoring core's columns; unparsed events come out with the core's error for null features."""

    def transform(df: DataFrame) -> DataFrame:
        keep = list(dict.fromkeys([*_source_columns(df), user_id, timestamp, PARSE_ERROR]))
        # with_predictions builds its Arrow schema without a time zone, which fails on a
        # TIMESTAMP column: event time crosses the scorer as epoch microseconds instead.
        as_micros = df.withColumn(timestamp, F.unix_micros(timestamp))
        named = by_input_name(model, df.columns)
        if named:
            as_micros = as_micros.withColumns(named)
        scored = as_micros.transform(with_predictions(model, keep=keep))
        return scored.withColumn(timestamp, F.timestamp_micros(timestamp))

    return transform


def prediction_columns(model: ResolvedModel) -> list[str]:
    """The core's output columns that go into a prediction record (all but ``error``)."""
    return [c for c in output_schema(model).names if c != ERROR]


def problem(df: DataFrame) -> Column:
    """Why a row goes to the dead-letter topic: the parse error first, else the core's error."""
    return F.coalesce(F.col(PARSE_ERROR), F.col(ERROR)) if PARSE_ERROR in df.columns else F.col(ERROR)


def to_records(
    model: ResolvedModel, *, user_id: str = "user_id", timestamp: str = "timestamp"
) -> Callable[[DataFrame], DataFrame]:
    """Scored rows -> the sink's record layout (``streaming.sink.RECORD_COLUMNS``).

    Good rows: key ``user_id``, value JSON ``{user_id, <prediction columns>, timestamp}``
    (``model_version`` last), dest 0. Bad rows: the original key and bytes, dest 1,
    the reason in ``error`` and, when the source read them, the input's ``headers``.
    Every row: ``rid`` = source ``topic/partition/offset``.
    """

    def transform(df: DataFrame) -> DataFrame:
        preds = [c for c in prediction_columns(model) if c != MODEL_VERSION]
        body = F.to_json(F.struct(user_id, *preds, timestamp, MODEL_VERSION), JSON_OPTIONS)
        why = problem(df)
        ok = why.isNull()
        headers = [F.when(~ok, F.col(HEADERS)).alias(HEADERS)] if HEADERS in df.columns else []
        return df.select(
            F.when(ok, F.lit(DEST_OUTPUT)).otherwise(F.lit(DEST_DLQ)).alias("dest"),
            F.when(ok, F.col(user_id).cast("string").cast("binary")).otherwise(F.col("key")).alias("key"),
            F.when(ok, body.cast("binary")).otherwise(F.col("value")).alias("value"),
            why.alias("error"),
            # The record id: which source record this output stands for (dedup key and DLQ headers).
            record_id(df).alias("rid"),
            *headers,
        )

    return transform


def count_metrics(df: DataFrame) -> DataFrame:
    """Observe per-batch counts (events, predictions, dead-lettered) into the query progress."""
    return df.observe(
        "sparkscore",
        F.count(F.lit(1)).alias("events"),
        F.sum((F.col("dest") == DEST_OUTPUT).cast("long")).alias("predictions"),
        F.sum((F.col("dest") == DEST_DLQ).cast("long")).alias("dlq"),
    )
