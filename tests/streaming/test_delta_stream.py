"""The stream job with Delta Lake: Kafka -> Delta exactly once (also across a kill -9 between the
Delta commit and Spark's commit log), a Delta table as the source, and the configs it refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest
from chispa import assert_approx_df_equality

from streaming import kafka_client as kc
from streaming.config import StreamConfig
from streaming.query import run
from tests.streaming.conftest import (
    ROOT,
    event,
    read_records,
    stream_config,
    stream_config_dict,
    write_toml,
)
from tests.streaming.job_process import held_then_killed
from udfs.config import from_dict
from udfs.core import load_scorer, score_batch
from udfs.delta import local_delta_jars
from udfs.errors import ConfigError


def _events(
    n: int, user: str = "u", minutes: int = 1
) -> tuple[list[bytes], dict[str, list[float]], dict[str, str]]:
    """Events of ``n`` users spread over ``minutes`` minutes of event time: (values, features, times)."""
    feats = {f"{user}{i}": [18.0 + i, float(i % 9), 5.0 + 3.5 * i, float(i % 20)] for i in range(n)}
    times = {u: f"2026-01-01T00:{i * minutes // n:02d}:{i % 60:02d}Z" for i, u in enumerate(feats)}
    return [event(u, f, times[u]) for u, f in feats.items()], feats, times


def _expected(spark, model, feats: dict[str, list[float]], times: dict[str, str] | str):
    """What the core says for these users: the prediction table's columns, as a frame."""
    users = sorted(feats)
    direct = score_batch(
        pa.table({"features": pa.array([feats[u] for u in users], pa.list_(pa.float64()))}),
        load_scorer(model),
    ).to_pydict()

    def when(u: str) -> datetime:
        ts = times if isinstance(times, str) else times[u]
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).astimezone(UTC).replace(tzinfo=None)

    rows = [(u, p, when(u), model.version) for u, p in zip(users, direct["prediction"], strict=True)]
    return spark.createDataFrame(
        rows, "user_id string, prediction double, timestamp timestamp, model_version string"
    )


def _delta_txns(path: Path) -> dict[str, int]:
    """appId -> the newest txnVersion Delta recorded in the table's log (its JSON commits)."""
    found: dict[str, int] = {}
    for commit in sorted((path / "_delta_log").glob("*.json")):
        for line in commit.read_text().splitlines():
            txn = json.loads(line).get("txn")
            if txn:
                found[txn["appId"]] = max(found.get(txn["appId"], -1), int(txn["version"]))
    return found


@pytest.mark.kafka
@pytest.mark.spark
@pytest.mark.slow
def test_kafka_to_delta_writes_each_events_prediction_once_as_the_core_scores_it(
    spark, kafka, stream_model, models, tmp_path
):
    tag = "k2d"
    events = kafka.topic(partitions=2, prefix="events")
    values, feats, times = _events(24, minutes=3)
    bad = [b"not json", event("ubad", [1.0, 2.0])]
    kafka.produce(events, values + bad)
    table = tmp_path / "predictions"
    cfg = stream_config(
        kafka,
        tag,
        model_path=models["torchscript"],
        input={"topic": events},
        output={"kind": "delta", "path": str(table)},
        stats={"enabled": True, "watermark": "0 seconds"},
        job={"checkpoint": str(tmp_path / "ck")},
    )
    first = run(spark, cfg, stream_model, available_now=True)

    got = spark.read.format("delta").load(str(table))
    assert got.columns == [
        "user_id",
        "prediction",
        "timestamp",
        "model_version",
        "source_topic",
        "source_partition",
        "source_offset",
        "source_id",
        "scored_at",
    ]
    assert_approx_df_equality(
        got.select("user_id", "prediction", "timestamp", "model_version").orderBy("user_id"),
        _expected(spark, stream_model, feats, times),
        1e-6,
    )
    ids = Counter(r["source_id"] for r in got.collect())
    positions = {f"{r.topic()}/{r.partition()}/{r.offset()}" for r in read_records(kafka, events)}
    assert set(ids.values()) == {1} and set(ids) < positions
    # Dead letters on the Kafka topic (the default), each once, the original bytes kept.
    dlq = read_records(kafka, cfg.output.dlq_topic)
    assert sorted(m.value() for m in dlq) == sorted(bad)
    assert first.batches == 1 and first.totals == {"predictions": 24, "dead_letters": 2, "skipped": 0}
    assert "24 predictions on Delta table" in first.render(cfg)
    # No predictions topic: the job creates only what it writes (dead letters, markers, stats).
    topics = kc.topic_partitions(kc.make_admin(kafka.conf), 30)
    assert cfg.output.topic not in topics and cfg.output.dlq_topic in topics
    # Window statistics of the table's rows on the stats topic: every window but the newest closed.
    windows: dict[str, list[float]] = {}
    for r in got.collect():
        windows.setdefault(r["timestamp"].strftime("%Y-%m-%dT%H:%M:00.000000Z"), []).append(r["prediction"])
    records = [json.loads(m.value()) for m in read_records(kafka, cfg.stats.topic)]
    stats = {st["window_start"]: st for st in records}
    assert sorted(stats) == sorted(windows)[:-1] and first.stats_windows == 2
    for start, st in stats.items():
        assert st["count"] == len(windows[start]) and st["max"] == max(windows[start])


