"""The streaming transforms on tiny static frames: parsing, scoring parity with the core, records, window stats."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pyarrow as pa
import pytest
from chispa import assert_approx_df_equality, assert_df_equality
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, LongType, StringType, StructField, StructType, TimestampType

from streaming.pipeline import (
    DEST_DLQ,
    DEST_OUTPUT,
    PARSE_ERROR,
    check_event_schema,
    event_schema,
    parse_events,
    score_events,
    to_records,
)
from streaming.stats import collect_windows, stats_records, window_stats
from tests.streaming.conftest import event
from udfs.core import load_scorer, score_batch
from udfs.errors import ConfigError

pytestmark = pytest.mark.spark

SCHEMA = "user_id STRING, features ARRAY<DOUBLE>, timestamp TIMESTAMP"
KAFKA_ROWS = StructType(
    [
        StructField("key", StringType()),
        StructField("value", StringType()),
        StructField("topic", StringType()),
        StructField("partition", LongType()),
        StructField("offset", LongType()),
    ]
)

GOOD = [[30.0, 2.0, 19.5, 3.0], [61.0, 9.0, 250.0, 11.0], [18.0, 0.0, 5.0, 0.0]]
BAD_FEATURES = [[30.0, None, 19.5, 3.0], [1.0, 2.0, 3.0], None]


def kafka_frame(spark, values: list[bytes | None]):
    rows = [(f"k{i}", None if v is None else v.decode(), "events", 0, i) for i, v in enumerate(values)]
    df = spark.createDataFrame(rows, KAFKA_ROWS)
    return df.select(
        F.col("key").cast("binary").alias("key"),
        F.col("value").cast("binary").alias("value"),
        "topic",
        F.col("partition").cast("int").alias("partition"),
        "offset",
    )


def test_event_times_are_read_as_iso_8601_or_epoch_seconds_and_epoch_milliseconds_are_refused(spark):
    """The formats the README lists; anything else goes to the dead-letter topic with a reason."""
    given = [
        ('"2026-01-01T00:00:00Z"', "2026-01-01 00:00:00.000000"),
        ('"2026-01-01T00:00:00.123456Z"', "2026-01-01 00:00:00.123456"),
        ('"2026-01-01T01:00:00+01:00"', "2026-01-01 00:00:00.000000"),
        ('"2026-01-01T01:00:00.5+0100"', "2026-01-01 00:00:00.500000"),
        ('"2026-01-01 00:00:00"', "2026-01-01 00:00:00.000000"),  # no zone: UTC
        ('"2026-01-01"', "2026-01-01 00:00:00.000000"),
        ("1767225600", "2026-01-01 00:00:00.000000"),  # epoch seconds
        ("1767225600123", None),  # epoch milliseconds
        ("1767225600.5", None),
        ('"1767225600"', None),
        ('"01/01/2026 00:00"', None),
    ]
    values = [b'{"user_id": "u", "features": [1, 2, 3, 4], "timestamp": %s}' % ts.encode() for ts, _ in given]
    parsed = (
        kafka_frame(spark, values)
        .transform(parse_events(SCHEMA))
        .select("offset", F.date_format("timestamp", "yyyy-MM-dd HH:mm:ss.SSSSSS").alias("ts"), PARSE_ERROR)
        .orderBy("offset")
        .collect()
    )
    for (raw, want), row in zip(given, parsed, strict=True):
        if want is None:
            assert row[PARSE_ERROR] is not None, (raw, row)
        else:
            assert (row["ts"], row[PARSE_ERROR]) == (want, None), raw
    assert parsed[7][PARSE_ERROR] == (
        "timestamp is after the year 9999: epoch numbers must be seconds, not milliseconds"
    )


def test_parse_events_gives_a_reason_for_each_message_that_cannot_be_an_event(spark):
    values = [
        event("u1", GOOD[0]),
        b"not json",
        b"",
        json.dumps({"features": GOOD[0], "timestamp": "2026-01-01T00:00:00Z"}).encode(),
        json.dumps({"user_id": "u5", "features": GOOD[0]}).encode(),
        None,
    ]
    parsed = (
        kafka_frame(spark, values).transform(parse_events(SCHEMA)).select("offset", "user_id", PARSE_ERROR)
    )
    expected = spark.createDataFrame(
        [
            (0, "u1", None),
            (1, None, f"value is not JSON matching the event schema ({SCHEMA})"),
            (2, None, "empty message value"),
            (3, None, "missing user_id"),
            (4, "u5", "missing or unreadable timestamp"),
            (5, None, "empty message value"),
        ],
        "offset long, user_id string, parse_error string",
    )
    assert_df_equality(parsed, expected, ignore_nullable=True)


def test_records_carry_the_cores_prediction_and_dead_letter_the_cores_error(spark, stream_model):
    features = GOOD + BAD_FEATURES
    values = [event(f"u{i}", f, f"2026-01-01T00:00:0{i}Z") for i, f in enumerate(features)] + [b"{oops"]
    records = (
        kafka_frame(spark, values)
        .transform(parse_events(SCHEMA))
        .transform(score_events(stream_model))
        .transform(to_records(stream_model))
        .orderBy(F.split("rid", "/")[2].cast("long"))
        .collect()
    )
    direct = score_batch(
        pa.table({"features": pa.array(features, pa.list_(pa.float64()))}), load_scorer(stream_model)
    ).to_pydict()

    assert [r["dest"] for r in records] == [DEST_OUTPUT] * 3 + [DEST_DLQ] * 4
    for i, r in enumerate(records[:3]):
        body = json.loads(r["value"])
        assert list(body) == ["user_id", "prediction", "timestamp", "model_version"]
        assert body["user_id"] == f"u{i}" and r["key"] == f"u{i}".encode()
        assert body["prediction"] == pytest.approx(direct["prediction"][i], abs=1e-6)
        assert body["model_version"] == stream_model.version
        assert body["timestamp"] == f"2026-01-01T00:00:0{i}.000000Z"
    for i, r in enumerate(records[3:6], start=3):
        assert r["error"] == direct["error"][i]  # the core's reason, word for word
        assert bytes(r["value"]) == values[i] and r["key"] == f"k{i}".encode()
    assert records[6]["error"].startswith("value is not JSON")
    assert [r["rid"] for r in records] == [f"events/0/{i}" for i in range(7)]


def test_event_schema_problems_are_config_errors_naming_the_fields(spark, stream_model):
    with pytest.raises(ConfigError, match="not valid Spark DDL"):
        event_schema("user_id STRING,, nope")
    schema = event_schema("user STRING, features ARRAY<DOUBLE>, timestamp TIMESTAMP")
    with pytest.raises(
        ConfigError, match=r"user_id = 'user_id' is not a field.*\['user', 'features', 'timestamp'\]"
    ):
        check_event_schema(schema, user_id="user_id", timestamp="timestamp", model=stream_model)
    schema = event_schema("user_id STRING, x ARRAY<DOUBLE>, timestamp TIMESTAMP")
    with pytest.raises(ConfigError, match=r"model input columns \['features'\]"):
        check_event_schema(schema, user_id="user_id", timestamp="timestamp", model=stream_model)
    schema = event_schema("user_id STRING, features ARRAY<DOUBLE>, timestamp STRING")
    with pytest.raises(ConfigError, match="must be TIMESTAMP"):
        check_event_schema(schema, user_id="user_id", timestamp="timestamp", model=stream_model)


def test_window_stats_count_mean_and_max_per_tumbling_window_and_version(spark):
    preds = [
        ("2026-01-01T00:00:10Z", 0.2, "v1"),
        ("2026-01-01T00:00:50Z", 0.6, "v1"),
        ("2026-01-01T00:01:05Z", 0.9, "v1"),
        ("2026-01-01T00:01:06Z", 0.1, "v2"),
    ]
    values = [
        json.dumps({"user_id": "u", "prediction": p, "timestamp": ts, "model_version": v}).encode()
        for ts, p, v in preds
    ]
    stats = kafka_frame(spark, values).transform(window_stats(window="1 minute", watermark="0 seconds"))
    t = lambda m: datetime(2026, 1, 1, 0, m, tzinfo=UTC).replace(tzinfo=None)  # noqa: E731
    expected = spark.createDataFrame(
        [(t(0), t(1), "v1", 2, 0.4, 0.6), (t(1), t(2), "v1", 1, 0.9, 0.9), (t(1), t(2), "v2", 1, 0.1, 0.1)],
        StructType(
            [
                StructField("window_start", TimestampType()),
                StructField("window_end", TimestampType()),
                StructField("model_version", StringType()),
                StructField("count", LongType()),
                StructField("mean", DoubleType()),
                StructField("max", DoubleType()),
            ]
        ),
    )
    assert_approx_df_equality(
        stats.orderBy("window_start", "model_version"), expected, 1e-12, ignore_nullable=True
    )
    keys = sorted(
        json.loads(v)["window_start"] + "|" + k.decode().split("|")[1]
        for _, k, v, *_ in stats_records(collect_windows(stats))
    )
    assert keys == [
        "2026-01-01T00:00:00.000000Z|v1",
        "2026-01-01T00:01:00.000000Z|v1",
        "2026-01-01T00:01:00.000000Z|v2",
    ]


@pytest.mark.parametrize(
    ("producer", "message"),
    [
        ({"transaction.timeout.ms": "5000"}, "transaction.timeout.ms must be between 10000 and 900000"),
        ({"transaction.timeout.ms": "3600000"}, "transaction.timeout.ms must be between 10000 and 900000"),
        (
            {"transaction.timeout.ms": "20000", "message.timeout.ms": "20000"},
            r"message.timeout.ms must be at least 1000 and below transaction.timeout.ms \(20000\)",
        ),
        ({"message.timeout.ms": "soon"}, "message.timeout.ms must be a whole number of ms"),
    ],
)
def test_producer_timeouts_outside_safe_limits_are_config_errors(producer, message):
    from streaming.config import OutputConfig

    with pytest.raises(ValueError, match=message):
        OutputConfig(producer=producer)


def test_producer_timeouts_within_limits_reach_the_transactional_writer():
    from streaming.config import OutputConfig
    from streaming.kafka_client import transactional_producer

    settings = {"transaction.timeout.ms": "300000", "message.timeout.ms": "240000"}
    OutputConfig(producer=settings)
    # librdkafka refuses a producer whose message.timeout.ms exceeds its transaction.timeout.ms:
    # the 20 s from the settings is what it got (the sink's default would have been 70 s).
    transactional_producer({"bootstrap.servers": "127.0.0.1:1", **settings}, "t", delivery_timeout_s=30)
    with pytest.raises(Exception, match="message.timeout.ms"):
        transactional_producer(
            {"bootstrap.servers": "127.0.0.1:1", "transaction.timeout.ms": "20000"},
            "t",
            delivery_timeout_s=60,
        )
