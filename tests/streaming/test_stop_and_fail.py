"""Stopping and failing the stream job the way a user meets it: Ctrl-C, SIGTERM, a broker that goes away.

The ``spark-submit`` tests run the real job in its own process group (so a group-wide SIGINT
is what a terminal's Ctrl-C sends) on a broker of their own.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from streaming import kafka_client as kc
from streaming.broker import ApacheKafkaBroker, TansuBroker
from streaming.query import DRIVER_WRITE_MAX_EVENTS, QueryFailed, run
from streaming.source import SOURCE_RUNNER
from tests.streaming.conftest import (
    ROOT,
    Kafka,
    event,
    stream_config,
    stream_config_dict,
    wait_until,
    write_toml,
)
from udfs.errors import ConfigError

pytestmark = [pytest.mark.kafka, pytest.mark.spark]

SPARK_SUBMIT = str(Path(sys.executable).parent / "spark-submit")


def values(n: int, prefix: str = "u") -> list[bytes]:
    return [
        event(f"{prefix}{i}", [25.0 + i, 1.0, 9.5, 3.0], f"2026-01-01T00:00:{i % 60:02d}Z") for i in range(n)
    ]


def group_alive(pgid: int) -> list[int]:
    """Running processes (not zombies) of process group ``pgid``."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def source_runners(session: int) -> list[int]:
    """Spark's Python processes for a streaming source (``SOURCE_RUNNER``) in session ``session``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            sid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[3])
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
        if sid == session and SOURCE_RUNNER in cmdline:
            found.append(int(proc.name))
    return found


def submit(config: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``spark-submit jobs/stream_score.py`` as a user runs it, in a process group of its own."""
    env = {
        **os.environ,
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": "127.0.0.1",
        **(env or {}),
    }
    cmd = [
        SPARK_SUBMIT,
        "--driver-java-options",
        f"-Dlog4j2.configurationFile=file:{ROOT / 'conf' / 'log4j2.properties'}",
        str(ROOT / "jobs" / "stream_score.py"),
        "--config",
        str(config),
        *args,
    ]
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def job_config(k: Kafka, tmp_path: Path, models, tag: str, events: int = 20, **sections) -> Path:
    topic = k.topic(partitions=2, prefix=f"events-{tag}")
    k.produce(topic, values(events))
    raw = stream_config_dict(
        k,
        f"{tag}-{topic[-6:]}",
        model_path=models["torchscript"],
        input={"topic": topic},
        job={"checkpoint": str(tmp_path / "checkpoint"), "trigger": "1 seconds"},
        **{"kafka": {"latest_offsets_by": "fetchProbe"}, **sections},
    )
    return write_toml(raw, tmp_path / "stream.toml")


def finish(proc: subprocess.Popen, log: Path, timeout: float = 180) -> str:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        pytest.fail(f"the job did not exit within {timeout:g} s:\n{log.read_text()[-3000:]}")
    wait_until(lambda: not group_alive(proc.pid), "every process of the job to exit", timeout=60)
    return log.read_text()


