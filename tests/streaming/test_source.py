"""The Kafka source: options, admission control, Tansu's end offsets, and one contract for every backend.

The conformance tests run the same assertions on the matrix {``kafka`` (Spark's
JVM connector, from ``make jars``), ``kafka_py``} x {Apache Kafka, Tansu}. Every
cell runs; the Tansu cells are ``slow`` (Apache Kafka is the broker users run).
On Tansu, ``kafka_py`` finds log ends with ``latestOffsetsBy=fetchProbe``; the
JVM source has no such option and trusts ListOffsets, which Tansu answers a
batch short, so each test seals its partitions with a sentinel batch (see
:func:`_seal`) and the assertions ignore sentinels.
"""

from __future__ import annotations

import json
import uuid

import pytest
from pyspark.errors import StreamingQueryException
from pyspark.sql.streaming.datasource import ReadAllAvailable

from streaming import kafka_client as kc
from streaming.backends import JVM, PYTHON, available_backends, choose_backend, read_kafka
from streaming.broker import free_port
from streaming.source import (
    KafkaStreamReader,
    SourceOptionError,
    SourceOptions,
    from_json,
    kafka_schema,
    rate_limit,
    to_json,
)
from tests.streaming.conftest import APACHE, POLL_TIMEOUT_S, TANSU

SENTINEL = b"__end__"
# The conformance matrix: (source, broker). Every combination runs; Tansu's cells are slow.
MATRIX = [
    pytest.param((JVM, APACHE), id="kafka-on-apache"),
    pytest.param((PYTHON, APACHE), id="kafka_py-on-apache"),
    pytest.param((JVM, TANSU), id="kafka-on-tansu", marks=pytest.mark.slow),
    pytest.param((PYTHON, TANSU), id="kafka_py-on-tansu", marks=pytest.mark.slow),
]


# -- options and offsets (no broker, no Spark) -------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"subscribe": "t"}, "kafka.bootstrap.servers is required"),
        (
            {"kafka.bootstrap.servers": "h:1"},
            "exactly one of the options subscribe, subscribePattern, assign",
        ),
        ({"kafka.bootstrap.servers": "h:1", "subscribe": "t", "assign": '{"t": [0]}'}, "exactly one"),
        ({"kafka.bootstrap.servers": "h:1", "assign": "[0]"}, 'assign must be JSON like {"topic": [0, 1]}'),
        (
            {"kafka.bootstrap.servers": "h:1", "subscribe": "t", "kafka.auto.offset.reset": "x"},
            "set startingOffsets",
        ),
        ({"kafka.bootstrap.servers": "h:1", "subscribe": "t", "startingOffsets": "{bad"}, "-2 = earliest"),
        (
            {"kafka.bootstrap.servers": "h:1", "subscribe": "t", "maxOffsetsPerTrigger": "0"},
            "positive integer",
        ),
        ({"kafka.bootstrap.servers": "h:1", "subscribe": "t", "failOnDataLoss": "maybe"}, "true or false"),
        ({"kafka.bootstrap.servers": "h:1", "subscribe": "t", "latestOffsetsBy": "guess"}, "fetchProbe"),
        ({"kafka.bootstrap.servers": "h:1", "subscribe": "t", "endingOffsets": "latest"}, "batch reads only"),
        (
            {"kafka.bootstrap.servers": "h:1", "subscribe": "t", "startingOffset": "earliest"},
            "unknown option",
        ),
    ],
)
def test_bad_source_options_fail_with_a_message_naming_the_option(options, message):
    with pytest.raises(SourceOptionError, match=message.replace("[", r"\[").replace("{", r"\{")):
        SourceOptions.parse(options, streaming=True)


def test_options_are_case_insensitive_and_pass_kafka_settings_through():
    opts = SourceOptions.parse(
        {
            "KAFKA.bootstrap.servers": "h:1",
            "Subscribe": "a, b",
            "MAXOFFSETSPERTRIGGER": "7",
            "kafka.client.id": "me",
        },
        streaming=True,
    )
    assert opts.client == {"bootstrap.servers": "h:1", "client.id": "me"}
    assert opts.subscribe == ("a", "b") and opts.max_offsets_per_trigger == 7
    assert opts.starting == "latest" and opts.fail_on_data_loss


