"""Helpers and fixtures for the streaming tests: topic helpers, events, the demo model.

The broker fixtures (``kafka`` = Apache Kafka, ``tansu``, ``any_kafka``) live in
:mod:`tests.streaming.brokers` and are registered by ``tests/conftest.py``, so
that ``tests/test_parity.py`` shares the session's brokers.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from streaming import kafka_client as kc
from udfs.spec import ModelSpec, ResolvedModel, resolve

ROOT = Path(__file__).resolve().parents[2]
APACHE, TANSU = "apache", "tansu"
# Generous liveness bound for reads: a wedged broker fails a test instead of hanging it.
POLL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    timestamp_ms: int


class Kafka:
    """Topic helpers bound to one broker; ``latest_by`` is how kafka_py should find its log ends."""

    def __init__(self, bootstrap: str, *, kind: str = APACHE, latest_by: str = kc.LIST_OFFSETS) -> None:
        self.bootstrap = bootstrap
        self.kind = kind
        self.latest_by = latest_by
        self.conf = {"bootstrap.servers": bootstrap}

    def topic(self, partitions: int = 1, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        kc.ensure_topics(self.conf, {name: partitions}, timeout_s=POLL_TIMEOUT_S)
        return name

    def produce(
        self,
        topic: str,
        values: list[bytes | None],
        *,
        keys: list[bytes | None] | None = None,
        partition: int | Callable[[int], int] | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        """Send values (round-robin over partitions unless ``partition`` says otherwise) and wait for acks."""
        producer = Producer({**self.conf, "linger.ms": 5})
        parts = len(kc.topic_partitions(kc.make_admin(self.conf), POLL_TIMEOUT_S)[topic])
        errors: list[Any] = []
        for i, value in enumerate(values):
            p = partition(i) if callable(partition) else (i % parts if partition is None else partition)
            producer.produce(
                topic,
                value=value,
                key=None if keys is None else keys[i],
                partition=p,
                headers=headers,
                on_delivery=lambda err, _m: err and errors.append(err),
            )
        assert producer.flush(POLL_TIMEOUT_S) == 0 and not errors, f"produce to {topic} failed: {errors}"

    def end_offsets(self, topic: str) -> dict[int, int]:
        offsets = kc.Offsets(self.conf, latest_by=kc.FETCH_PROBE, timeout_s=POLL_TIMEOUT_S)
        try:
            parts = offsets.partitions().get(topic, [])
            return {p: off for (_, p), off in offsets.latest([(topic, p) for p in parts]).items()}
        finally:
            offsets.close()

    def read(self, topic: str) -> list[Record]:
        """Every record of the topic, partition by partition, in offset order."""
        consumer = kc.make_consumer(self.conf)
        out = []
        try:
            for part, end in sorted(self.end_offsets(topic).items()):
                for msgs in kc.read_range(consumer, topic, part, 0, end, timeout_s=POLL_TIMEOUT_S):
                    out += [
                        Record(
                            m.topic(),
                            m.partition(),
                            m.offset(),
                            m.key(),
                            m.value(),
                            {k: v for k, v in (m.headers() or [])},
                            m.timestamp()[1],
                        )
                        for m in msgs
                    ]
        finally:
            consumer.close()
        return out

    def count(self, topic: str) -> int:
        """Committed records in the topic (log ends would also count transaction markers)."""
        return len(read_records(self, topic))


@pytest.fixture(scope="session")
def stream_model(models) -> ResolvedModel:
    """The demo CTR model reading one array field ``features`` of 4 values, as events carry them."""
    return resolve(
        ModelSpec(
            path=models["torchscript"],
            input_columns=("features",),
            num_features=4,
            name="demo_ctr",
            device="cpu",
            batch_size=256,
        )
    )


def event(user: str, features: Any, ts: str = "2026-01-01T00:00:00Z") -> bytes:
    return json.dumps({"user_id": user, "features": features, "timestamp": ts}).encode()


def wait_until(check: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    """Poll until ``check`` holds; fail naming ``what`` (a liveness bound, not a timing assertion)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


# -- guarantees: stream job configs built in code (tests/streaming/test_faults.py, test_sink.py) ---


