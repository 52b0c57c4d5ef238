"""Every crash window of the stream job, hit on purpose (``streaming/faults.py``), then a restart.

Each test runs the job on Apache Kafka until a named fault point fires (a Python worker
exits, i.e. the task dies; or the driver fails there and abandons its open transaction,
as a dead driver would), restarts it on the same checkpoint, and checks that the output
and dead-letter topics hold exactly one record per event for ``read_committed``
consumers. Where the window leaves committed output behind, the restart must have
de-duplicated some records; where it leaves an aborted transaction, ``read_uncommitted``
consumers see it (the documented limit). ``make faults`` writes the figures to
``bench/results/faults.json``.

Batch 0 is written by the executors (one writer per input partition, ``p0`` and ``p1``);
later small batches by the driver. 16 events over 2 partitions, 8 per batch.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from streaming import faults
from streaming.query import QueryFailed, run
from streaming.sink import H_ID
from tests.streaming.conftest import event, read_records, stream_config, tally

pytestmark = [pytest.mark.kafka, pytest.mark.spark, pytest.mark.slow]


def events() -> list[bytes]:
    good = [
        event(f"u{i}", [20.0 + i, 1.0, 9.5, float(i % 7)], f"2026-01-01T00:00:{i:02d}Z") for i in range(12)
    ]
    bad = [b"not json", event("ub1", [1.0, 2.0]), event("ub2", None), b""]
    return good + bad


class Scenario:
    """One job (topics, checkpoint) on Apache Kafka, run until a fault fires and then again."""

    def __init__(self, apache, spark, model, model_path: str, tmp_path: Path, monkeypatch, tag: str) -> None:
        self.k, self.spark, self.model, self.monkeypatch = apache, spark, model, monkeypatch
        self.folder = tmp_path / "faults"
        self.folder.mkdir()
        topic = apache.topic(partitions=2, prefix=f"events-{tag}")
        self.values = events()
        apache.produce(topic, self.values)
        self.cfg = stream_config(
            apache,
            f"{tag}-{topic[-6:]}",
            model_path=model_path,
            input={"topic": topic, "max_offsets_per_trigger": 8},
            job={"checkpoint": str(tmp_path / "checkpoint")},
        )
        self.ids = {f"{r.topic}/{r.partition}/{r.offset}" for r in apache.read(topic)}

    def crash(self, spec: str) -> str:
        """Run until the fault fires; the run must fail there. Returns its error."""
        self.monkeypatch.setenv(faults.ENV, spec)
        self.monkeypatch.setenv(faults.ENV_DIR, str(self.folder))
        try:
            with pytest.raises(QueryFailed) as failed:
                run(self.spark, self.cfg, self.model, available_now=True)
        finally:
            self.monkeypatch.delenv(faults.ENV)
            self.monkeypatch.delenv(faults.ENV_DIR)
        assert list(self.folder.glob("*.fired")), f"the fault {spec!r} never fired: {failed.value}"
        return str(failed.value)

    def restart(self) -> int:
        """Run to the end on the same checkpoint; returns how many records it did not write again."""
        summary = run(self.spark, self.cfg, self.model, available_now=True)
        return summary.totals.get("skipped", 0)

    def seen(self, *, committed: bool = True) -> Counter:
        o = self.cfg.output
        return Counter(
            dict(m.headers())[H_ID].decode()
            for t in (o.topic, o.dlq_topic)
            for m in read_records(self.k, t, committed=committed)
        )

    def check(self, name: str, deduplicated: int, results: dict) -> dict[str, int]:
        outcome = tally(self.seen(), self.ids, deduplicated)
        results[name] = outcome
        assert outcome == {"events": 16, "duplicates": 0, "lost": 0, "deduplicated": deduplicated}
        return outcome


@pytest.fixture
def scenario(request, apache, spark, stream_model, models, tmp_path, monkeypatch):
    def make(tag: str) -> Scenario:
        return Scenario(apache, spark, stream_model, models["torchscript"], tmp_path, monkeypatch, tag)

    return make


# -- batch 0: task writers on the executors ---------------------------------------------------

# p1 fails only once p0 has committed, so the batch is partly committed when the job dies.
AFTER_P0 = "after=writer.after_commit-p0-b0"


def test_a_task_killed_before_it_produces(scenario, fault_results):
    s = scenario("before-produce")
    s.crash(f"writer.before_produce:batch=0,writer=p1,action=exit,{AFTER_P0}")
    deduplicated = s.restart()
    assert deduplicated == 4  # p0's records, committed before the crash
    s.check("before_produce", deduplicated, fault_results)


def test_a_task_killed_after_k_of_its_records(scenario, fault_results):
    s = scenario("after-k")
    s.crash(f"writer.after_records:k=3,batch=0,writer=p1,action=exit,{AFTER_P0}")
    # The 3 records p1 sent are in its open transaction: aborted when its successor opens.
    deduplicated = s.restart()
    assert deduplicated == 4
    s.check("after_k_of_n", deduplicated, fault_results)
    assert sum(s.seen(committed=False).values()) == 16 + 3


def test_the_driver_dying_after_the_tasks_committed_but_before_the_marker(scenario, fault_results):
    s = scenario("before-marker")
    s.crash("driver.before_marker:batch=0")
    assert (s.folder / "writer.after_commit-p0-b0").exists() and (
        s.folder / "writer.after_commit-p1-b0"
    ).exists()
    deduplicated = s.restart()
    assert deduplicated == 8  # the whole batch was committed by its tasks
    s.check("before_marker", deduplicated, fault_results)


def test_the_driver_dying_after_the_marker_before_sparks_commit(scenario, fault_results):
    s = scenario("after-marker")
    s.crash("driver.after_marker:batch=0")
    deduplicated = s.restart()
    assert deduplicated == 8  # Spark re-runs batch 0; its marker says it is written
    s.check("after_marker", deduplicated, fault_results)


# -- batch 1: the driver writes records and marker in one transaction ---------------------------


def test_the_driver_dying_after_k_of_its_records(scenario, fault_results):
    s = scenario("driver-after-k")
    s.crash("driver.after_records:k=5,batch=1")
    deduplicated = s.restart()
    assert deduplicated == 0  # nothing of batch 1 was committed
    s.check("driver_after_k_of_n", deduplicated, fault_results)
    assert sum(s.seen(committed=False).values()) == 16 + 5


def test_the_driver_dying_with_its_records_sent_before_the_marker(scenario, fault_results):
    s = scenario("driver-before-marker")
    s.crash("driver.before_marker:batch=1")
    deduplicated = s.restart()
    assert deduplicated == 0  # records and marker were one transaction, never committed
    s.check("driver_before_marker", deduplicated, fault_results)
    assert sum(s.seen(committed=False).values()) == 16 + 8


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
    fault_results["expired_offsets"] = tally(seen, expected, summary.totals.get("skipped", 0))
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