def test_offsets_use_the_jvm_json_shape_with_string_partition_keys():
    offsets = {("b", 1): 5, ("a", 0): 23, ("b", 0): 0}
    shaped = to_json(offsets)
    assert shaped == {"a": {"0": 23}, "b": {"0": 0, "1": 5}}
    assert from_json(json.loads(json.dumps(shaped))) == offsets


def test_rate_limit_admits_exactly_the_limit_in_proportion_to_each_backlog():
    start = {("t", 0): 0, ("t", 1): 100, ("t", 2): 7}
    latest = {("t", 0): 900, ("t", 1): 200, ("t", 2): 7, ("t", 3): 3}
    end = rate_limit({**start, ("t", 3): 0}, latest, 100)
    taken = {tp: end[tp] - ({**start, ("t", 3): 0})[tp] for tp in end}
    assert sum(taken.values()) == 100
    assert taken[("t", 2)] == 0 and all(end[tp] <= latest[tp] for tp in end)
    assert taken[("t", 0)] > 8 * taken[("t", 1)] > 0 and taken[("t", 3)] <= 3
    assert rate_limit(start, {("t", 0): 10, ("t", 1): 100, ("t", 2): 7}, 100) == {
        ("t", 0): 10,
        ("t", 1): 100,
        ("t", 2): 7,
    }


# -- the broker: end offsets and deterministic reads ---------------------------------------------


@pytest.mark.kafka
def test_fetch_probe_finds_the_log_end_that_tansu_list_offsets_misses(tansu):
    kafka = tansu
    topic = kafka.topic(partitions=1)
    kafka.produce(topic, [b"%d" % i for i in range(500)])
    kafka.produce(topic, [b"%d" % i for i in range(500, 1000)])
    listed = kc.Offsets(kafka.conf, latest_by=kc.LIST_OFFSETS, timeout_s=POLL_TIMEOUT_S)
    probed = kc.Offsets(kafka.conf, latest_by=kc.FETCH_PROBE, timeout_s=POLL_TIMEOUT_S)
    empty = kafka.topic(partitions=1)
    try:
        assert probed.latest([(topic, 0)]) == {(topic, 0): 1000}
        assert listed.latest([(topic, 0)])[(topic, 0)] <= 1000  # Tansu: the last batch's base offset
        assert probed.latest([(empty, 0)]) == {(empty, 0): 0}
        assert probed.earliest([(topic, 0)]) == {(topic, 0): 0}
    finally:
        listed.close()
        probed.close()


@pytest.mark.kafka
def test_reading_a_range_is_deterministic_and_ranges_compose(kafka):
    topic = kafka.topic(partitions=1)
    kafka.produce(topic, [b"v%d" % i for i in range(300)])
    consumer = kc.make_consumer(kafka.conf)

    def read(a: int, b: int) -> list[tuple[int, bytes]]:
        return [
            (m.offset(), m.value())
            for msgs in kc.read_range(consumer, topic, 0, a, b, timeout_s=POLL_TIMEOUT_S, max_batch=64)
            for m in msgs
        ]

    try:
        whole = read(10, 250)
        assert whole == [(i, b"v%d" % i) for i in range(10, 250)]
        assert read(10, 250) == whole
        assert read(10, 123) + read(123, 250) == whole
        assert read(5, 5) == []
    finally:
        consumer.close()


@pytest.mark.kafka
def test_a_range_past_the_log_end_is_data_loss_unless_failondataloss_is_off(kafka):
    topic = kafka.topic(partitions=1)
    kafka.produce(topic, [b"x"] * 5)
    consumer = kc.make_consumer(kafka.conf)
    try:
        with pytest.raises(kc.DataLossError, match=rf"{topic}/0 ends at offset 5 .* failOnDataLoss=false"):
            list(kc.read_range(consumer, topic, 0, 0, 9, timeout_s=POLL_TIMEOUT_S))
        got = kc.read_range(consumer, topic, 0, 0, 9, timeout_s=POLL_TIMEOUT_S, fail_on_data_loss=False)
        assert [m.offset() for msgs in got for m in msgs] == [0, 1, 2, 3, 4]
    finally:
        consumer.close()


