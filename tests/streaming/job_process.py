"""The stream job as its own process (spark-submit, its own process group), for the stop and failure tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from streaming import faults
from streaming.source import SOURCE_RUNNER
from tests.streaming.conftest import (
    ROOT,
    Kafka,
    event,
    stream_config_dict,
    wait_until,
    write_toml,
)

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


@contextlib.contextmanager
def killed_on_failure(proc: subprocess.Popen) -> Iterator[None]:
    """The job's whole process group is killed if the block fails, so no JVM outlives the test."""
    try:
        yield
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def first_batch(proc: subprocess.Popen, log: Path) -> None:
    """Wait for the job's micro-batch 0 to be written; the job must still be running after it."""
    wait_until(
        lambda: proc.poll() is not None or "[sparkscore] batch 0:" in log.read_text(),
        "the job's first micro-batch",
        timeout=240,
    )
    assert proc.poll() is None, log.read_text()[-3000:]


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


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) for every process (Linux /proc)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(stat.parent.name)] = (int(fields[1]), fields[0])
    return out


def process_tree(root: int) -> set[int]:
    """``root`` and all its descendants (the JVM, PySpark's daemon and its workers, in their own group)."""
    procs = processes()
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


def alive(pids: set[int]) -> set[int]:
    """Those still running (zombies wait for a reaper that may never come; they hold no sockets)."""
    procs = processes()
    return {p for p in pids if p in procs and procs[p][1] != "Z"}


@contextlib.contextmanager
def held_then_killed(config: Path, tmp_path: Path, fault: str, fired: str, what: str) -> Iterator[Path]:
    """``python jobs/stream_score.py`` with ``fault`` armed, an ``action=sleep`` hold that fires the
    marker file ``fired``; the block runs while the job holds there, still alive (the crash window),
    and afterwards the driver and everything it started are killed with SIGKILL at once (a crash of
    the whole driver host) and waited for. Yields the job's log."""
    folder = tmp_path / "faults"
    folder.mkdir()
    env = {
        **os.environ,
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        faults.ENV: fault,
        faults.ENV_DIR: str(folder),
    }
    log = tmp_path / "killed.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "jobs" / "stream_score.py"), "--config", str(config)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(lambda: proc.poll() is not None or (folder / fired).exists(), what, timeout=600)
        assert proc.poll() is None, log.read_text()[-3000:]
        yield log
    finally:
        victims = process_tree(proc.pid)
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(30)
    wait_until(lambda: not alive(victims), "the killed job's processes to exit", timeout=60)
