"""Query wiring helpers that need no broker: the micro-batch size read from the offset log, and
stopping a query only between batches."""

from __future__ import annotations

import json
import re
import threading

import pytest

from streaming.query import (
    BatchGate,
    batch_ranges,
    batch_size,
    batch_time_breakdown,
    hadoop_reader,
    killed_by_the_stop_signal,
    stop_between_batches,
)


def write_offsets(folder, batch_id: int, offsets: dict | None) -> None:
    (folder / "offsets").mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"batchWatermarkMs": 0, "batchTimestampMs": 1, "conf": {}})
    lines = ["v1", meta, json.dumps(offsets) if offsets is not None else "-"]
    (folder / "offsets" / str(batch_id)).write_text("\n".join(lines))


def test_batch_size_is_the_offset_difference_to_the_previous_batch(tmp_path):
    write_offsets(tmp_path, 4, {"events": {"0": 100, "1": 50}})
    write_offsets(tmp_path, 5, {"events": {"0": 130, "1": 62}})
    assert batch_size(str(tmp_path), 5) == 42
    assert batch_size(f"file:{tmp_path}", 5) == 42


def test_batch_size_is_unknown_rather_than_wrong(tmp_path):
    write_offsets(tmp_path, 0, {"events": {"0": 10}})
    write_offsets(tmp_path, 1, {"events": {"0": 20, "1": 5}})  # a partition appeared
    write_offsets(tmp_path, 2, None)
    assert batch_size(str(tmp_path), 0) is None  # no previous entry to compare with
    assert batch_size(str(tmp_path), 1) is None
    assert batch_size(str(tmp_path), 2) is None
    assert batch_size(str(tmp_path), 7) is None  # no such entry
    assert batch_size("s3a://bucket/ck", 5) is None  # remote: only through a reader (hadoop_reader)


class FakeQuery:
    """Records whether a batch was running when stop() came."""

    def __init__(self, gate: BatchGate) -> None:
        self.gate = gate
        self.isActive = True
        self.stopped_while_running: bool | None = None

    def stop(self) -> None:
        self.stopped_while_running = not self.gate.wait_idle(0)
        self.isActive = False


def test_a_stop_requested_mid_batch_waits_for_the_batch_boundary():
    gate = BatchGate()
    query = FakeQuery(gate)
    in_batch, finish = threading.Event(), threading.Event()

    def batch() -> None:
        with gate:
            in_batch.set()
            finish.wait(30)

    worker = threading.Thread(target=batch)
    worker.start()
    assert in_batch.wait(30)
    stopper = threading.Thread(target=stop_between_batches, args=(query, gate))
    stopper.start()
    assert not gate.wait_idle(0.05), "the batch is still running"
    assert query.isActive, "stopped in the middle of a batch"
    finish.set()
    stopper.join(30)
    worker.join(30)
    assert query.stopped_while_running is False
    assert not query.isActive


def test_an_idle_query_is_stopped_at_once_and_a_stopped_one_is_left_alone():
    gate = BatchGate()
    query = FakeQuery(gate)
    stop_between_batches(query, gate, timeout_s=30)
    assert query.stopped_while_running is False and not query.isActive
    query.stopped_while_running = None
    stop_between_batches(query, gate)
    assert query.stopped_while_running is None  # not active: stop() not called again


def _progress(rows: int, trigger: int, add: int, wal: int) -> dict:
    parts = {"latestOffset": 5, "walCommit": wal, "queryPlanning": 20, "addBatch": add, "commitOffsets": 30}
    return {"numInputRows": rows, "durationMs": {"triggerExecution": trigger, **parts}}


def test_batch_time_breakdown_takes_medians_over_batches_with_input_only():
    progress = [
        _progress(0, 5, 0, 0),  # idle polls would drag every median to zero
        _progress(100, 300, 200, 40),
        _progress(120, 500, 400, 60),
        _progress(90, 1400, 1300, 50),
    ]
    assert batch_time_breakdown(progress) == (
        "a micro-batch takes 500 ms (median of the last 3 with input): finding the offsets 5, "
        "offset log 50, planning 20, scoring and writing 400, commit log 30"
    )


def test_batch_time_breakdown_is_absent_without_a_batch_that_had_input():
    assert batch_time_breakdown([]) is None
    assert batch_time_breakdown([_progress(0, 5, 0, 0)]) is None


class _JavaThrowable:
    """Stands in for a Py4J Java exception: toString() and getCause()."""

    def __init__(self, text: str, cause: _JavaThrowable | None = None) -> None:
        self.text, self.cause = text, cause

    def toString(self) -> str:
        return self.text

    def getCause(self) -> _JavaThrowable | None:
        return self.cause


class _QueryException(Exception):
    """Stands in for PySpark's captured exceptions: a Java origin and/or a captured cause."""

    def __init__(self, message: str, origin: _JavaThrowable | None, cause: Exception | None = None) -> None:
        super().__init__(message)
        self._origin = origin
        self._cause = cause