# -- backends ------------------------------------------------------------------------------------


@pytest.mark.spark
def test_with_the_connector_on_the_classpath_auto_picks_the_jvm_source_and_config_overrides_it(spark):
    # The test session has build/jars on spark.jars (tests/conftest.py): a real class lookup, no mock.
    assert available_backends(spark) == [PYTHON, JVM]
    assert choose_backend(spark, "auto") == JVM
    assert choose_backend(spark, "kafka") == JVM
    assert choose_backend(spark, "kafka_py") == PYTHON


def _broker_options(backend: str, kafka) -> dict[str, str]:
    """The bootstrap address, and for kafka_py how to find log ends on this broker."""
    opts = {"kafka.bootstrap.servers": kafka.bootstrap}
    if backend == PYTHON:
        opts["latestOffsetsBy"] = kafka.latest_by
    return opts


def _seal(kafka, topic: str, partitions: int) -> None:
    """One sentinel per partition, each in its own record batch.

    Tansu lists the base offset of the last batch as a partition's end, so a
    source that trusts ListOffsets (the JVM one) stops just before the
    sentinel; kafka_py's fetch probe reads it. The assertions ignore sentinels.
    """
    for p in range(partitions):
        kafka.produce(topic, [SENTINEL], partition=p)


@pytest.fixture
def cell(request, spark):
    """One cell of the matrix: (source, topic helpers of the broker); the source registered or loaded."""
    backend, broker = request.param
    choose_backend(spark, backend)
    return backend, request.getfixturevalue(broker)


def _run(spark, backend: str, options: dict[str, str], checkpoint: str) -> tuple[list, list]:
    """Run an availableNow query; (rows without sentinels, progress of the non-empty batches)."""
    df = read_kafka(spark, backend, {"kafkaConsumer.pollTimeoutMs": "30000", **options})
    assert df.schema == kafka_schema(options.get("includeHeaders") == "true")
    rows: list = []
    query = (
        df.writeStream.foreachBatch(lambda batch, _id: rows.extend(batch.collect()))
        .option("checkpointLocation", checkpoint)
        .trigger(availableNow=True)
        .start()
    )
    assert query.awaitTermination(180), "the availableNow query did not finish"
    data = [r for r in rows if bytes(r["value"]) != SENTINEL]
    return data, [p for p in query.recentProgress if p["numInputRows"] > 0]


@pytest.mark.kafka
@pytest.mark.spark
@pytest.mark.parametrize("cell", MATRIX, indirect=True)
def test_every_backend_reads_records_with_the_jvm_schema_and_offsets(spark, cell, tmp_path):
    backend, kafka = cell
    topic = kafka.topic(partitions=2)
    kafka.produce(
        topic,
        [b"v%d" % i for i in range(20)],
        keys=[b"k%d" % i for i in range(20)],
        headers=[("trace", b"abc")],
    )
    _seal(kafka, topic, 2)
    sent = [r for r in kafka.read(topic) if r.value != SENTINEL]
    opts = {**_broker_options(backend, kafka), "subscribe": topic, "startingOffsets": "earliest"}

    rows, progress = _run(spark, backend, {**opts, "includeHeaders": "true"}, str(tmp_path / "ck"))

    got = sorted(
        (r["topic"], r["partition"], r["offset"], bytes(r["key"]), bytes(r["value"]), r["timestampType"])
        for r in rows
    )
    assert got == sorted((s.topic, s.partition, s.offset, s.key, s.value, 0) for s in sent)
    by_pos = {(s.partition, s.offset): s for s in sent}
    for r in rows:
        assert [(h["key"], bytes(h["value"])) for h in r["headers"]] == [("trace", b"abc")]
        assert int(r["timestamp"].timestamp() * 1000) == by_pos[(r["partition"], r["offset"])].timestamp_ms
    end = json.loads(progress[-1]["sources"][0]["endOffset"])
    assert set(end) == {topic} and set(end[topic]) == {"0", "1"}
    for p in (0, 1):
        assert end[topic][str(p)] >= max(s.offset for s in sent if s.partition == p) + 1


