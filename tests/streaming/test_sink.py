"""The effectively-once sink against a real broker: markers, replays, partial batches, retried tasks."""

from __future__ import annotations

import json
import uuid
from collections import Counter

import pyarrow as pa
import pytest

from streaming import kafka_client as kc
from streaming.sink import (
    H_ERROR,
    H_ID,
    H_OFFSET,
    H_PARTITION,
    H_TOPIC,
    ExactlyOnceSink,
    produce,
    record_rows,
    written_ids,
)
from tests.streaming.conftest import POLL_TIMEOUT_S

pytestmark = pytest.mark.kafka


@pytest.fixture
def topics(kafka):
    return (
        kafka.topic(partitions=2, prefix="out"),
        kafka.topic(partitions=1, prefix="dlq"),
        kafka.topic(prefix="commits"),
    )


def make_sink(kafka, topics, query_id: str) -> ExactlyOnceSink:
    out, dlq, commits = topics
    sink = ExactlyOnceSink(
        client=kafka.conf,
        topics=(out, dlq),
        commit_topic=commits,
        latest_by=kc.FETCH_PROBE,
        timeout_s=POLL_TIMEOUT_S,
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


def ids_in(kafka, topic: str) -> Counter:
    return Counter(r.headers[H_ID].decode() for r in kafka.read(topic))


def test_a_batch_cut_short_by_a_crash_is_finished_after_restart_without_duplicates(kafka, topics):
    out, dlq, _ = topics
    query = str(uuid.uuid4())
    crashed = make_sink(kafka, topics, query)
    plan = crashed.begin(0)
    assert plan is not None
    produce(crashed.producer, plan, records(40)[:23])  # the process dies here: no commit marker
    crashed.close()

    restarted = make_sink(kafka, topics, query)
    plan = restarted.begin(0)
    assert plan is not None and plan.skip == {f"events/0/{i}" for i in range(23)}
    result = restarted.write_local(plan, records(40))
    restarted.commit(plan, result)

    assert result.skipped == 23 and sum(result.counts.values()) == 17
    written = ids_in(kafka, out) + ids_in(kafka, dlq)
    assert written == Counter(f"events/0/{i}" for i in range(40))
    assert set(ids_in(kafka, dlq)) == {f"events/0/{i}" for i in range(0, 40, 5)}


def test_a_committed_batch_is_skipped_when_spark_replays_it(kafka, topics):
    out, _, _ = topics
    query = str(uuid.uuid4())
    sink = make_sink(kafka, topics, query)
    plan = sink.begin(0)
    assert plan is not None
    sink.commit(plan, sink.write_local(plan, records(10)))

    replay = make_sink(kafka, topics, query)
    assert replay.begin(0) is None
    plan = replay.begin(1)
    assert plan is not None and plan.skip == frozenset()
    replay.commit(plan, replay.write_local(plan, records(10, first=10)))
    assert sum(ids_in(kafka, out).values()) == 16 and max(ids_in(kafka, out).values()) == 1


def test_a_retried_task_finds_only_what_this_query_wrote_for_this_batch(kafka, topics):
    query, other = str(uuid.uuid4()), str(uuid.uuid4())
    sink, stranger = make_sink(kafka, topics, query), make_sink(kafka, topics, other)
    plan, foreign = sink.begin(0), stranger.begin(0)
    assert plan is not None and foreign is not None
    produce(stranger.producer, foreign, records(5))
    produce(sink.producer, plan, records(8)[:3])
    seen, ends = written_ids(plan)
    assert seen == {"events/0/0", "events/0/1", "events/0/2"}
    assert sum(ends[topics[0]].values()) + sum(ends[topics[1]].values()) == 8


def test_commit_markers_are_keyed_by_query_and_record_batch_and_positions(kafka, topics):
    out, dlq, commits = topics
    query = str(uuid.uuid4())
    sink = make_sink(kafka, topics, query)
    for batch in (0, 1):
        plan = sink.begin(batch)
        assert plan is not None
        sink.commit(plan, sink.write_local(plan, records(10, first=10 * batch)))
    markers = [(r.key, json.loads(r.value)) for r in kafka.read(commits)]
    assert [key for key, _ in markers] == [query.encode()] * 3
    assert [m["batch_id"] for _, m in markers] == [-1, 0, 1]
    last = markers[-1][1]
    ends = {t: {str(p): off for p, off in kafka.end_offsets(t).items()} for t in (out, dlq)}
    assert {t: {p: o for p, o in parts.items() if o} for t, parts in last["positions"].items()} == {
        t: {p: o for p, o in parts.items() if o} for t, parts in ends.items()
    }
    assert last["counts"] == {out: 8, dlq: 2, "skipped": 0}


def test_dead_letters_keep_the_original_bytes_with_error_and_source_headers(kafka, topics):
    _, dlq, _ = topics
    sink = make_sink(kafka, topics, str(uuid.uuid4()))
    plan = sink.begin(0)
    assert plan is not None
    batch = pa.RecordBatch.from_pydict(
        {
            "dest": [1],
            "key": [b"k"],
            "value": [b"\xff not json"],
            "error": ["value is not JSON"],
            "rid": ["events/3/41"],
        }
    )
    sink.commit(plan, sink.write_local(plan, record_rows(batch)))
    [rec] = kafka.read(dlq)
    assert (rec.key, rec.value) == (b"k", b"\xff not json")
    assert rec.headers[H_ERROR] == b"value is not JSON"
    assert (rec.headers[H_TOPIC], rec.headers[H_PARTITION], rec.headers[H_OFFSET]) == (b"events", b"3", b"41")
