"""The local brokers: Apache Kafka from the Maven jars, and the `python -m streaming.broker` wrapper."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import pytest

from streaming.broker import ApacheKafkaBroker, free_port, kafka_cluster_id, port_in_use
from tests.streaming.conftest import ROOT, Kafka, wait_until

pytestmark = pytest.mark.kafka


def test_apache_kafka_serves_topics_and_reads_back_what_was_written(apache):
    topic = apache.topic(partitions=2)
    apache.produce(topic, [b"a", b"b", b"c"])
    assert sorted(r.value for r in apache.read(topic)) == [b"a", b"b", b"c"]
    assert apache.end_offsets(topic) == {0: 2, 1: 1}


def test_kafka_cluster_id_never_starts_with_a_dash_which_kafka_storage_reads_as_an_option():
    # 0xF8 as the first byte encodes to '-' in URL-safe base64: the bench failed on such an id once.
    draws = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x01" + bytes(15))])
    cid = kafka_cluster_id(lambda: next(draws))
    assert cid == "AQAAAAAAAAAAAAAAAAAAAA"
    assert next(draws, None) is None


@pytest.mark.slow
def test_apache_kafka_keeps_topics_across_a_restart_on_a_kept_log_dir_and_removes_a_temp_one(tmp_path):
    kept = ApacheKafkaBroker(data_dir=str(tmp_path / "data"))
    with kept:
        k = Kafka(kept.bootstrap)
        topic = k.topic()
        k.produce(topic, [b"x", b"y"])
    with ApacheKafkaBroker(kept.port, data_dir=str(tmp_path / "data")) as again:
        assert [r.value for r in Kafka(again.bootstrap).read(topic)] == [b"x", b"y"]

    temp = ApacheKafkaBroker()
    with temp:
        data_dir = temp.data_dir
        assert data_dir is not None and data_dir.exists()
    assert not data_dir.exists()


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _wrapper(port: int, *, sigint_ignored: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "streaming.broker", "--kind", "tansu", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # What `cmd &` in a non-interactive shell (and a CI runner) hands its children.
        preexec_fn=_ignore_sigint if sigint_ignored else None,
    )


def _started(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "broker on 127.0.0.1:" in line, line
    return line


@pytest.mark.parametrize(
    ("sig", "sigint_ignored"),
    [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGINT, True)],
    ids=["sigterm", "sigint", "sigint-inherited-as-ignored"],
)
def test_broker_wrapper_stops_its_broker_on_a_signal(sig, sigint_ignored):
    port = free_port()
    proc = _wrapper(port, sigint_ignored=sigint_ignored)
    try:
        _started(proc)
        proc.send_signal(sig)
        # Quick when the machine is (under 0.5 s); the wrapper's own stop allows the broker 15 s to
        # exit on SIGTERM and 10 more after SIGKILL, which a machine at load 40 once needed.
        assert proc.wait(90) == 0
        wait_until(lambda: not port_in_use(port), f"port {port} to be released", timeout=30)
    finally:
        proc.kill()


def test_broker_wrapper_refuses_a_port_already_taken_and_leaves_the_running_broker_alone():
    port = free_port()
    first = _wrapper(port)
    try:
        _started(first)
        second = _wrapper(port)
        out, err = second.communicate(timeout=30)
        assert second.returncode == 2
        assert f"port {port} on 127.0.0.1 is already in use" in err
        assert "Traceback" not in err
        assert first.poll() is None and port_in_use(port)
    finally:
        first.terminate()
        first.wait(30)


def test_broker_dies_with_a_wrapper_killed_outright():
    port = free_port()
    proc = _wrapper(port)
    try:
        _started(proc)
        proc.kill()  # SIGKILL: no handler runs; the broker must not outlive it (no orphan on PID 1)
        proc.wait(10)
        wait_until(lambda: not port_in_use(port), f"the orphaned broker on {port} to exit", timeout=30)
    finally:
        proc.kill()


def test_a_kafka_opts_that_cannot_be_split_is_one_sentence_from_the_wrapper_not_a_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "streaming.broker", "--kind", "kafka", "--port", str(free_port())],
        cwd=ROOT,
        env={**os.environ, "KAFKA_OPTS": '-Xmx1g "-Dunclosed=1'},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("[sparkscore] error: KAFKA_OPTS cannot be split into JVM options"), (
        proc.stderr
    )
    assert "Traceback" not in proc.stderr


def test_kafka_opts_reach_the_apache_kafka_jvm(monkeypatch, tmp_path):
    monkeypatch.setenv("KAFKA_OPTS", "-XX:TieredStopAtLevel=1 -Dsparkscore.test='a b'")
    cmd = ApacheKafkaBroker(data_dir=str(tmp_path))._java("kafka.Kafka")
    assert cmd[cmd.index("-XX:TieredStopAtLevel=1") + 1] == "-Dsparkscore.test=a b"
    assert cmd.index("-Dsparkscore.test=a b") < cmd.index("kafka.Kafka")
