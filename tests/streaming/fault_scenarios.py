"""The stream job run until a named fault point fires, then restarted (``tests/streaming/test_faults*.py``).

One scenario is one job (topics, checkpoint) on Apache Kafka with either source: Spark's
JVM connector (``kafka``, jars from ``make jars``) or ``kafka_py``. 16 events over 2
partitions, 8 per micro-batch: batch 0 is written by the executors (one writer per input
partition, ``p0`` and ``p1``), batch 1 by the driver.

Executor faults kill the task's Python worker (``action=exit``). Driver faults kill the
driver for real: the job runs as its own process (``python jobs/stream_score.py``, in a
session of its own) and the fault sends SIGKILL to its process group, the driver and its
JVM, at the named point. The restart runs in this process on the same checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from streaming import faults
from streaming.backends import JVM, local_jars
from streaming.config import StreamConfig
from streaming.query import QueryFailed, run
from streaming.sink import H_ID
from tests.streaming.conftest import ROOT, event, read_records, stream_config_dict, tally, write_toml
from udfs.config import from_dict

SOURCES = [JVM, "kafka_py"]


def events() -> list[bytes]:
    good = [
        event(f"u{i}", [20.0 + i, 1.0, 9.5, float(i % 7)], f"2026-01-01T00:00:{i:02d}Z") for i in range(12)
    ]
    bad = [b"not json", event("ub1", [1.0, 2.0]), event("ub2", None), b""]
    return good + bad


class Scenario:
    """One job on Apache Kafka, run until a fault fires and then again."""

    def __init__(
        self, apache, spark, model, model_path: str, tmp_path: Path, monkeypatch, tag: str, source: str
    ) -> None:
        self.k, self.spark, self.model, self.monkeypatch = apache, spark, model, monkeypatch
        self.source, self.tmp_path = source, tmp_path
        self.folder = tmp_path / "faults"
        self.folder.mkdir()
        topic = apache.topic(partitions=2, prefix=f"events-{tag}")
        self.values = events()
        apache.produce(topic, self.values)
        extra = {"spark": {"spark.jars": ",".join(local_jars())}} if source == JVM else {}
        self.raw = stream_config_dict(
            apache,
            f"{tag}-{source.replace('_', '')}-{topic[-6:]}",
            model_path=model_path,
            kafka={"source": source},
            input={"topic": topic, "max_offsets_per_trigger": 8},
            job={"checkpoint": str(tmp_path / "checkpoint")},
            **extra,
        )
        self.cfg = from_dict(StreamConfig, self.raw, where="fault scenario config")
        self.ids = {f"{r.topic}/{r.partition}/{r.offset}" for r in apache.read(topic)}

    def crash(self, spec: str) -> str:
        """Run in this process until the fault fires (a task's worker exits); the run fails there."""
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

    def kill_driver_at(self, spec: str) -> None:
        """Run the job as its own process until the fault SIGKILLs its driver (and JVM) at ``spec``."""
        rc, log = self.run_job(f"{spec},action=kill")
        assert rc == -signal.SIGKILL, log
        assert list(self.folder.glob("*.fired")), f"the job died before {spec}:\n{log}"

    def run_job(self, spec: str, *, master: str | None = None) -> tuple[int, str]:
        """Run the job (``--available-now``) as its own process with the fault ``spec``: (exit code, log tail)."""
        config = write_toml(self.raw, self.tmp_path / "stream.toml")
        log = self.tmp_path / "job.log"
        env = {
            **os.environ,
            "PYSPARK_PYTHON": sys.executable,
            "PYSPARK_DRIVER_PYTHON": sys.executable,
            faults.ENV: spec,
            faults.ENV_DIR: str(self.folder),
        }
        if master is not None:
            # As spark-submit --master gives it: a job started with python launches its JVM with
            # spark-submit's default master, which wins over the config's [spark] one.
            env["PYSPARK_SUBMIT_ARGS"] = f"--master {master} pyspark-shell"
        cmd = [
            sys.executable,
            str(ROOT / "jobs" / "stream_score.py"),
            "--config",
            str(config),
            "--available-now",
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            proc.wait(600)  # a liveness bound
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            pytest.fail(f"the job did not end with {spec}:\n{log.read_text()[-3000:]}")
        return proc.returncode, log.read_text(errors="replace")[-3000:]

    def restart(self) -> int:
        """Run to the end on the same checkpoint; returns how many records it did not write again."""
        summary = run(self.spark, self.cfg, self.model, available_now=True)
        assert summary.backend == self.source
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
        results[f"{name}.{self.source}"] = outcome
        assert outcome == {"events": 16, "duplicates": 0, "lost": 0, "deduplicated": deduplicated}
        return outcome