@pytest.mark.spark
@pytest.mark.slow
def test_a_delta_source_scores_only_the_rows_appended_since_the_last_run(spark, stream_model, tmp_path):
    """Delta -> Delta (catalog tables, dead letters in a Delta table, no Kafka at all)."""
    source = tmp_path / "events"
    schema = "user_id string, features array<double>, timestamp timestamp, country string"
    when = datetime(2026, 1, 1, 0, 5)
    old = {f"d{i}": [30.0 + i, 1.0, 2.0, float(i)] for i in range(6)}
    spark.createDataFrame([(u, f, when, "fr") for u, f in old.items()], schema).write.format("delta").save(
        str(source)
    )
    sections = {
        "model": {
            "path": stream_model.spec.path,
            "name": "demo_ctr",
            "input_columns": ["features"],
            "num_features": 4,
            "device": "cpu",
        },
        "input": {"kind": "delta", "path": str(source), "max_files_per_trigger": 1},
        "output": {"kind": "delta", "table": "default.d2d_other", "dlq_table": "default.d2d_dead"},
        "stats": {"enabled": False},
        "job": {"checkpoint": str(tmp_path / "ck"), "query_name": "q_d2d"},
    }
    # A table of other columns is refused before the query starts, in one sentence.
    spark.createDataFrame([("x", 1.0)], "user_id string, score double").write.format("delta").saveAsTable(
        "default.d2d_other"
    )
    with pytest.raises(
        ConfigError, match=r"^the prediction table 'default.d2d_other' has no columns \['prediction',"
    ):
        run(spark, from_dict(StreamConfig, sections, where="test"), stream_model, available_now=True)
    assert spark.table("default.d2d_other").count() == 1 and not (tmp_path / "ck").exists()

    sections["output"] = {
        **sections["output"],
        "table": "default.d2d_predictions",
        "partition_by": ["model_version"],
    }
    cfg = from_dict(StreamConfig, sections, where="test")
    first = run(spark, cfg, stream_model, available_now=True)
    new = {f"n{i}": [50.0 + i, 0.0, 9.0, 2.0] for i in range(3)}
    rows = [(u, f, when, "de") for u, f in new.items()] + [(None, [1.0, 2.0, 3.0, 4.0], when, "de")]
    spark.createDataFrame(rows, schema).write.format("delta").mode("append").save(str(source))
    second = run(spark, cfg, stream_model, available_now=True)

    assert first.totals["predictions"] == 6 and first.batches >= 2  # maxFilesPerTrigger passed through
    assert second.totals == {"predictions": 3, "dead_letters": 1, "skipped": 0}
    got = spark.table("default.d2d_predictions")
    detail = spark.sql("DESCRIBE DETAIL default.d2d_predictions").first()
    assert detail is not None and detail["partitionColumns"] == ["model_version"]
    assert_approx_df_equality(
        got.select("user_id", "prediction", "timestamp", "model_version").orderBy("user_id"),
        _expected(spark, stream_model, {**old, **new}, "2026-01-01T00:05:00Z"),
        1e-6,
    )
    assert {r["source_topic"] for r in got.collect()} == {str(source)}
    assert len({r["source_id"] for r in got.collect()}) == 9
    dead = spark.table("default.d2d_dead").collect()
    assert len(dead) == 1 and dead[0]["error"] == "missing user_id"
    assert json.loads(dead[0]["value"])["country"] == "de"  # the row itself, as JSON


