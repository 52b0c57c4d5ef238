"""jobs/stream_score.py end to end on Apache Kafka: scoring parity, DLQ, limits, stats, restarts, kill -9.

The drained run (predictions, dead letters, batch limits, window statistics) and
the kill -9 test run with both sources: Spark's JVM connector (``kafka``) and ``kafka_py``.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pytest

from jobs import stream_score
from streaming import query
from streaming.backends import JVM, PYTHON, local_jars
from streaming.query import run
from streaming.sink import H_ERROR, H_ID, H_OFFSET, H_PARTITION, H_QUERY, H_TOPIC
from tests.streaming.conftest import event, read_records, suite_sources
from tests.streaming.job_process import held_then_killed
from udfs.core import load_scorer, score_batch

pytestmark = [pytest.mark.kafka, pytest.mark.spark, pytest.mark.slow]


SOURCES = [pytest.param(JVM, id="source=kafka"), pytest.param(PYTHON, id="source=kafka_py")]


def write_config(
    tmp_path: Path,
    kafka,
    model_path: str,
    *,
    events: str,
    tag: str,
    max_offsets: int = 0,
    stats: str = "",
    source: str = PYTHON,
) -> Path:
    """A stream config reading ``events`` with ``source`` into output topics of its own (``tag`` names them).

    With the JVM source, ``spark.jars`` names the connector jars, for a job started as
    ``python jobs/stream_score.py`` (an in-process ``run`` uses the test session, which has them).
    """
    cfg = tmp_path / f"stream-{tag}.toml"
    jars = f'"spark.jars" = "{",".join(local_jars())}"\n' if source == JVM else ""
    cfg.write_text(
        textwrap.dedent(
            f"""
            [model]
            path = "{model_path}"
            name = "demo_ctr"
            input_columns = ["features"]
            num_features = 4
            device = "cpu"
            batch_size = 256

            [kafka]
            bootstrap_servers = "{kafka.bootstrap}"
            source = "{source}"
            latest_offsets_by = "{kafka.latest_by}"
            poll_timeout_ms = 30000

            [output]
            topic = "predictions-{tag}"
            dlq_topic = "dlq-{tag}"
            commit_topic = "commits-{tag}"
            partitions = 2

            [job]
            checkpoint = "{tmp_path / ("ck-" + tag)}"
            query_name = "q_{tag}"

            [spark]
            "spark.master" = "local[2]"
            "spark.ui.enabled" = "false"
            """
        )
        + jars
        + (textwrap.dedent(stats) if stats else "[stats]\nenabled = false\n")
        + f'\n[input]\ntopic = "{events}"\nstarting_offsets = "earliest"\n'
        + (f"max_offsets_per_trigger = {max_offsets}\n" if max_offsets else "")
    )
    return cfg


def load(path: Path, *args: str):
    return stream_score.load_config(stream_score.parse_args(["--config", str(path), *args]))


def make_events(
    n_good: int, *, start_minute: int = 0, user: str = "u"
) -> tuple[list[bytes], list[list[float] | None], list[int]]:
    """Good events over a few minutes of event time, and bad ones of every kind; (values, features, bad indexes)."""
    values, feats, bad = [], [], []
    for i in range(n_good):
        f = [18.0 + i % 60, float(i % 9), 5.0 + 3.5 * (i % 40), float(i % 20)]
        ts = f"2026-01-01T00:{start_minute + i * 3 // n_good:02d}:{i * 37 % 60:02d}Z"
        values.append(event(f"{user}{i}", f, ts))
        feats.append(f)
    broken = [
        ([30.0, None, 19.5, 3.0], None),
        ([1.0, 2.0, 3.0], None),
        ([30.0, float("nan"), 1.0, 2.0], None),
        (None, b"not json at all"),
        (None, json.dumps({"features": [1, 2, 3, 4], "timestamp": "2026-01-01T00:00:00Z"}).encode()),
    ]
    for j, (f, raw) in enumerate(broken):
        bad.append(len(values))
        values.append(raw if raw is not None else event(f"{user}bad{j}", f))
        feats.append(f)
    return values, feats, bad


def by_id(records) -> dict[str, object]:
    return {r.headers[H_ID].decode(): r for r in records}


@pytest.fixture(scope="module", params=SOURCES)
def drained(request, spark, kafka, stream_model, models, tmp_path_factory):
    """One availableNow run over 120 good and 5 bad events, maxOffsetsPerTrigger 50, stats on (per source)."""
    source = request.param
    tmp = tmp_path_factory.mktemp(f"drained-{source}")
    events = kafka.topic(partitions=2, prefix="events")
    values, feats, bad = make_events(120)
    kafka.produce(events, values)
    cfg = load(
        write_config(
            tmp,
            kafka,
            models["torchscript"],
            events=events,
            tag=f"drained-{source}",
            max_offsets=50,
            source=source,
            stats=f"""
            [stats]
            topic = "stats-drained-{source}"
            window = "1 minute"
            watermark = "0 seconds"
            """,
        ),
    )
    summary = run(spark, cfg, stream_model, available_now=True)
    assert summary.backend == source
    by_value = {v: i for i, v in enumerate(values)}
    return {
        "cfg": cfg,
        "summary": summary,
        "values": values,
        "feats": feats,
        "bad": bad,
        # record id ("topic/partition/offset") -> index of the produced value
        "index": {f"{r.topic}/{r.partition}/{r.offset}": by_value[r.value] for r in kafka.read(events)},
    }


def test_every_good_event_gets_the_cores_prediction_once_keyed_by_user(kafka, stream_model, drained):
    cfg, values, feats, bad = drained["cfg"], drained["values"], drained["feats"], set(drained["bad"])
    good = [i for i in range(len(values)) if i not in bad]
    direct = score_batch(
        pa.table({"features": pa.array([feats[i] for i in good], pa.list_(pa.float64()))}),
        load_scorer(stream_model),
    ).to_pydict()
    expected = {f"u{i}": direct["prediction"][k] for k, i in enumerate(good)}

    preds = kafka.read(cfg.output.topic)
    assert len(preds) == len(good)
    assert Counter(r.headers[H_ID] for r in preds).most_common(1)[0][1] == 1
    for r in preds:
        body = json.loads(r.value)
        assert list(body) == ["user_id", "prediction", "timestamp", "model_version"]
        assert r.key == body["user_id"].encode()
        assert body["prediction"] == pytest.approx(expected[body["user_id"]], abs=1e-6)
        assert body["model_version"] == stream_model.version
        src = json.loads(values[drained["index"][r.headers[H_ID].decode()]])
        assert datetime.fromisoformat(body["timestamp"]) == datetime.fromisoformat(src["timestamp"])


def test_bad_messages_go_to_the_dlq_with_original_bytes_reason_and_position(kafka, stream_model, drained):
    cfg, values, feats, bad = drained["cfg"], drained["values"], drained["feats"], drained["bad"]
    core_errors = score_batch(
        pa.table({"features": pa.array(feats[bad[0] : bad[0] + 3], pa.list_(pa.float64()))}),
        load_scorer(stream_model),
    ).to_pydict()["error"]

    dlq = by_id(kafka.read(cfg.output.dlq_topic))
    assert len(dlq) == len(bad) == 5
    reasons = {}
    for rid, r in dlq.items():
        i = drained["index"][rid]
        assert r.value == values[i]
        topic, part, off = rid.split("/")
        assert (r.headers[H_TOPIC], r.headers[H_PARTITION], r.headers[H_OFFSET]) == tuple(
            x.encode() for x in (topic, part, off)
        )
        reasons[i] = r.headers[H_ERROR].decode()
    assert [reasons[i] for i in bad[:3]] == core_errors  # the core's reasons, word for word
    assert reasons[bad[3]].startswith("value is not JSON") and reasons[bad[4]] == "missing user_id"


def test_max_offsets_per_trigger_bounds_every_batch_and_counts_reach_the_progress(drained):
    summary, total = drained["summary"], len(drained["values"])
    with_rows = [p for p in summary.progress if p["numInputRows"] > 0]
    assert len(with_rows) >= math.ceil(total / 50) and all(p["numInputRows"] <= 50 for p in with_rows)
    observed = [p["observedMetrics"]["sparkscore"] for p in with_rows]
    assert sum(o["events"] for o in observed) == total
    assert sum(o["dlq"] for o in observed) == 5 and sum(o["predictions"] for o in observed) == total - 5
    assert summary.totals[drained["cfg"].output.topic] == total - 5


def test_window_stats_match_the_predictions_per_closed_window(kafka, drained):
    cfg = drained["cfg"]
    windows: dict[str, list[float]] = defaultdict(list)
    for r in kafka.read(cfg.output.topic):
        body = json.loads(r.value)
        ts = datetime.fromisoformat(body["timestamp"])
        windows[ts.strftime("%Y-%m-%dT%H:%M:00.000000Z")].append(body["prediction"])
    stats = {json.loads(r.value)["window_start"]: json.loads(r.value) for r in kafka.read(cfg.stats.topic)}
    # The watermark (0 s behind the newest event) closes every window but the last one.
    assert sorted(stats) == sorted(windows)[:-1]
    for start, s in stats.items():
        assert s["count"] == len(windows[start])
        assert s["mean"] == pytest.approx(sum(windows[start]) / len(windows[start]), abs=1e-12)
        assert s["max"] == max(windows[start])


def test_a_restart_on_the_same_checkpoint_scores_only_new_events(
    spark, kafka, stream_model, models, tmp_path
):
    events = kafka.topic(partitions=2, prefix="events")
    values, _, _ = make_events(30)
    kafka.produce(events, values)
    cfg = load(write_config(tmp_path, kafka, models["torchscript"], events=events, tag="restart"))
    first = run(spark, cfg, stream_model, available_now=True)
    again = run(spark, cfg, stream_model, available_now=True)
    more, _, _ = make_events(12, start_minute=10, user="late")
    kafka.produce(events, more[:12])
    last = run(spark, cfg, stream_model, available_now=True)

    assert first.totals[cfg.output.topic] == 30 and again.batches == 0
    assert last.totals[cfg.output.topic] == 12
    ids = Counter(r.headers[H_ID] for r in kafka.read(cfg.output.topic))
    assert sum(ids.values()) == 42 and set(ids.values()) == {1}


# One source in `make test` (the driver windows kill both sources' drivers); both in `make faults`.
@pytest.mark.parametrize("source", suite_sources(JVM), ids=lambda s: f"source={s}")
def test_kill_9_mid_stream_then_restart_leaves_exactly_one_record_per_event(
    spark, kafka, stream_model, models, tmp_path, source
):
    events = kafka.topic(partitions=2, prefix="events")
    values, _, bad = make_events(200)
    kafka.produce(events, values)
    path = write_config(
        tmp_path,
        kafka,
        models["torchscript"],
        events=events,
        tag=f"kill-{source}",
        max_offsets=20,
        source=source,
    )
    cfg = load(path)
    # Batch 2 holds still with its records sent and its transaction open (before its marker):
    # the kill lands there, inside the transaction, not between two batches.
    with held_then_killed(
        path,
        tmp_path,
        "driver.before_marker:batch=2,action=sleep,seconds=600",
        "driver.before_marker-driver-b2.fired",
        "batch 2 of the job that gets killed to hold its transaction open",
    ):
        o = cfg.output
        committed = sum(len(read_records(kafka, t)) for t in (o.topic, o.dlq_topic))
        sent = sum(len(read_records(kafka, t, committed=False)) for t in (o.topic, o.dlq_topic))
        assert sent > committed > 0, "the kill must land inside an open transaction"
    written_before = kafka.count(cfg.output.topic) + kafka.count(cfg.output.dlq_topic)
    assert written_before == committed < len(values), "the job finished before it was killed"

    # Same topics and checkpoint; no batch limit, so the rest drains in one go.
    restart = load(
        write_config(
            tmp_path, kafka, models["torchscript"], events=events, tag=f"kill-{source}", source=source
        )
    )
    summary = run(spark, restart, stream_model, available_now=True)
    assert summary.backend == source

    # What a read_committed consumer sees (the dead run's open transaction was aborted).
    preds, dlq = read_records(kafka, cfg.output.topic), read_records(kafka, cfg.output.dlq_topic)
    ids = Counter(dict(r.headers())[H_ID] for r in preds + dlq)
    assert len(ids) == len(values) and set(ids.values()) == {1}, (written_before, ids.most_common(3))
    assert len(preds) == len(values) - len(bad) and len(dlq) == len(bad)
    assert summary.batches >= 1


def test_batches_written_by_the_driver_equal_those_written_by_the_executors(
    spark, kafka, stream_model, models, tmp_path, monkeypatch
):
    """Small batches skip the executors' write stage; the records and headers must be the same either way."""
    events = kafka.topic(partitions=2, prefix="events")
    values, _, bad = make_events(40)
    kafka.produce(events, values)

    def written(tag: str, driver_max: int):
        monkeypatch.setattr(query, "DRIVER_WRITE_MAX_EVENTS", driver_max)
        cfg = load(
            write_config(tmp_path, kafka, models["torchscript"], events=events, tag=tag, max_offsets=10)
        )
        summary = run(spark, cfg, stream_model, available_now=True)
        records = {}
        for r in kafka.read(cfg.output.topic) + kafka.read(cfg.output.dlq_topic):
            # The query id differs between the two runs, and a record without a key lands on
            # a random partition; everything else must not differ.
            headers = {k: v for k, v in r.headers.items() if k != H_QUERY}
            part = r.partition if r.key is not None else None
            records[r.headers[H_ID]] = (r.topic.split("-")[0], part, r.key, r.value, headers)
        return summary, records

    by_driver, from_driver = written("bydriver", 10**9)
    by_executors, from_executors = written("byexecutors", -1)
    assert by_driver.driver_batches >= 3 and by_executors.driver_batches == 0
    assert by_driver.batches == by_executors.batches
    assert len(from_driver) == len(values) and from_driver == from_executors
    assert sum(1 for t, *_ in from_driver.values() if t == "dlq") == len(bad)
