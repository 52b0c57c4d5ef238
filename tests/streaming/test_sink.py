"""The effectively-once sink against real brokers: fenced writers, markers, replays, retention, oversized records.

Tests marked for both brokers read what a consumer of that broker sees: ``read_committed``
(Tansu has no isolation levels, so there every record written is visible).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import replace

import pyarrow as pa
import pytest
from confluent_kafka import TopicPartition

from streaming import faults
from streaming import kafka_client as kc
from streaming.sink import (
    COMMIT_TOPIC_CONFIGS,
    H_ERROR,
    H_ID,
    H_OFFSET,
    H_PARTITION,
    H_TOPIC,
    EffectivelyOnceSink,
    SinkError,
    produce,
    record_rows,
    write_task,
    written_ids,
)
from tests.streaming.conftest import POLL_TIMEOUT_S, ROOT, read_records, stream_config, tally, wait_until

pytestmark = pytest.mark.kafka


@pytest.fixture(params=["apache", "tansu"])
def broker_kind(request):
    return request.param


@pytest.fixture
def kafka_any(broker_kind, request):
    """The topic helpers of Apache Kafka or of Tansu."""
    return request.getfixturevalue(broker_kind)


def topics_on(k):
    return (
        k.topic(partitions=2, prefix="out"),
        k.topic(partitions=1, prefix="dlq"),
        k.topic(prefix="commits"),
    )


def make_sink(
    k, topics, query_id: str, *, timeout_s: float = POLL_TIMEOUT_S, producer: dict | None = None
) -> EffectivelyOnceSink:
    out, dlq, commits = topics
    sink = EffectivelyOnceSink(
        client=k.conf,
        topics=(out, dlq),
        commit_topic=commits,
        producer=producer,
        latest_by=kc.FETCH_PROBE,
        timeout_s=timeout_s,
    )
    sink.bind(query_id)
    return sink


def records(n: int, *, first: int = 0) -> list:
    """(dest, key, value, error, record id, headers): every fifth one dead-lettered."""
    out = []
    for i in range(first, first + n):
        bad = i % 5 == 0
        out.append((int(bad), b"u%d" % i, b"v%d" % i, "bad row" if bad else None, f"events/0/{i}", []))
    return out


def arrow_records(n: int, *, first: int = 0) -> pa.RecordBatch:
    rows = records(n, first=first)
    return pa.RecordBatch.from_pydict(
        {
            "dest": [r[0] for r in rows],
            "key": [r[1] for r in rows],
            "value": [r[2] for r in rows],
            "error": [r[3] for r in rows],
            "rid": [r[4] for r in rows],
        }
    )


def ids_in(k, *topics: str, committed: bool = True) -> Counter:
    return Counter(
        dict(m.headers())[H_ID].decode() for t in topics for m in read_records(k, t, committed=committed)
    )


def exactly_once(k, topics, n: int, *, first: int = 0) -> None:
    out, dlq, _ = topics
    assert ids_in(k, out, dlq) == Counter(f"events/0/{i}" for i in range(first, first + n))


def test_a_batch_cut_short_by_a_crash_is_written_once_after_restart(kafka_any, broker_kind):
    topics = topics_on(kafka_any)
    query = str(uuid.uuid4())
    crashed = make_sink(kafka_any, topics, query)
    plan = crashed.begin(0)
    assert plan is not None
    # The driver dies after sending 23 of 40 records: its transaction stays open, its producer alive.
    produce(crashed._begin_txn(), plan, records(40)[:23])
    crashed._abandon()

    restarted = make_sink(kafka_any, topics, query)
    plan = restarted.begin(0)
    assert plan is not None
    result = restarted.write_local(plan, records(40))
    restarted.commit(plan, result)

    exactly_once(kafka_any, topics, 40)
    if broker_kind == "apache":
        # Opening the restarted writer fenced the dead one and aborted its 23: only
        # read_uncommitted consumers see them, and nothing had to be de-duplicated.
        assert result.skipped == 0 and sum(result.counts.values()) == 40
        assert sum(ids_in(kafka_any, topics[0], topics[1], committed=False).values()) == 63
    else:
        # Tansu shows the dead writer's records to everyone: the restart found and skipped them.
        assert plan.skip == {f"events/0/{i}" for i in range(23)} and result.skipped == 23


def test_a_committed_batch_is_skipped_when_spark_replays_it(kafka_any):
    topics = topics_on(kafka_any)
    query = str(uuid.uuid4())
    sink = make_sink(kafka_any, topics, query)
    plan = sink.begin(0)
    assert plan is not None
    sink.commit(plan, sink.write_local(plan, records(10)))

    replay = make_sink(kafka_any, topics, query)
    assert replay.begin(0) is None
    plan = replay.begin(1)
    assert plan is not None and plan.skip == frozenset()
    replay.commit(plan, replay.write_local(plan, records(10, first=10)))
    exactly_once(kafka_any, topics, 20)


def test_tasks_committed_before_the_marker_are_not_written_again_after_a_restart(kafka_any):
    """The window between the task writers' commits and the driver's batch marker."""
    topics = topics_on(kafka_any)
    query = str(uuid.uuid4())
    crashed = make_sink(kafka_any, topics, query)
    plan = crashed.begin(0)
    assert plan is not None
    for part in (0, 1):
        write_task(plan, [arrow_records(20, first=20 * part)], partition=part, attempt=0)
    # ... and the driver dies before its marker.

    restarted = make_sink(kafka_any, topics, query)
    plan = restarted.begin(0)
    assert plan is not None and len(plan.skip) == 40
    summaries = [
        write_task(plan, [arrow_records(20, first=20 * part)], partition=part, attempt=0).to_pydict()
        for part in (0, 1)
    ]
    skipped = [v for s in summaries for k, v in zip(s["kind"], s["value"], strict=True) if k == "skipped"]
    assert skipped == [20, 20]
    exactly_once(kafka_any, topics, 40)


def test_a_retried_task_finds_only_what_this_query_committed_for_this_batch(kafka_any):
    topics = topics_on(kafka_any)
    query, other = str(uuid.uuid4()), str(uuid.uuid4())
    sink, stranger = make_sink(kafka_any, topics, query), make_sink(kafka_any, topics, other)
    plan, foreign = sink.begin(0), stranger.begin(0)
    assert plan is not None and foreign is not None
    stranger.commit(foreign, stranger.write_local(foreign, records(5)))
    sink.commit(plan, sink.write_local(plan, records(8)[:3]))
    seen, _ = written_ids(plan)
    assert seen == {"events/0/0", "events/0/1", "events/0/2"}


def test_commit_markers_are_keyed_by_query_and_record_batch_positions_and_writers(kafka_any):
    topics = topics_on(kafka_any)
    out, dlq, commits = topics
    query = str(uuid.uuid4())
    sink = make_sink(kafka_any, topics, query)
    for batch in (0, 1):
        plan = sink.begin(batch)
        assert plan is not None
        sink.commit(plan, sink.write_local(plan, records(10, first=10 * batch)))
    markers = [(m.key(), json.loads(m.value())) for m in read_records(kafka_any, commits)]
    assert [key for key, _ in markers] == [query.encode()] * 3
    assert [(m["kind"], m["batch_id"]) for _, m in markers] == [("batch", -1), ("batch", 0), ("batch", 1)]
    last = markers[-1][1]
    ends = {t: {str(p): off for p, off in kafka_any.end_offsets(t).items()} for t in (out, dlq)}
    # A position is where the next batch starts reading: at or past the batch's last record.
    for t, parts in last["positions"].items():
        for p, off in parts.items():
            assert off <= ends[t][p]
    assert last["counts"] == {out: 8, dlq: 2, "skipped": 0}


def test_dead_letters_keep_the_input_headers_original_bytes_error_and_source_position(kafka_any):
    topics = topics_on(kafka_any)
    _, dlq, _ = topics
    sink = make_sink(kafka_any, topics, str(uuid.uuid4()))
    plan = sink.begin(0)
    assert plan is not None
    header = pa.list_(pa.struct([("key", pa.string()), ("value", pa.binary())]))
    batch = pa.RecordBatch.from_pydict(
        {
            "dest": [1],
            "key": [b"k"],
            "value": [b"\xff not json"],
            "error": ["value is not JSON"],
            "rid": ["events/3/41"],
            "headers": pa.array(
                [[{"key": "trace-id", "value": b"abc"}, {"key": "src", "value": b"app"}]], header
            ),
        }
    )
    sink.commit(plan, sink.write_local(plan, record_rows(batch)))
    [rec] = read_records(kafka_any, dlq)
    headers = rec.headers()
    assert (rec.key(), rec.value()) == (b"k", b"\xff not json")
    assert ("trace-id", b"abc") in headers and ("src", b"app") in headers
    h = dict(headers)
    assert h[H_ERROR] == b"value is not JSON"
    assert (h[H_TOPIC], h[H_PARTITION], h[H_OFFSET]) == (b"events", b"3", b"41")


def test_a_record_too_large_for_its_topic_is_dead_lettered_with_the_reason(kafka_any):
    out = f"small-out-{uuid.uuid4().hex[:8]}"
    kc.ensure_topics(kafka_any.conf, {out: kc.TopicSpec(1, 1, {"max.message.bytes": "2000"})})
    dlq, commits = kafka_any.topic(prefix="dlq"), kafka_any.topic(prefix="commits")
    sink = make_sink(kafka_any, (out, dlq, commits), str(uuid.uuid4()))
    plan = sink.begin(0)
    assert plan is not None and plan.max_bytes[out] == 2000
    big = (0, b"u-big", b"x" * 3000, None, "events/0/1", [])
    sink.commit(plan, sink.write_local(plan, [(0, b"u0", b"small", None, "events/0/0", []), big]))
    assert [m.value() for m in read_records(kafka_any, out)] == [b"small"]
    [dead] = read_records(kafka_any, dlq)
    assert dead.value() == b"x" * 3000 and dead.key() == b"u-big"
    assert (
        dict(dead.headers())[H_ERROR].decode().startswith("record of 3,")
        and out in dict(dead.headers())[H_ERROR].decode()
    )


# -- zombies: two live attempts of one task ----------------------------------------------------


def test_a_zombie_attempt_is_fenced_and_each_record_is_written_once(kafka_any, broker_kind, fault_results):
    """Attempt 0 stalls mid-write (a lost executor); attempt 1 runs the same task to the end; then 0 wakes."""
    topics = topics_on(kafka_any)
    sink = make_sink(kafka_any, topics, str(uuid.uuid4()))
    plan = sink.begin(0)
    assert plan is not None
    stalled, resume = threading.Event(), threading.Event()

    def hook(point: str, ctx: dict) -> None:
        if point == "writer.before_commit" and ctx["attempt"] == 0:
            stalled.set()
            assert resume.wait(POLL_TIMEOUT_S)

    outcome: dict[str, object] = {}

    def attempt0() -> None:
        try:
            write_task(plan, [arrow_records(30)], partition=0, attempt=0)
            outcome["zombie"] = "committed"
        except SinkError as exc:
            outcome["zombie"] = str(exc)

    faults.HOOK = hook
    try:
        zombie = threading.Thread(target=attempt0)
        zombie.start()
        assert stalled.wait(POLL_TIMEOUT_S), "attempt 0 never reached its commit"
        retry = write_task(plan, [arrow_records(30)], partition=0, attempt=1).to_pydict()
        resume.set()
        zombie.join(POLL_TIMEOUT_S)
    finally:
        faults.HOOK = None
        resume.set()
    assert re.search(r"fence|epoch", str(outcome["zombie"]), re.IGNORECASE), outcome
    exactly_once(kafka_any, topics, 30)
    skipped = dict(zip(retry["kind"], retry["value"], strict=False))["skipped"]
    # Kafka hides the zombie's open transaction from the retry; Tansu shows it, and the retry skips it.
    assert skipped == (0 if broker_kind == "apache" else 30)
    if broker_kind == "apache":
        seen = ids_in(kafka_any, topics[0], topics[1])
        fault_results["zombie.sink"] = tally(seen, {f"events/0/{i}" for i in range(30)}, skipped)


def test_an_attempt_that_opens_its_writer_after_another_committed_writes_nothing(kafka_any):
    """The other order: the retry committed first, then the old attempt starts writing."""
    topics = topics_on(kafka_any)
    sink = make_sink(kafka_any, topics, str(uuid.uuid4()))
    plan = sink.begin(0)
    assert plan is not None
    write_task(plan, [arrow_records(25)], partition=0, attempt=1)
    late = write_task(plan, [arrow_records(25)], partition=0, attempt=0).to_pydict()
    assert dict(zip(late["kind"], late["value"], strict=False))["skipped"] == 25
    exactly_once(kafka_any, topics, 25)


# -- flush timeout: nothing of a failed attempt is sent later ---------------------------------


def test_after_a_delivery_timeout_the_writer_is_purged_and_replaced(apache, apache_kafka, fault_results):
    topics = topics_on(apache)
    query = str(uuid.uuid4())
    # Only the delivery timeout is short (3 s): starting the writer, reading markers and
    # committing keep the generous timeout, so a busy machine cannot fail them instead.
    sink = make_sink(apache, topics, query, producer={"message.timeout.ms": "3000"})
    plan = sink.begin(0)
    assert plan is not None
    old = sink.producer
    apache_kafka.proc.send_signal(19)  # SIGSTOP: the broker accepts bytes and answers nothing
    try:
        with pytest.raises(SinkError, match=r"(?i)batch 0\b.*(timed out|not acknowledged)"):
            sink.write_local(plan, records(30))
        assert len(old) == 0, "records of the failed attempt are still queued"
    finally:
        apache_kafka.proc.send_signal(18)  # SIGCONT
    assert sink._producer is None  # the next batch opens a new writer, fencing the old one
    retry = make_sink(apache, topics, query)
    plan = retry.begin(0)
    assert plan is not None
    retry.commit(plan, retry.write_local(plan, records(30)))
    assert sum(ids_in(apache, topics[0], topics[1], committed=False).values()) == 30
    exactly_once(apache, topics, 30)
    seen = ids_in(apache, topics[0], topics[1])
    fault_results["flush_timeout.sink"] = tally(seen, {f"events/0/{i}" for i in range(30)}, 0)


# -- the commit topic over months -------------------------------------------------------------


def test_markers_are_found_after_retention_removed_the_early_ones(apache, fault_results):
    """A commit topic with the broker's default (delete) policy whose first records aged out."""
    topics = topics_on(apache)
    out, dlq, commits = topics
    query = str(uuid.uuid4())
    sink = make_sink(apache, topics, query)
    for batch in range(3):
        plan = sink.begin(batch)
        assert plan is not None
        sink.commit(plan, sink.write_local(plan, records(10, first=10 * batch)))
    end = apache.end_offsets(commits)[0]
    admin = kc.make_admin(apache.conf)
    for fut in admin.delete_records([TopicPartition(commits, 0, end - 2)]).values():
        fut.result()  # only the newest marker (and its transaction marker) is left

    restarted = make_sink(apache, topics, query)
    assert restarted.begin(2) is None
    plan = restarted.begin(3)
    assert plan is not None
    restarted.commit(plan, restarted.write_local(plan, records(10, first=30)))
    exactly_once(apache, topics, 40)
    seen = ids_in(apache, out, dlq)
    fault_results["retention.sink"] = tally(
        seen, {f"events/0/{i}" for i in range(40)}, restarted.totals["skipped"]
    )


