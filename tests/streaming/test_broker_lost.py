"""A broker that goes away under the running stream job: stopped, or restarted without its data.

One true sentence each, never data loss for a broker that merely stopped (a spark-submit job of
its own, on a broker of its own).
"""

from __future__ import annotations

import pytest

from streaming import kafka_client as kc
from streaming.broker import ApacheKafkaBroker, TansuBroker
from streaming.query import QueryFailed, run
from tests.streaming.conftest import (
    EVERY_SOURCE,
    Kafka,
    stream_config,
)
from tests.streaming.job_process import (
    finish,
    first_batch,
    job_config,
    killed_on_failure,
    submit,
    values,
)

pytestmark = [pytest.mark.kafka, pytest.mark.spark]


@pytest.mark.slow
def test_a_broker_stopped_mid_run_fails_the_job_with_one_sentence_and_little_log_noise(models, tmp_path):
    with TansuBroker(log_path=str(tmp_path / "tansu.log")) as broker:
        k = Kafka(broker.bootstrap)
        config = job_config(
            k, tmp_path, models, "lost", kafka={"broker_timeout_ms": 5000, "latest_offsets_by": "fetchProbe"}
        )
        log = tmp_path / "job.log"
        proc = submit(config, log)
        with killed_on_failure(proc):
            first_batch(proc, log)
    # The broker is gone now (the with block stopped it).
    out = finish(proc, log)
    errors = [line for line in out.splitlines() if line.startswith("[sparkscore] error:")]
    assert proc.returncode == 1, out[-3000:]
    assert len(errors) == 1, out[-3000:]
    assert errors[0].startswith(
        f"[sparkscore] error: lost the Kafka broker at '{broker.bootstrap}': no answer for 5 s"
    ), errors
    connects = [line for line in out.splitlines() if "Connect to" in line or "Connection refused" in line]
    assert len(connects) <= 20, f"{len(connects)} reconnect lines:\n" + "\n".join(connects[:40])


@pytest.mark.slow
# With the stats query (the one more query to stop) in `make test`; both in `make faults`.
@pytest.mark.parametrize(
    "stats", [False, True] if EVERY_SOURCE else [True], ids=lambda on: "stats-on" if on else "stats-off"
)
def test_a_stopped_apache_kafka_broker_is_one_sentence_never_data_loss_and_no_stack_overflow(
    models, tmp_path, stats
):
    """Found running the job as a new user would: a broker that merely stopped was reported as lost data.

    The broker timeout (15 s) is longer than it took the job to die of a DataLossError (7 s).
    """
    with ApacheKafkaBroker(log_path=str(tmp_path / "kafka.log")) as broker:
        k = Kafka(broker.bootstrap)
        config = job_config(
            k,
            tmp_path,
            models,
            "stopped",
            kafka={"broker_timeout_ms": 15000, "latest_offsets_by": "listOffsets"},
            stats={"enabled": stats, "trigger": "1 seconds"},
        )
        log = tmp_path / "job.log"
        proc = submit(config, log)
        with killed_on_failure(proc):
            first_batch(proc, log)
    # The broker is stopped now (the with block stopped it).
    out = finish(proc, log)
    errors = [line for line in out.splitlines() if line.startswith("[sparkscore] error:")]
    assert proc.returncode == 1, out[-3000:]
    assert len(errors) == 1, out[-3000:]
    assert errors[0].startswith(
        f"[sparkscore] error: lost the Kafka broker at '{broker.bootstrap}': no answer for 15 s"
    ), out[-3000:]
    assert "DataLossError" not in out, out[-5000:]
    assert "StackOverflowError" not in out, out[-5000:]
    assert len(out.splitlines()) < 200, f"{len(out.splitlines())} log lines:\n{out[-5000:]}"


def test_a_broker_restarted_without_its_data_is_data_loss_naming_topic_and_offsets(
    spark, stream_model, models, tmp_path
):
    broker = TansuBroker(log_path=str(tmp_path / "tansu.log")).start()
    try:
        k = Kafka(broker.bootstrap)
        topic = k.topic(partitions=1, prefix="events-gone")
        k.produce(topic, values(6))
        cfg = stream_config(
            k,
            f"gone-{topic[-6:]}",
            model_path=models["torchscript"],
            input={"topic": topic},
            kafka={"latest_offsets_by": "fetchProbe"},
            job={"checkpoint": str(tmp_path / "checkpoint")},
        )
        run(spark, cfg, stream_model, available_now=True)
        broker.stop()  # Tansu keeps everything in memory: a restart has nothing
        broker = TansuBroker(broker.port, log_path=str(tmp_path / "tansu2.log")).start()
        kc.ensure_topics(k.conf, {topic: 1})  # its producer creates the topic again
        k.produce(topic, values(2, prefix="new"))
        with pytest.raises(
            QueryFailed,
            match=rf"DataLossError: {topic}/0 now ends at offset 2 but the query already read up to offset\(s\) 6",
        ):
            run(spark, cfg, stream_model, available_now=True)
    finally:
        broker.stop()
