"""Choosing the Kafka source as a user runs the job: ``spark-submit`` with and without the connector jars.

``source = "auto"`` must pick Spark's JVM connector when ``--jars 'build/jars/*.jar'``
puts it on the classpath (a real class lookup in a real spark-submit, no mock) and
``kafka_py`` without it; ``--source kafka`` without the connector is one sentence and
exit 2 before any query starts. The command lines are the README's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs import stream_score
from streaming import kafka_client as kc
from streaming.backends import CONNECTOR_VERSION, JVM, PYTHON, local_jars
from streaming.broker import free_port
from tests.streaming.conftest import ROOT
from tests.streaming.test_stream_job import make_events, write_config

SPARK_SUBMIT = str(Path(sys.executable).parent / "spark-submit")
LOOPBACK_WARNING = "resolves to a loopback address"


def test_the_connector_version_named_in_errors_is_the_one_make_jars_fetches():
    pom = (ROOT / "jvm" / "pom.xml").read_text()
    assert re.search(r"<spark.kafka.version>(.+?)</spark.kafka.version>", pom)[1] == CONNECTOR_VERSION
    assert any(Path(j).name == f"spark-sql-kafka-0-10_2.13-{CONNECTOR_VERSION}.jar" for j in local_jars()), (
        "build/jars lacks the connector: run `make jars`"
    )


def spark_submit(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """``SPARK_LOCAL_IP=127.0.0.1 spark-submit [--jars ...] jobs/stream_score.py ...`` as the README writes it."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYSPARK_SUBMIT_ARGS", "SPARK_LOCAL_IP")}
    env.update(
        PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1"
    )
    log4j = f"-Dlog4j2.configurationFile=file:{ROOT / 'conf' / 'log4j2.properties'}"
    return subprocess.run(
        [SPARK_SUBMIT, "--driver-java-options", log4j, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.parametrize(
    ("jars", "picked"),
    [
        pytest.param(True, JVM, id="with-jars-picks-kafka"),
        pytest.param(False, PYTHON, id="without-jars-picks-kafka_py"),
    ],
)
def test_auto_picks_the_jvm_source_exactly_when_its_jars_are_on_the_classpath(
    kafka, models, tmp_path, jars, picked
):
    events = kafka.topic(partitions=2, prefix="events")
    values, _, bad = make_events(30)
    kafka.produce(events, values)
    tag = f"auto-{picked}"
    cfg = write_config(tmp_path, kafka, models["torchscript"], events=events, tag=tag)
    # Spark expands the glob itself (quoted in the README, so the shell leaves it alone).
    jar_args = ["--jars", "build/jars/*.jar"] if jars else []

    done = spark_submit(
        *jar_args, "jobs/stream_score.py", "--config", str(cfg), "--source", "auto", "--available-now"
    )

    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert f"with the {picked} source" in done.stdout and f"source {picked}:" in done.stdout, out[-3000:]
    assert LOOPBACK_WARNING not in out
    assert kafka.count(f"predictions-{tag}") == len(values) - len(bad)
    assert kafka.count(f"dlq-{tag}") == len(bad)


@pytest.mark.kafka
@pytest.mark.slow
def test_source_kafka_without_the_connector_is_one_sentence_naming_make_jars_and_exit_2(
    kafka, models, tmp_path
):
    events = kafka.topic(partitions=1, prefix="events")
    cfg = write_config(tmp_path, kafka, models["torchscript"], events=events, tag="nojars")

    done = spark_submit("jobs/stream_score.py", "--config", str(cfg), "--source", "kafka", "--available-now")

    assert done.returncode == 2, (done.stdout + done.stderr)[-3000:]
    # spark-submit merges the Python driver's stderr into its stdout; the JVM's start-up notes
    # ("Using incubator modules") come too. Ours is one line.
    errors = [
        line for line in (done.stdout + done.stderr).splitlines() if line.startswith("[sparkscore] error")
    ]
    assert len(errors) == 1 and errors[0].startswith("[sparkscore] error: source = 'kafka' needs"), errors
    assert "make jars" in errors[0] and "--packages org.apache.spark:spark-sql-kafka-0-10_2.13:" in errors[0]
    # Refused before any query was planned: no "reading ... with the ... source" line, no output topic.
    assert "reading" not in done.stdout and "Traceback" not in done.stdout + done.stderr
    assert "predictions-nojars" not in kc.topic_partitions(kc.make_admin(kafka.conf), 30)


@pytest.mark.spark
@pytest.mark.parametrize("source", [JVM, PYTHON])
def test_an_unreachable_broker_is_one_sentence_within_15_s_for_both_sources(
    spark, models, tmp_path, capsys, source
):
    port = free_port()  # a loopback port with nothing listening

    class Nowhere:
        bootstrap = f"127.0.0.1:{port}"
        latest_by = "listOffsets"

    cfg = write_config(
        tmp_path, Nowhere, models["torchscript"], events="events", tag="nowhere", source=source
    )
    started = time.monotonic()
    code = stream_score.main(["--config", str(cfg), "--available-now"])
    took = time.monotonic() - started

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"no Kafka broker answered at '127.0.0.1:{port}' within 15 s" in err[0], err
    # Not a timing target: a liveness bound far from the 15 s check, and from the old 2-minute wait.
    assert took < 90
