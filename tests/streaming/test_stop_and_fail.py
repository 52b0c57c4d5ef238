"""Stopping the stream job the way a user does: Ctrl-C, SIGTERM (to spark-submit or the whole group).

The `spark-submit` tests run the real job in its own process group (so a group-wide SIGINT
is what a terminal's Ctrl-C sends) on a broker of their own.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
import tomllib
from pathlib import Path

import pytest

from streaming.query import DRIVER_WRITE_MAX_EVENTS, run
from tests.streaming.conftest import (
    stream_config,
    wait_until,
)
from tests.streaming.job_process import (
    finish,
    first_batch,
    job_config,
    killed_on_failure,
    source_runners,
    stopped_cleanly,
    submit,
    values,
)
from udfs.errors import ConfigError

pytestmark = [pytest.mark.kafka, pytest.mark.spark]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm-to-spark-submit"])
def test_a_stop_signal_to_spark_submit_stops_between_batches_prints_the_summary_and_exits_0(
    how, kafka, models, tmp_path
):
    log = tmp_path / "job.log"
    proc = submit(job_config(kafka, tmp_path, models, "stop"), log)
    with killed_on_failure(proc):
        first_batch(proc, log)
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to the foreground job
        else:
            os.kill(proc.pid, signal.SIGTERM)  # spark-submit's own process (the JVM) only
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
    with killed_on_failure(proc):
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
        f'    echo "$*" > "{hold}/args"\n'
        # Held by a process that takes SIGINT's default action even where the job was started with
        # SIGINT ignored (as CI starts its children): a shell cannot undo an ignored-on-entry signal,
        # so a plain `sleep 60` would outlive the Ctrl-C and hold the checkpoint write for 60 s.
        # It says "held" only once SIGINT can kill it.
        f'    "{sys.executable}" -c "import pathlib, signal, time; signal.signal(signal.SIGINT, '
        f"signal.SIG_DFL); pathlib.Path('{hold}/held').touch(); time.sleep(60)\" || exit 130\n"
        "  fi;;\n"
        "esac\n"
        f'exec {shutil.which("chmod")} "$@"\n'
    )
    chmod.chmod(0o755)
    config = job_config(kafka, tmp_path, models, "chmod")
    assert tomllib.loads(config.read_text())["job"]["checkpoint"] == str(checkpoint)
    log = tmp_path / "job.log"
    proc = submit(config, log, env={"PATH": f"{fakebin}:{os.environ['PATH']}"})
    with killed_on_failure(proc):
        first_batch(proc, log)
        (hold / "armed").touch()
        # A next batch, so that a checkpoint write (and its chmod) surely comes after arming.
        kafka.produce(tomllib.loads(config.read_text())["input"]["topic"], values(5, prefix="more"))
        wait_until(lambda: proc.poll() is not None or (hold / "held").exists(), "a held chmod", timeout=120)
        # The window: the job is alive and its checkpoint write waits on the held chmod.
        assert proc.poll() is None, log.read_text()[-3000:]
        assert str(checkpoint) in (hold / "args").read_text()
        os.killpg(proc.pid, signal.SIGINT)
    out = stopped_cleanly(proc, log)
    assert "[sparkscore] error" not in out and "Traceback" not in out, out[-3000:]
    assert "[sparkscore] source kafka_py: " in out, out[-3000:]
    # Whichever came first (the killed chmod or the interrupting stop), batch 0's 20 are in.
    assert "20 events -> 20 predictions" in out or "25 events -> 25 predictions" in out, out[-3000:]


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