@pytest.mark.kafka
@pytest.mark.spark
@pytest.mark.parametrize("cell", MATRIX, indirect=True)
def test_every_backend_caps_each_batch_at_max_offsets_per_trigger(spark, cell, tmp_path):
    backend, kafka = cell
    topic = kafka.topic(partitions=1)
    kafka.produce(topic, [b"%d" % i for i in range(50)])
    _seal(kafka, topic, 1)
    opts = {
        **_broker_options(backend, kafka),
        "subscribe": topic,
        "startingOffsets": "earliest",
        "maxOffsetsPerTrigger": "20",
    }
    rows, progress = _run(spark, backend, opts, str(tmp_path / "ck"))
    sizes = [p["numInputRows"] for p in progress]
    assert sorted(int(r["offset"]) for r in rows) == list(range(50))
    assert len(sizes) >= 3 and all(n <= 20 for n in sizes), sizes


@pytest.mark.kafka
@pytest.mark.spark
@pytest.mark.parametrize("cell", MATRIX, indirect=True)
def test_every_backend_starts_from_json_offsets_and_resumes_from_its_checkpoint(spark, cell, tmp_path):
    backend, kafka = cell
    topic = kafka.topic(partitions=2)
    kafka.produce(topic, [b"a%d" % i for i in range(20)])
    _seal(kafka, topic, 2)
    ck = str(tmp_path / "ck")
    opts = {
        **_broker_options(backend, kafka),
        "subscribe": topic,
        "startingOffsets": json.dumps({topic: {"0": 4, "1": -2}}),
    }
    rows, _ = _run(spark, backend, opts, ck)
    assert sorted((r["partition"], r["offset"]) for r in rows) == [(0, o) for o in range(4, 10)] + [
        (1, o) for o in range(10)
    ]

    kafka.produce(topic, [b"b%d" % i for i in range(6)])
    _seal(kafka, topic, 2)
    rows, _ = _run(spark, backend, opts, ck)
    assert sorted(bytes(r["value"]) for r in rows) == sorted(b"b%d" % i for i in range(6))

    rows, progress = _run(spark, backend, opts, ck)
    assert rows == [] and progress == []


@pytest.mark.kafka
@pytest.mark.spark
@pytest.mark.parametrize("cell", MATRIX, indirect=True)
def test_every_backend_honours_assign_subscribe_pattern_and_latest(spark, cell, tmp_path):
    backend, kafka = cell
    prefix = f"pat{uuid.uuid4().hex[:6]}"
    first, second = kafka.topic(partitions=2, prefix=prefix), kafka.topic(partitions=1, prefix=prefix)
    for t, n in ((first, 2), (second, 1)):
        kafka.produce(t, [t.encode()] * 4)
        _seal(kafka, t, n)
    base = {**_broker_options(backend, kafka), "startingOffsets": "earliest"}

    rows, _ = _run(spark, backend, {**base, "assign": json.dumps({first: [1]})}, str(tmp_path / "a"))
    assert {(r["topic"], r["partition"]) for r in rows} == {(first, 1)} and len(rows) == 2

    rows, _ = _run(spark, backend, {**base, "subscribePattern": f"{prefix}-.*"}, str(tmp_path / "p"))
    assert sorted(r["topic"] for r in rows) == sorted([first] * 4 + [second] * 4)

    latest = {**base, "subscribe": second, "startingOffsets": "latest"}
    rows, _ = _run(spark, backend, latest, str(tmp_path / "l"))
    assert rows == []
    kafka.produce(second, [b"new"])
    _seal(kafka, second, 1)
    rows, _ = _run(spark, backend, latest, str(tmp_path / "l"))
    assert [bytes(r["value"]) for r in rows] == [b"new"]