def test_a_checkpoint_ahead_of_a_commit_topic_without_its_markers_is_an_error_not_a_new_query(apache):
    topics = topics_on(apache)
    query = str(uuid.uuid4())
    sink = make_sink(apache, topics, query)
    for batch in range(2):
        plan = sink.begin(batch)
        assert plan is not None
        sink.commit(plan, sink.write_local(plan, records(5, first=5 * batch)))
    admin = kc.make_admin(apache.conf)
    end = apache.end_offsets(topics[2])[0]
    for fut in admin.delete_records([TopicPartition(topics[2], 0, end)]).values():
        fut.result()
    restarted = make_sink(apache, topics, query)
    with pytest.raises(SinkError, match=rf"no marker of query {query}.*committed batches up to 1"):
        restarted.begin(2)
    exactly_once(apache, topics, 10)


def test_created_topics_get_the_replication_factor_and_configs_asked_for(apache):
    from streaming.query import ensure_output_topics

    tag = uuid.uuid4().hex[:8]
    cfg = stream_config(
        apache,
        tag,
        output={
            "replication_factor": 1,
            "topic_configs": {"retention.ms": "3600000", "cleanup.policy": "delete"},
        },
        stats={"enabled": True},
    )
    ensure_output_topics(cfg)
    o = cfg.output
    found = kc.topic_configs(apache.conf, [o.topic, o.dlq_topic, o.commit_topic, cfg.stats.topic], 30)
    for t in (o.topic, o.dlq_topic, cfg.stats.topic):
        assert found[t]["retention.ms"] == "3600000"
    for key, value in COMMIT_TOPIC_CONFIGS.items():
        assert found[o.commit_topic][key] == value  # cleanup.policy stays compact
    assert found[o.commit_topic]["retention.ms"] == "3600000"
    from udfs.errors import ConfigError

    with pytest.raises(ConfigError, match=r"replication factor 3.*only 1 broker"):
        ensure_output_topics(stream_config(apache, tag + "x", output={"replication_factor": 3}))