def stopped_cleanly(proc: subprocess.Popen, log: Path) -> str:
    """The job's output, once it has stopped between batches after a stop signal and exited 0."""
    out = finish(proc, log)
    assert proc.returncode == 0, out[-3000:]
    assert "[sparkscore] stopping after the current micro-batch" in out
    return out


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm-to-spark-submit"])
def test_a_stop_signal_to_spark_submit_stops_between_batches_prints_the_summary_and_exits_0(
    how, kafka, models, tmp_path
):
    log = tmp_path / "job.log"
    proc = submit(job_config(kafka, tmp_path, models, "stop"), log)
    try:
        wait_until(
            lambda: proc.poll() is not None or "[sparkscore] batch 0:" in log.read_text(),
            "the job's first micro-batch",
            timeout=240,
        )
        assert proc.poll() is None, log.read_text()[-3000:]
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to the foreground job
        else:
            os.kill(proc.pid, signal.SIGTERM)  # spark-submit's own process (the JVM) only
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    out = stopped_cleanly(proc, log)
    assert "[sparkscore] source kafka_py: " in out and "20 events -> 20 predictions" in out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out and "StackOverflowError" not in out


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_mid_batch_lets_the_batch_finish_and_exits_0(
    kafka, models, tmp_path
):
    # kill -TERM -<pgid> (what shells and some supervisors send) reaches every process of the
    # job's group, Spark's Python process for the streaming source included; killed, it fails the
    # query at its next offset request. More events than the driver writes itself, so a worker
    # task writes; it is held up at writer.before_produce, and the signal arrives mid-batch.
    faults_dir = tmp_path / "faults"
    faults_dir.mkdir()
    events = DRIVER_WRITE_MAX_EVENTS + 2_000
    config = job_config(kafka, tmp_path, models, "group", events=events)
    log = tmp_path / "job.log"
    fault = {
        "SPARKSCORE_FAULT": "writer.before_produce:writer=p0,batch=0,action=sleep,seconds=6",
        "SPARKSCORE_FAULT_DIR": str(faults_dir),
    }
    proc = submit(config, log, env=fault)
    try:
        wait_until(
            lambda: proc.poll() is not None or (faults_dir / "writer.before_produce-p0-b0.fired").exists(),
            "a write task held up mid-batch",
            timeout=240,
        )
        assert proc.poll() is None, log.read_text()[-3000:]
        runners = source_runners(session=proc.pid)
        assert runners, "no streaming source runner found in the job's session"
        os.killpg(proc.pid, signal.SIGTERM)
        # The batch is held up for 6 s: a runner that dies of the signal dies within these 2.
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            assert all(Path(f"/proc/{pid}").exists() for pid in runners), "the source runner died of SIGTERM"
            time.sleep(0.05)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    out = stopped_cleanly(proc, log)
    assert f"{events:,} events -> {events:,} predictions" in out, out[-3000:]
    assert "Traceback" not in out and "EOFException" not in out and "Connection reset" not in out
    assert kafka.count(tomllib.loads(config.read_text())["output"]["topic"]) == events


@pytest.mark.slow
def test_ctrl_c_that_also_kills_a_checkpoint_chmod_still_stops_the_job_cleanly(kafka, models, tmp_path):
    # Without Hadoop's native library the JVM forks `chmod` for every checkpoint file, in the job's
    # process group: Ctrl-C may kill it too, and the query dies mid-write; or the stop interrupts
    # the write first. Either way the job must stop cleanly. A `chmod` on PATH that holds once
    # armed, on a file of this job's checkpoint only, makes the signal land in exactly that window.
    hold, fakebin = tmp_path / "hold", tmp_path / "bin"
    hold.mkdir()
    fakebin.mkdir()
    checkpoint = tmp_path / "checkpoint"
    chmod = fakebin / "chmod"
    chmod.write_text(
        "#!/bin/sh\n"
        f'case "$*" in *"{checkpoint}/"*)\n'
        f'  if [ -e "{hold}/armed" ] && mkdir "{hold}/taken" 2>/dev/null; then\n'
        f'    echo "$*" > "{hold}/args"; touch "{hold}/held"; sleep 60\n'
        "  fi;;\n"
        "esac\n"
        f'exec {shutil.which("chmod")} "$@"\n'
    )
    chmod.chmod(0o755)
    config = job_config(kafka, tmp_path, models, "chmod")
    assert tomllib.loads(config.read_text())["job"]["checkpoint"] == str(checkpoint)
    log = tmp_path / "job.log"
    proc = submit(config, log, env={"PATH": f"{fakebin}:{os.environ['PATH']}"})
    try:
        wait_until(
            lambda: proc.poll() is not None or "[sparkscore] batch 0:" in log.read_text(),
            "the job's first micro-batch",
            timeout=240,
        )
        (hold / "armed").touch()
        # A next batch, so that a checkpoint write (and its chmod) surely comes after arming.
        kafka.produce(tomllib.loads(config.read_text())["input"]["topic"], values(5, prefix="more"))
        wait_until(lambda: proc.poll() is not None or (hold / "held").exists(), "a held chmod", timeout=120)
        # The window: the job is alive and its checkpoint write waits on the held chmod.
        assert proc.poll() is None, log.read_text()[-3000:]
        assert str(checkpoint) in (hold / "args").read_text()
        os.killpg(proc.pid, signal.SIGINT)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    out = stopped_cleanly(proc, log)
    assert "[sparkscore] error" not in out and "Traceback" not in out, out[-3000:]
    assert "[sparkscore] source kafka_py: " in out, out[-3000:]
    # Whichever came first (the killed chmod or the interrupting stop), batch 0's 20 are in.
    assert "20 events -> 20 predictions" in out or "25 events -> 25 predictions" in out, out[-3000:]