def stream_config_dict(k: Kafka, tag: str, *, model_path: str = "unused.pt", **sections: dict[str, Any]):
    """The TOML sections of a stream config on broker ``k`` whose topics and checkpoint are named after ``tag``.

    ``sections`` override or extend them (``input={...}``, ``output={...}``, ...).
    """
    raw: dict[str, dict[str, Any]] = {
        "model": {
            "path": model_path,
            "name": "demo_ctr",
            "input_columns": ["features"],
            "num_features": 4,
            "device": "cpu",
            "batch_size": 256,
        },
        "kafka": {"bootstrap_servers": k.bootstrap, "source": "kafka_py", "poll_timeout_ms": 30000},
        "input": {"topic": f"events-{tag}", "starting_offsets": "earliest"},
        "output": {
            "topic": f"predictions-{tag}",
            "dlq_topic": f"dlq-{tag}",
            "commit_topic": f"commits-{tag}",
            "partitions": 2,
        },
        "stats": {"enabled": False, "topic": f"stats-{tag}"},
        "job": {"query_name": f"q_{tag.replace('-', '_')}"},
        "spark": {"spark.master": "local[2]", "spark.ui.enabled": "false"},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


def stream_config(k: Kafka, tag: str, *, model_path: str = "unused.pt", **sections: dict[str, Any]):
    """:func:`stream_config_dict` parsed into a StreamConfig."""
    from streaming.config import StreamConfig
    from udfs.config import from_dict

    raw = stream_config_dict(k, tag, model_path=model_path, **sections)
    return from_dict(StreamConfig, raw, where="test stream config")


def write_toml(raw: dict[str, dict[str, Any]], path: Path) -> Path:
    """A config dict as TOML (strings, numbers, booleans, lists, inline tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return str(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        return json.dumps(str(v))

    lines = []
    for section, values in raw.items():
        lines.append(f"[{section}]")
        lines += [f"{json.dumps(k) if '.' in k else k} = {value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def read_records(k: Kafka, topic: str, *, committed: bool = True) -> list[Any]:
    """Every record of ``topic`` a consumer sees now: read_committed (the sink's promise) or read_uncommitted.

    On Apache Kafka a committed read ends at the last stable offset: a transaction still open
    (a writer killed inside it) is not waited for, as a consumer would not see past it either.
    """
    conf = kc.committed_reader_conf(k.conf) if committed else k.conf
    consumer = kc.make_consumer(conf)
    out: list[Any] = []
    ends = k.end_offsets(topic)
    if committed and k.kind == APACHE:
        stable = kc.Offsets(conf, timeout_s=POLL_TIMEOUT_S)
        try:
            ends = {p: off for (_, p), off in stable.latest([(topic, p) for p in ends]).items()}
        finally:
            stable.close()
    try:
        for part, end in sorted(ends.items()):
            for msgs in kc.read_range(
                consumer, topic, part, 0, end, timeout_s=POLL_TIMEOUT_S, committed=committed
            ):
                out += msgs
    finally:
        consumer.close()
    return out


FAULTS_JSON_ENV = "SPARKSCORE_FAULTS_JSON"
_FAULT_RESULTS: dict[str, dict[str, int]] = {}


@pytest.fixture
def fault_results() -> dict[str, dict[str, int]]:
    """Scenario -> {events, duplicates, lost, deduplicated}; ``make faults`` writes them to a JSON file."""
    return _FAULT_RESULTS


def pytest_sessionfinish(session, exitstatus) -> None:
    import fcntl
    import os
    import tempfile

    path = os.environ.get(FAULTS_JSON_ENV)
    if path and _FAULT_RESULTS:
        # pytest-xdist workers each finish with their own results: merge them under a lock.
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(Path(tempfile.gettempdir()) / "sparkscore-faults-json.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            merged = json.loads(out.read_text()) if out.exists() and out.stat().st_size else {}
            merged.update(_FAULT_RESULTS)
            out.write_text(json.dumps(dict(sorted(merged.items())), indent=2) + "\n")


def tally(seen: dict[str, int], expected: set[str], deduplicated: int) -> dict[str, int]:
    """A fault scenario's outcome: records per event id seen on the output vs. the events sent."""
    return {
        "events": len(expected),
        "duplicates": sum(n - 1 for n in seen.values() if n > 1) + len(set(seen) - expected),
        "lost": len(expected - set(seen)),
        "deduplicated": deduplicated,
    }


# `make test` runs each fault window on one source, the two alternating across windows, so both
# sources see task kills, driver kills and Spark's task retry within the suite's time budget;
# `make faults` (it sets SPARKSCORE_FAULTS_JSON) runs every window on both sources.
FAULT_SOURCES = ("kafka", "kafka_py")
EVERY_SOURCE = bool(os.environ.get("SPARKSCORE_FAULTS_JSON"))


def suite_sources(source: str) -> tuple[str, ...]:
    """``source`` alone in ``make test``, both sources in ``make faults``."""
    assert source in FAULT_SOURCES, source
    return FAULT_SOURCES if EVERY_SOURCE else (source,)


def on_source(source: str) -> pytest.MarkDecorator:
    """The ``scenario`` fixture for ``source`` in ``make test``, for both sources in ``make faults``."""
    assert source in FAULT_SOURCES, source
    return pytest.mark.parametrize(
        "scenario", FAULT_SOURCES if EVERY_SOURCE else [source], indirect=True, ids=lambda s: f"source={s}"
    )


@pytest.fixture(params=FAULT_SOURCES, ids=lambda s: f"source={s}")
def scenario(request, apache, spark, stream_model, models, tmp_path, monkeypatch):
    """Makes a fault scenario (``tests/streaming/fault_scenarios.py``) with each source in turn."""
    from tests.streaming.fault_scenarios import Scenario

    def make(tag: str) -> Any:
        return Scenario(
            apache, spark, stream_model, models["torchscript"], tmp_path, monkeypatch, tag, request.param
        )

    return make
