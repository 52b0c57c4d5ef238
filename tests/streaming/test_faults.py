"""Every crash window of the stream job's executor writers, hit on purpose, then a restart; lost offsets.

Each scenario test runs the job on Apache Kafka, with the JVM ``kafka`` source and with
``kafka_py``, until a named writer fault point fires (the task's Python worker exits,
i.e. the task dies), restarts it on the same checkpoint, and checks that the output and
dead-letter topics hold exactly one record per event for ``read_committed`` consumers.
Where the window leaves committed output behind, the restart must have de-duplicated some
records; where it leaves an aborted transaction, ``read_uncommitted`` consumers see it (the
documented limit). The driver's windows are in ``test_faults_driver.py``; the scenarios in
``fault_scenarios.py``. ``make faults`` writes the figures to ``bench/results/faults.json``.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from streaming import faults
from streaming.query import QueryFailed, run
from streaming.sink import H_ID
from tests.streaming.conftest import event, on_source, read_records, stream_config, tally
from tests.streaming.fault_scenarios import events

pytestmark = [pytest.mark.kafka, pytest.mark.spark, pytest.mark.slow]

# -- batch 0: task writers on the executors ---------------------------------------------------

# p1 fails only once p0 has committed, so the batch is partly committed when the job dies.
AFTER_P0 = "after=writer.after_commit-p0-b0"


@on_source("kafka_py")
def test_a_task_killed_before_it_produces(scenario, fault_results):
    s = scenario("before-produce")
    s.crash(f"writer.before_produce:batch=0,writer=p1,action=exit,{AFTER_P0}")
    deduplicated = s.restart()
    assert deduplicated == 4  # p0's records, committed before the crash
    s.check("before_produce", deduplicated, fault_results)


@on_source("kafka")
def test_a_task_killed_after_k_of_its_records(scenario, fault_results):
    s = scenario("after-k")
    s.crash(f"writer.after_records:k=3,batch=0,writer=p1,action=exit,{AFTER_P0}")
    # The 3 records p1 sent are in its open transaction: aborted when its successor opens.
    deduplicated = s.restart()
    assert deduplicated == 4
    s.check("after_k_of_n", deduplicated, fault_results)
    assert sum(s.seen(committed=False).values()) == 16 + 3


@on_source("kafka_py")
def test_a_task_killed_with_all_its_records_sent_before_it_commits(scenario, fault_results):
    s = scenario("before-commit")
    s.crash(f"writer.before_commit:batch=0,writer=p1,action=exit,{AFTER_P0}")
    deduplicated = s.restart()
    assert deduplicated == 4  # p0's; p1's 4 were in its open transaction, aborted
    s.check("writer_before_commit", deduplicated, fault_results)
    assert sum(s.seen(committed=False).values()) == 16 + 4


@on_source("kafka")
def test_a_task_killed_just_after_it_committed(scenario, fault_results):
    s = scenario("after-commit")
    s.crash(f"writer.after_commit:batch=0,writer=p1,action=exit,{AFTER_P0}")
    deduplicated = s.restart()
    assert deduplicated == 8  # both tasks had committed: the batch failed, but its records are all there
    s.check("writer_after_commit", deduplicated, fault_results)


@on_source("kafka_py")
def test_sparks_own_task_retry_writes_a_killed_tasks_records_once_in_the_same_run(scenario, fault_results):
    """local[2, 3]: Spark retries a failed task itself (spark.task.maxFailures 3), no restart needed."""
    s = scenario("task-retry")
    rc, log = s.run_job("writer.after_records:k=3,batch=0,writer=p1,action=exit", master="local[2,3]")
    assert rc == 0, log
    assert (s.folder / "writer.after_records-p1-b0.fired").exists()
    assert "16 events ->" in log, log
    s.check("task_retry", 0, fault_results)
    assert sum(s.seen(committed=False).values()) == 16 + 3  # the killed attempt's 3, aborted


def test_fault_specs_are_checked():
    with pytest.raises(ValueError, match="unknown point"):
        faults.Fault.parse("writer.somewhere")
    with pytest.raises(ValueError, match="action must be"):
        faults.Fault.parse("writer.before_produce:action=explode")
    assert faults.Fault.parse("writer.after_records:k=3,writer=p1,after=x") == faults.Fault(
        "writer.after_records", k=3, writer="p1", after="x"
    )
    assert json.loads(json.dumps(faults.POINTS))  # the names are plain strings


# -- expired offsets: retention or deleteRecords ran while the job was down --------------------


def test_expired_offsets_with_failondataloss_off_read_what_is_left_and_count_the_rest(
    apache, spark, stream_model, models, tmp_path, fault_results
):
    topic = apache.topic(partitions=1, prefix="events-expired")
    first, later = events()[:10], [event(f"v{i}", [30.0, 2.0, 5.0, 1.0]) for i in range(10)]
    apache.produce(topic, first)
    cfg = stream_config(
        apache,
        f"expired-{topic[-6:]}",
        model_path=models["torchscript"],
        input={"topic": topic, "fail_on_data_loss": False},
        job={"checkpoint": str(tmp_path / "checkpoint")},
    )
    run(spark, cfg, stream_model, available_now=True)
    apache.produce(topic, later)  # offsets 10..19, then retention removes 10..14
    from confluent_kafka import TopicPartition

    from streaming import kafka_client as kc

    admin = kc.make_admin(apache.conf)  # kept: a dropped client never resolves its futures
    for fut in admin.delete_records([TopicPartition(topic, 0, 15)]).values():
        fut.result()
    summary = run(spark, cfg, stream_model, available_now=True)

    assert summary.totals.get("lost") == 5
    o = cfg.output
    seen = Counter(
        dict(m.headers())[H_ID].decode() for t in (o.topic, o.dlq_topic) for m in read_records(apache, t)
    )
    expected = {f"{topic}/0/{i}" for i in [*range(10), *range(15, 20)]}
    fault_results["expired_offsets.kafka_py"] = tally(seen, expected, summary.totals.get("skipped", 0))
    assert seen == Counter(expected)


def test_expired_offsets_fail_the_query_naming_them_by_default(apache, spark, stream_model, models, tmp_path):
    topic = apache.topic(partitions=1, prefix="events-expired")
    apache.produce(topic, events()[:4])
    cfg = stream_config(
        apache,
        f"expired-strict-{topic[-6:]}",
        model_path=models["torchscript"],
        input={"topic": topic},
        job={"checkpoint": str(tmp_path / "checkpoint")},
    )
    run(spark, cfg, stream_model, available_now=True)
    apache.produce(topic, events()[:4])
    from confluent_kafka import TopicPartition

    from streaming import kafka_client as kc

    admin = kc.make_admin(apache.conf)  # kept: a dropped client never resolves its futures
    for fut in admin.delete_records([TopicPartition(topic, 0, 6)]).values():
        fut.result()
    with pytest.raises(QueryFailed, match=rf"DataLossError: offsets 4\.\.5 of {topic}/0 are gone"):
        run(spark, cfg, stream_model, available_now=True)


def test_a_range_whose_partition_vanished_is_data_loss_within_seconds_not_a_timeout(apache):
    """Read planned before the broker lost the topic (deleted, or restarted without its data)."""
    from streaming import kafka_client as kc

    topic = apache.topic(partitions=1, prefix="vanishing")
    apache.produce(topic, [b"x"] * 5)
    admin = kc.make_admin(apache.conf)
    for fut in admin.delete_topics([topic]).values():
        fut.result()
    consumer = kc.make_consumer(apache.conf)
    try:
        # A 10-minute read timeout: only the early check can end this read with an error.
        with pytest.raises(kc.DataLossError, match=rf"{topic}/0 (no longer exists|now ends at offset 0)"):
            list(kc.read_range(consumer, topic, 0, 0, 5, timeout_s=600))
    finally:
        consumer.close()


def test_reading_below_the_log_start_resumes_at_the_log_start_and_counts_what_was_lost(apache):
    from confluent_kafka import TopicPartition

    from streaming import kafka_client as kc

    topic = apache.topic(partitions=1, prefix="trimmed")
    apache.produce(topic, [b"v%d" % i for i in range(10)])
    admin = kc.make_admin(apache.conf)  # kept: a dropped client never resolves its futures
    for fut in admin.delete_records([TopicPartition(topic, 0, 4)]).values():
        fut.result()
    consumer = kc.make_consumer(apache.conf)
    lost = kc.LostOffsets()
    try:
        got = [
            m.offset()
            for msgs in kc.read_range(
                consumer, topic, 0, 0, 10, timeout_s=60, fail_on_data_loss=False, lost=lost
            )
            for m in msgs
        ]
        assert got == list(range(4, 10))
        assert (lost.count, lost.ranges) == (4, [(topic, 0, 0, 3)])
        with pytest.raises(kc.DataLossError, match=rf"offsets 0\.\.3 of {topic}/0 are gone"):
            list(kc.read_range(consumer, topic, 0, 0, 10, timeout_s=60))
    finally:
        consumer.close()


@pytest.mark.parametrize("source", ["kafka", "kafka_py"])
def test_offsets_gone_before_batch_0_read_them_are_counted_with_failondataloss_off(
    apache, spark, stream_model, models, tmp_path, source
):
    """Retention ran between planning batch 0 and reading it: the summary says how much was skipped."""
    from confluent_kafka import TopicPartition

    from streaming import kafka_client as kc

    topic = apache.topic(partitions=1, prefix="events-gone0")
    apache.produce(topic, events()[:10])
    cfg = stream_config(
        apache,
        f"gone0-{source}-{topic[-6:]}",
        model_path=models["torchscript"],
        kafka={"source": source},
        # kafka_py records no initial offsets in the checkpoint: JSON ones tell where batch 0 starts.
        input={
            "topic": topic,
            "fail_on_data_loss": False,
            "starting_offsets": "earliest" if source == "kafka" else json.dumps({topic: {"0": 0}}),
        },
        job={"checkpoint": str(tmp_path / "checkpoint")},
    )
    admin = kc.make_admin(apache.conf)  # kept: a dropped client never resolves its futures

    def trim(point: str, ctx: dict) -> None:
        if point == "driver.before_produce" and ctx["batch"] == 0:
            for fut in admin.delete_records([TopicPartition(topic, 0, 4)]).values():
                fut.result()

    faults.HOOK = trim
    try:
        summary = run(spark, cfg, stream_model, available_now=True)
    finally:
        faults.HOOK = None
    assert summary.totals.get("lost") == 4
    o = cfg.output
    seen = Counter(
        dict(m.headers())[H_ID].decode() for t in (o.topic, o.dlq_topic) for m in read_records(apache, t)
    )
    assert seen == Counter(f"{topic}/0/{i}" for i in range(4, 10))


def test_a_partition_that_vanished_mid_batch_is_counted_not_fatal_with_failondataloss_off(
    apache, spark, stream_model, models, tmp_path
):
    from streaming import kafka_client as kc

    topic = apache.topic(partitions=1, prefix="events-vanish")
    apache.produce(topic, events()[:6])
    cfg = stream_config(
        apache,
        f"vanish-{topic[-6:]}",
        model_path=models["torchscript"],
        input={"topic": topic, "fail_on_data_loss": False},
        job={"checkpoint": str(tmp_path / "checkpoint")},
    )
    run(spark, cfg, stream_model, available_now=True)
    apache.produce(topic, events()[:5])
    admin = kc.make_admin(apache.conf)

    def delete(point: str, ctx: dict) -> None:
        if point == "driver.before_produce" and ctx["batch"] == 1:
            for fut in admin.delete_topics([topic]).values():
                fut.result()

    faults.HOOK = delete
    try:
        summary = run(spark, cfg, stream_model, available_now=True)
    finally:
        faults.HOOK = None
    assert summary.totals.get("lost") == 5
    o = cfg.output
    assert sum(1 for t in (o.topic, o.dlq_topic) for _ in read_records(apache, t)) == 6