@pytest.mark.kafka
@pytest.mark.spark
@pytest.mark.slow
def test_kill_9_after_the_delta_commit_before_sparks_commit_log_then_restart_writes_each_event_once(
    spark, kafka, stream_model, models, tmp_path
):
    tag = "delta-kill"
    events = kafka.topic(partitions=2, prefix="events")
    values, feats, times = _events(20)
    bad = [b"{}", b"not json"]
    kafka.produce(events, values + bad)
    table, dead = tmp_path / "predictions", tmp_path / "dead_letters"
    checkpoint = tmp_path / "ck"
    sections = {
        "input": {"topic": events, "max_offsets_per_trigger": 8},
        "output": {"kind": "delta", "path": str(table), "dlq_path": str(dead)},
        "job": {"checkpoint": str(checkpoint)},
        "spark": {
            "spark.master": "local[2]",
            "spark.ui.enabled": "false",
            "spark.databricks.delta.snapshotPartitions": "2",
        },
    }
    path = write_toml(
        stream_config_dict(kafka, tag, model_path=models["torchscript"], **sections), tmp_path / "k.toml"
    )
    # Batch 0 holds still after its Delta commit, before Spark logs the batch as done: the kill lands there.
    with held_then_killed(
        path,
        tmp_path,
        "delta.after_write:batch=0,action=sleep,seconds=600",
        "delta.after_write-driver-b0.fired",
        "batch 0 of the job that gets killed to hold after its Delta commit",
    ):
        query_id = json.loads((checkpoint / "scoring" / "metadata").read_text())["id"]
        # The window: Delta has batch 0 (its txn version), Spark's commit log does not.
        assert _delta_txns(table) == {f"sparkscore.{query_id}.predictions": 0}
        assert (checkpoint / "scoring" / "offsets" / "0").exists()
        assert not (checkpoint / "scoring" / "commits" / "0").exists()
        written_before = spark.read.format("delta").load(str(table)).count()
    assert 0 < written_before < len(values), "the job finished before it was killed"

    # Same checkpoint and tables; no batch limit, so the rest drains in one batch after the replay.
    sections["input"] = {"topic": events}
    restart = stream_config(kafka, tag, model_path=models["torchscript"], **sections)
    summary = run(spark, restart, stream_model, available_now=True)

    got = spark.read.format("delta").load(str(table))
    assert Counter(Counter(r["source_id"] for r in got.collect()).values()) == {1: len(values)}
    assert_approx_df_equality(
        got.select("user_id", "prediction", "timestamp", "model_version").orderBy("user_id"),
        _expected(spark, stream_model, feats, times),
        1e-6,
    )
    dead_rows = spark.read.format("delta").load(str(dead)).collect()
    assert sorted(r["value"] for r in dead_rows) == sorted(bad)
    # Spark re-ran batch 0 and Delta skipped it: its rows were counted as written before the restart.
    assert summary.batches == 2 and summary.totals["skipped"] == written_before