@pytest.mark.kafka
@pytest.mark.spark
def test_kafka_py_fails_a_query_whose_offsets_are_past_the_log_unless_told_not_to(spark, kafka, tmp_path):
    choose_backend(spark, PYTHON)
    topic = kafka.topic(partitions=1)
    kafka.produce(topic, [b"x"] * 3)
    opts = {
        "kafka.bootstrap.servers": kafka.bootstrap,
        "subscribe": topic,
        "startingOffsets": json.dumps({topic: {"0": 9}}),
    }
    with pytest.raises(
        StreamingQueryException,
        match=r"now ends at offset 3 but the query already read up to offset\(s\) 9.*failOnDataLoss=false",
    ):
        _run(spark, PYTHON, opts, str(tmp_path / "a"))
    lenient = {**opts, "failOnDataLoss": "false"}
    rows, _ = _run(spark, PYTHON, lenient, str(tmp_path / "b"))
    assert rows == []  # the lost offsets are skipped: the query goes on from the log end
    kafka.produce(topic, [b"y"])
    rows, _ = _run(spark, PYTHON, lenient, str(tmp_path / "b"))
    assert [bytes(r["value"]) for r in rows] == [b"y"]


def test_an_unreachable_broker_is_named_in_one_clear_error_before_any_query(kafka):
    port = free_port()  # a loopback port with nothing listening
    with pytest.raises(
        kc.KafkaConfigError, match=rf"no Kafka broker answered at '127.0.0.1:{port}'.*make broker"
    ):
        kc.check_reachable({"bootstrap.servers": f"127.0.0.1:{port}"}, timeout_s=2)
    kc.check_reachable(kafka.conf, timeout_s=POLL_TIMEOUT_S)  # the running broker answers


class _FlakyLeaderAdmin:
    """An AdminClient whose ListOffsets answers one error per partition once, then the offset."""

    def __init__(
        self, first_error: int | None, *, broker_answers: bool = True, exists: bool = True, invalid: int = 0
    ):
        self.first_error = first_error
        self.invalid = invalid  # this many calls first answer OFFSET_INVALID (-1001) with no error
        self.broker_answers = broker_answers
        self.exists = exists
        self.calls = 0

    def list_topics(self, timeout):
        from confluent_kafka import KafkaError, KafkaException

        if not self.broker_answers:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))
        topic = type("Topic", (), {"error": None, "partitions": {0: None, 1: None}})()
        return type("Metadata", (), {"brokers": {1: "b"}, "topics": {"t": topic} if self.exists else {}})()

    def list_offsets(self, requests, isolation_level, request_timeout):
        from concurrent.futures import Future

        from confluent_kafka import KafkaError, KafkaException

        self.calls += 1
        futures = {}
        for tp in requests:
            fut: Future = Future()
            if self.calls <= self.invalid:
                fut.set_result(type("Info", (), {"offset": -1001})())
            elif self.first_error is not None and (self.calls == 1 or not self.broker_answers):
                fut.set_exception(KafkaException(KafkaError(self.first_error)))
            else:
                fut.set_result(type("Info", (), {"offset": 7 + tp.partition})())
            futures[tp] = fut
        return futures


def test_listing_offsets_waits_out_a_leader_election_instead_of_failing():
    from confluent_kafka import KafkaError

    admin = _FlakyLeaderAdmin(KafkaError.NOT_LEADER_FOR_PARTITION)
    assert kc.list_offsets(admin, [("t", 0), ("t", 1)], "latest", timeout_s=5) == {("t", 0): 7, ("t", 1): 8}
    assert admin.calls == 2


def test_an_offset_invalid_answer_without_an_error_is_asked_again_never_taken_as_the_log_end():
    """Seen in a loaded `make test`: with the broker stopping, ListOffsets answered -1001 for every
    partition with no error, and the source reported "now ends at offset -1001" as lost data."""
    admin = _FlakyLeaderAdmin(None, invalid=2)
    assert kc.list_offsets(admin, [("t", 0), ("t", 1)], "latest", timeout_s=5) == {("t", 0): 7, ("t", 1): 8}
    assert admin.calls == 3