# -- defects found in review (issue 20): each test fails without its fix -----------------------


def test_input_headers_named_like_the_sinks_own_do_not_hide_a_dead_letter_from_the_recovery_scan(kafka_any):
    """A replayed dead-letter topic carries sparkscore.* headers of the job that wrote it first."""
    topics = topics_on(kafka_any)
    _, dlq, _ = topics
    query = str(uuid.uuid4())
    sink = make_sink(kafka_any, topics, query)
    plan = sink.begin(0)
    assert plan is not None
    header = pa.list_(pa.struct([("key", pa.string()), ("value", pa.binary())]))
    old = [
        {"key": "sparkscore.query", "value": b"an-older-query"},
        {"key": "sparkscore.batch", "value": b"7"},
        {"key": "sparkscore.id", "value": b"events/0/3"},
        {"key": "sparkscore.error", "value": b"the first reason"},
    ]
    batch = pa.RecordBatch.from_pydict(
        {
            "dest": [1],
            "key": [b"k"],
            "value": [b"not json"],
            "error": ["value is not JSON"],
            "rid": ["events.dlq/0/12"],
            "headers": pa.array([old], header),
        }
    )
    write_task(plan, [batch], partition=0, attempt=0)  # ... and the driver dies before its marker
    seen, _ = written_ids(plan)
    assert seen == {"events.dlq/0/12"}  # a restart would skip it, not write it again
    [rec] = read_records(kafka_any, dlq)
    headers = rec.headers()
    assert ("sparkscore.previous.query", b"an-older-query") in headers
    assert ("sparkscore.previous.error", b"the first reason") in headers
    h = dict(headers)
    assert (h[H_ID], h[H_ERROR]) == (b"events.dlq/0/12", b"value is not JSON")