def _raw(**sections):
    base = {
        "model": {"path": "m.pt", "input_columns": ["features"], "num_features": 4},
        "kafka": {"bootstrap_servers": "127.0.0.1:9092"},
        "input": {"topic": "events"},
        "stats": {"enabled": False},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return base


def test_format_delta_is_kind_delta_and_delta_to_delta_with_a_dead_letter_table_needs_no_kafka():
    cfg = from_dict(
        StreamConfig,
        _raw(
            input={"topic": None, "format": "delta", "table": "db.events", "starting_version": "latest"},
            output={"kind": "delta", "table": "db.predictions", "dlq_table": "db.dead"},
        ),
        where="stream config",
    )
    assert cfg.input.kind == "delta" and cfg.input.starting_version == "latest"
    assert cfg.kafka_uses == [] and cfg.uses_delta


@pytest.mark.parametrize(
    ("sections", "sentence"),
    [
        (
            {"output": {"kind": "delta"}},
            'kind = "delta" needs exactly one of [output] path = "/data/table" (a Delta path) or table = '
            '"db.name" (a catalog table); got neither',
        ),
        (
            {"input": {"kind": "delta", "topic": None, "table": "db.t", "path": "/x"}},
            "got ['path', 'table']",
        ),
        (
            {"output": {"kind": "delta", "path": "/x", "dlq_pth": "/y"}},
            "unknown key(s) ['dlq_pth'] in [stream config.output]",
        ),
        (
            {"output": {"path": "/x"}},
            "['path'] are Delta settings: set kind = \"delta\" to write a Delta table",
        ),
        (
            {"output": {"kind": "delta", "path": "/x"}, "kafka": {"bootstrap_servers": ""}},
            "[kafka] bootstrap_servers must name at least one broker, e.g. '127.0.0.1:9092' (this job uses "
            "Kafka for its input, its dead letters",
        ),
    ],
    ids=["no-path-or-table", "path-and-table", "unknown-key", "delta-key-on-kafka", "no-broker"],
)
def test_delta_configs_that_cannot_work_are_refused_in_one_sentence(sections, sentence):
    raw = _raw(**sections)
    raw["input"] = {k: v for k, v in raw["input"].items() if v is not None}
    with pytest.raises(ConfigError) as err:
        from_dict(StreamConfig, raw, where="stream config")
    assert sentence in str(err.value) and "\n" not in str(err.value)


@pytest.mark.spark
@pytest.mark.slow
def test_a_delta_output_without_deltas_jars_exits_2_with_the_batch_jobs_sentence_and_writes_nothing(
    tmp_path, stream_model
):
    """spark-submit without Delta's jars (only Kafka's): refused before anything is read or written."""
    table = tmp_path / "predictions"
    raw = _raw(
        model={"path": stream_model.spec.path, "name": "demo_ctr", "device": "cpu"},
        input={"kind": "delta", "topic": None, "path": str(tmp_path / "src")},
        output={"kind": "delta", "path": str(table), "dlq_path": str(tmp_path / "dead")},
        job={"checkpoint": str(tmp_path / "ck")},
        spark={"spark.ui.enabled": "false"},
    )
    del raw["kafka"]
    raw["input"] = {k: v for k, v in raw["input"].items() if v is not None}
    path = write_toml(raw, tmp_path / "nodelta.toml")
    submit = Path(sys.executable).parent / "spark-submit"
    done = subprocess.run(
        [str(submit), "--master", "local[1]", str(ROOT / "jobs" / "stream_score.py"), "--config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYSPARK_PYTHON": sys.executable},
    )
    said = done.stdout + done.stderr  # spark-submit's Python runner sends the job's stderr to its stdout
    assert done.returncode == 2, said[-2000:]
    error = [line for line in said.splitlines() if line.startswith("[sparkscore] error")]
    assert error == [
        "[sparkscore] error: this config uses Delta Lake but its jars are not on Spark's class path; pass "
        "--packages io.delta:delta-spark_2.13:4.4.0 to spark-submit (or run `make jars` and pass "
        f"--jars {','.join(local_delta_jars())})"
    ]
    assert "Traceback" not in said
    assert not table.exists() and not (tmp_path / "ck").exists()