def test_offset_invalid_until_the_deadline_is_a_timeout_not_data_loss():
    admin = _FlakyLeaderAdmin(None, broker_answers=False, invalid=10**6)
    with pytest.raises(kc.KafkaTimeoutError, match=r"t/0: no offset \(got -1001\)"):
        kc.list_offsets(admin, [("t", 0)], "latest", timeout_s=1)


def test_watermarks_of_offset_invalid_are_no_answer_not_an_empty_log():
    class NoAnswer:
        def get_watermark_offsets(self, tp, timeout, cached):
            return -1001, -1001

    assert kc._watermarks(NoAnswer(), "t", 0, 1.0) is None


def test_listing_offsets_of_a_partition_that_is_gone_is_data_loss_at_once():
    from confluent_kafka import KafkaError

    admin = _FlakyLeaderAdmin(KafkaError.UNKNOWN_TOPIC_OR_PART, exists=False)
    with pytest.raises(kc.DataLossError, match="t/0 no longer exists"):
        kc.list_offsets(admin, [("t", 0)], "latest", timeout_s=5)
    assert admin.calls == 1


@pytest.mark.kafka
def test_read_committed_plans_the_batch_end_at_the_last_stable_offset_not_the_high_watermark(apache):
    """An open transaction (a scoring batch in flight) is not data loss: the batch ends where it begins."""
    topic = apache.topic(partitions=1)
    producer = kc.transactional_producer(apache.conf, f"lso-{uuid.uuid4().hex[:8]}", delivery_timeout_s=30)
    producer.init_transactions(POLL_TIMEOUT_S)
    producer.begin_transaction()
    for i in range(5):
        producer.produce(topic, value=b"committed-%d" % i, partition=0)
    producer.commit_transaction(POLL_TIMEOUT_S)  # offsets 0-4, the commit marker at 5
    producer.begin_transaction()
    for i in range(3):
        producer.produce(topic, value=b"open-%d" % i, partition=0)
    assert producer.flush(POLL_TIMEOUT_S) == 0  # offsets 6-8, in a transaction left open
    options = {
        "kafka.bootstrap.servers": apache.bootstrap,
        "kafka.isolation.level": "read_committed",
        "subscribe": topic,
        "startingOffsets": "earliest",
        "kafkaConsumer.pollTimeoutMs": "5000",
    }
    reader = KafkaStreamReader(SourceOptions.parse(options, streaming=True), kafka_schema())
    try:
        start = reader.initialOffset()
        end = reader.latestOffset(start, ReadAllAvailable())
        assert end == {topic: {"0": 6}}
        values = [
            row
            for part in reader.partitions(start, end)
            for batch in reader.read(part)
            for row in batch.column("value").to_pylist()
        ]
        assert values == [b"committed-%d" % i for i in range(5)]
    finally:
        reader.stop()
        producer.abort_transaction(POLL_TIMEOUT_S)


def test_an_unknown_partition_that_no_broker_confirms_is_a_timeout_not_data_loss():
    """librdkafka answers "unknown partition" while the broker is down: that is not lost data."""
    from confluent_kafka import KafkaError

    admin = _FlakyLeaderAdmin(KafkaError._UNKNOWN_PARTITION, broker_answers=False)
    with pytest.raises(kc.KafkaTimeoutError, match="t/0: no broker answered within 1 s"):
        kc.list_offsets(admin, [("t", 0)], "latest", timeout_s=1)


@pytest.mark.kafka
def test_a_partition_is_gone_only_when_a_broker_says_so(kafka):
    topic = kafka.topic(partitions=1)
    port = free_port()  # a loopback port with nothing listening: a stopped broker
    down = kc.make_consumer({"bootstrap.servers": f"127.0.0.1:{port}"})
    up = kc.make_consumer(kafka.conf)
    try:
        assert not kc.partition_gone(down, topic, 0, 2)
        assert not kc.partition_gone(up, topic, 0, POLL_TIMEOUT_S)
        assert kc.partition_gone(up, topic, 1, POLL_TIMEOUT_S)
        assert kc.partition_gone(up, f"never-{uuid.uuid4().hex[:8]}", 0, POLL_TIMEOUT_S)
    finally:
        down.close()
        up.close()