def test_a_checkpoint_older_than_the_newest_marker_is_an_error_not_a_silent_skip(kafka_any):
    topics = topics_on(kafka_any)
    query = str(uuid.uuid4())
    sink = make_sink(kafka_any, topics, query)
    for batch in range(3):
        plan = sink.begin(batch)
        assert plan is not None
        sink.commit(plan, sink.write_local(plan, records(5, first=5 * batch)))
    restored = make_sink(kafka_any, topics, query)  # a checkpoint restored from a backup at batch 1
    with pytest.raises(SinkError, match=r"checkpoint is behind the commit topic: it runs batch 1 .* batch 2"):
        restored.begin(1)
    assert make_sink(kafka_any, topics, query).begin(2) is None  # Spark's own replay is still skipped


def test_a_writer_marker_with_the_same_first_record_but_another_range_does_not_skip_the_task(kafka_any):
    """minPartitions changed (or the source did): the same task now holds a longer range."""
    topics = topics_on(kafka_any)
    query = str(uuid.uuid4())
    crashed = make_sink(kafka_any, topics, query)
    plan = crashed.begin(0)
    assert plan is not None
    write_task(plan, [arrow_records(10)], partition=0, attempt=0)  # then the driver dies
    restarted = make_sink(kafka_any, topics, query)
    plan = restarted.begin(0)
    assert plan is not None
    summary = write_task(plan, [arrow_records(25)], partition=0, attempt=0).to_pydict()
    assert dict(zip(summary["kind"], summary["value"], strict=False))["skipped"] == 10
    exactly_once(kafka_any, topics, 25)