def test_a_checkpoint_helper_killed_by_ctrl_c_or_sigterm_is_recognised_in_the_cause_chain():
    for code in (130, 143):
        helper = _JavaThrowable(
            f"org.apache.hadoop.util.Shell$ExitCodeException: ExitCodeException exitCode={code}: "
        )
        exc = _QueryException("=== Streaming Query ===", _JavaThrowable("StreamingQueryException", helper))
        assert killed_by_the_stop_signal(exc)
        # StreamingQuery.exception() passes no origin, only the cause, captured in its turn.
        captured = _QueryException(f"ExitCodeException exitCode={code}: ", None)
        assert killed_by_the_stop_signal(_QueryException("=== Streaming Query ===", None, captured))
    # The signal can also kill the JDK's spawn helper before it has exec'd chmod.
    for sig in (2, 15):
        spawn = _JavaThrowable(
            'java.io.IOException: Cannot run program "chmod": error=0, Failed to exec spawn helper: '
            f"pid: 18466, signal: {sig}"
        )
        assert killed_by_the_stop_signal(
            _QueryException("=== Streaming Query ===", _JavaThrowable("q", spawn))
        )


def test_other_query_failures_are_not_taken_for_a_stop():
    exit_1 = _JavaThrowable("ExitCodeException exitCode=1: chmod: cannot access")
    assert not killed_by_the_stop_signal(_QueryException("boom", _JavaThrowable("wrapper", exit_1)))
    assert not killed_by_the_stop_signal(_QueryException("java.io.EOFException", None))
    assert not killed_by_the_stop_signal(_QueryException("ExitCodeException exitCode=1300", None))
    spawn_9 = _JavaThrowable("Failed to exec spawn helper: pid: 18466, signal: 9")  # not a stop signal
    assert not killed_by_the_stop_signal(_QueryException("boom", spawn_9))


def test_a_failed_batch_is_re_raised_in_a_few_lines_keeping_the_reason_and_the_stop_signature():
    """Spark reads the whole foreachBatch traceback with a regex that overflows the JVM stack on long ones."""
    from streaming.query import BatchFailed, short_errors

    java = "\n".join(f"\tat org.apache.spark.Frame{i}.run(Frame.java:{i})" for i in range(3000))
    huge = (
        "An error occurred while calling o77.collect.\n: org.apache.spark.SparkException: Job 4 cancelled\n"
        f"{java}\nCaused by: java.lang.InterruptedException\n{java}\n"
        "streaming.plan.SinkError: cannot write batch 3: the broker is unreachable\n"
    )
    with pytest.raises(BatchFailed) as caught, short_errors():
        raise RuntimeError(huge)
    text = str(caught.value)
    assert len(text) < 1000 and len(huge) > 100_000
    assert text.splitlines()[0] == "SinkError: cannot write batch 3: the broker is unreachable"
    # What Spark's StreamExecution.PROXY_ERROR looks for, so a stop mid-batch is still a stop.
    assert re.search(
        r"py4j.protocol.Py4JJavaError: An error occurred while calling.+(\r\n|\r|\n): java.lang.InterruptedException",
        text,
    )
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_batch_zero_starts_where_the_jvm_source_recorded_it_or_at_json_starting_offsets(tmp_path):
    write_offsets(tmp_path, 0, {"events": {"0": 30, "1": 12}})
    assert batch_ranges(str(tmp_path), 0) is None  # kafka_py with earliest / latest: unknown
    # -2 (earliest) is the source's to resolve: that partition's start is unknown, so the whole is
    with_json = batch_ranges(str(tmp_path), 0, starting='{"events": {"0": 5, "1": -2}}')
    assert with_json is None
    assert batch_ranges(str(tmp_path), 0, starting='{"events": {"0": 5, "1": 3}}') == {
        ("events", 0): (5, 30),
        ("events", 1): (3, 12),
    }
    sources = tmp_path / "sources" / "0"
    sources.mkdir(parents=True)
    (sources / "0").write_bytes(b'\x00v1\n{"events":{"0":4,"1":2}}')  # KafkaSourceInitialOffsetWriter
    assert batch_ranges(str(tmp_path), 0) == {("events", 0): (4, 30), ("events", 1): (2, 12)}


def test_a_remote_checkpoint_is_read_through_the_reader_it_is_given(tmp_path):
    write_offsets(tmp_path, 3, {"events": {"0": 100}})
    write_offsets(tmp_path, 4, {"events": {"0": 130}})
    asked: list[str] = []

    def read(path: str) -> str:
        asked.append(path)
        return (tmp_path / path.removeprefix("hdfs://nn/ck/")).read_text()

    assert batch_ranges("hdfs://nn/ck", 4, read=read) == {("events", 0): (100, 130)}
    assert asked == ["hdfs://nn/ck/offsets/4", "hdfs://nn/ck/offsets/3"]


@pytest.mark.spark
def test_the_hadoop_reader_reads_checkpoint_files_through_the_jvm(spark, tmp_path):
    write_offsets(tmp_path, 1, {"events": {"0": 7}})
    write_offsets(tmp_path, 2, {"events": {"0": 9}})
    read = hadoop_reader(spark)
    assert batch_ranges(f"file://{tmp_path}", 2, read=read) == {("events", 0): (7, 9)}
    assert batch_ranges(f"file://{tmp_path}", 5, read=read) is None  # no such file: unknown