@pytest.mark.slow
def test_a_broker_stopped_mid_run_fails_the_job_with_one_sentence_and_little_log_noise(models, tmp_path):
    with TansuBroker(log_path=str(tmp_path / "tansu.log")) as broker:
        k = Kafka(broker.bootstrap)
        config = job_config(
            k, tmp_path, models, "lost", kafka={"broker_timeout_ms": 5000, "latest_offsets_by": "fetchProbe"}
        )
        log = tmp_path / "job.log"
        proc = submit(config, log)
        try:
            wait_until(
                lambda: proc.poll() is not None or "[sparkscore] batch 0:" in log.read_text(),
                "the job's first micro-batch",
                timeout=240,
            )
            assert proc.poll() is None, log.read_text()[-3000:]
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
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
@pytest.mark.parametrize("stats", [False, True], ids=["stats-off", "stats-on"])
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
        try:
            wait_until(
                lambda: proc.poll() is not None or "[sparkscore] batch 0:" in log.read_text(),
                "the job's first micro-batch",
                timeout=240,
            )
            assert proc.poll() is None, log.read_text()[-3000:]
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
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


def test_available_now_without_the_input_topic_is_an_error_unless_allowed(
    apache, spark, stream_model, models, tmp_path
):
    cfg = stream_config(
        apache,
        f"missing-{os.getpid()}-{time.monotonic_ns()}",
        model_path=models["torchscript"],
        job={"checkpoint": str(tmp_path / "checkpoint")},
    )
    with pytest.raises(
        ConfigError, match=rf"input topic '{cfg.input.topic}' does not exist on {apache.bootstrap}"
    ):
        run(spark, cfg, stream_model, available_now=True)
    allowed = stream_config(
        apache,
        f"missing-ok-{os.getpid()}-{time.monotonic_ns()}",
        model_path=models["torchscript"],
        input={"allow_missing_topic": True},
        job={"checkpoint": str(tmp_path / "checkpoint-ok")},
    )
    summary = run(spark, allowed, stream_model, available_now=True)
    o = allowed.output
    assert summary.totals.get(o.topic, 0) + summary.totals.get(o.dlq_topic, 0) == 0


@pytest.mark.slow
def test_speculative_task_copies_are_refused_before_any_query_starts(kafka, models, tmp_path):
    """The job as a user runs it, with speculation switched on in its [spark] section."""
    config = job_config(kafka, tmp_path, models, "speculation", spark={"spark.speculation": "true"})
    log = tmp_path / "job.log"
    proc = submit(config, log)
    out = finish(proc, log)
    assert proc.returncode == 2, out[-3000:]
    assert "[sparkscore] error: spark.speculation=true runs a second copy of slow write tasks" in out, out[
        -3000:
    ]
    assert "set spark.speculation=false for the stream job" in out
    assert "[sparkscore] reading" not in out  # refused before any query started