def test_a_restart_fences_a_driver_killed_inside_its_marker_transaction_before_reading_markers(
    apache, tmp_path, fault_results
):
    """A real process is killed (SIGKILL) with its batch marker sent and its transaction open.

    The restarted sink reads the commit topic with a 10 s timeout, far below the dead writer's
    transaction timeout (60 s): it can only succeed by fencing the dead writer first.
    """
    topics = topics_on(apache)
    out, dlq, commits = topics
    query = str(uuid.uuid4())
    script = tmp_path / "dies_in_its_marker_transaction.py"
    script.write_text(
        f"""
import sys, time
from streaming import kafka_client as kc
from streaming.markers import Marker
from streaming.sink import EffectivelyOnceSink
from streaming.txn import Delivery, flush
from tests.streaming.test_sink import records
sink = EffectivelyOnceSink(client={apache.conf!r}, topics=({out!r}, {dlq!r}), commit_topic={commits!r}, timeout_s=30)
sink.bind({query!r})
plan = sink.begin(0)
result = sink.write_local(plan, records(20))
marker = Marker(plan.query_id, 0, result.ends, result.counts, 0)
producer = sink._begin_txn()
delivery = Delivery()
producer.produce({commits!r}, key=marker.query_id.encode(), value=marker.to_json(),
                 partition=plan.commit_partition, on_delivery=delivery)
flush(producer, delivery, 30, "the marker")
print("marker sent", flush=True)
time.sleep(600)
"""
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "marker sent", "the writer never sent its marker"
        # The kill lands inside the transaction: the marker is on the broker, uncommitted.
        uncommitted = [m for m in read_records(apache, commits, committed=False) if m.key() == query.encode()]
        assert [json.loads(m.value())["batch_id"] for m in uncommitted] == [-1, 0]
        proc.kill()
        proc.wait(POLL_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    restarted = make_sink(apache, topics, query, timeout_s=10.0)
    plan = restarted.begin(0)  # batch 0's marker was never committed: the batch runs again
    assert plan is not None
    restarted.commit(plan, restarted.write_local(plan, records(20)))
    exactly_once(apache, topics, 20)
    assert sum(ids_in(apache, out, dlq, committed=False).values()) == 40  # the dead run's 20 were aborted
    seen = ids_in(apache, out, dlq)
    fault_results["open_marker_transaction.sink"] = tally(seen, {f"events/0/{i}" for i in range(20)}, 0)


def test_a_task_slower_than_the_transaction_timeout_commits_since_its_transaction_opens_after_scoring(
    apache,
):
    """The config's transaction.timeout.ms (2 s here, below the 10 s a config accepts) is in force."""
    topics = topics_on(apache)
    query = str(uuid.uuid4())
    sink = make_sink(apache, topics, query)
    plan = sink.begin(0)
    assert plan is not None
    plan = replace(plan, producer={"transaction.timeout.ms": "2000", "message.timeout.ms": "1500"})

    def slow_scoring():
        yield arrow_records(10)
        time.sleep(5)  # reading, parsing and scoring the rest: longer than the transaction may live
        yield arrow_records(10, first=10)

    write_task(plan, slow_scoring(), partition=0, attempt=0)
    exactly_once(apache, topics, 20)

    # The same 2 s bound, held inside the transaction (between producing and committing): the
    # coordinator aborts it, so the setting reached the writer rather than a default of minutes.
    def stall(point: str, ctx: dict) -> None:
        if point == "writer.before_commit":
            time.sleep(5)

    faults.HOOK = stall
    try:
        with pytest.raises(
            SinkError, match=r"batch 0's p1 .*fenced.*outlived the producer's transaction.timeout"
        ):
            write_task(plan, [arrow_records(5, first=100)], partition=1, attempt=0)
    finally:
        faults.HOOK = None
    exactly_once(apache, topics, 20)


def test_the_log_cleaner_compacts_the_commit_topic_and_a_restart_resumes_from_the_newest_marker(apache):
    """Real compaction (segments rolled every 100 ms, the broker's cleaner), not deleteRecords."""
    out, dlq = apache.topic(partitions=2, prefix="out"), apache.topic(prefix="dlq")
    commits = f"commits-compacted-{uuid.uuid4().hex[:8]}"
    configs = {**COMMIT_TOPIC_CONFIGS, "segment.ms": "100", "min.cleanable.dirty.ratio": "0.01"}
    kc.ensure_topics(apache.conf, {commits: kc.TopicSpec(1, 1, configs)})
    topics = (out, dlq, commits)
    query = str(uuid.uuid4())
    sink = make_sink(apache, topics, query)
    for batch in range(6):
        plan = sink.begin(batch)
        assert plan is not None
        sink.commit(plan, sink.write_local(plan, records(5, first=5 * batch)))
        time.sleep(0.2)  # the next marker starts a new segment: the older ones become cleanable

    def markers() -> list[int]:
        return [
            json.loads(m.value())["batch_id"]
            for m in read_records(apache, commits)
            if m.key() == query.encode() and m.value()
        ]

    producer = kc.make_producer(apache.conf)

    def compacted() -> bool:
        # A write rolls the segment the newest marker sits in, so the cleaner may take the rest.
        producer.produce(commits, key=b"another-query", value=b"{}")
        producer.flush(POLL_TIMEOUT_S)
        time.sleep(0.5)
        return len(markers()) < 7

    wait_until(compacted, "the log cleaner to compact the commit topic", timeout=120)
    assert markers()[-1] == 5
    # Removed by compaction, not by retention or deleteRecords: the log still starts at 0.
    offsets = kc.Offsets(apache.conf)
    try:
        assert offsets.earliest([(commits, 0)]) == {(commits, 0): 0}
    finally:
        offsets.close()

    restarted = make_sink(apache, topics, query)
    assert restarted.begin(5) is None
    plan = restarted.begin(6)
    assert plan is not None
    restarted.commit(plan, restarted.write_local(plan, records(5, first=30)))
    exactly_once(apache, topics, 35)
