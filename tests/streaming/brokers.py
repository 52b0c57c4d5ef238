"""Broker fixtures shared by every test folder (registered in ``tests/conftest.py``).

Apache Kafka is the broker the tests run against: ``broker`` / ``kafka`` (alias
``apache_kafka`` / ``apache``) is one KRaft node per session (jars from ``make
jars``, log dir in a temp dir removed afterwards). ``tansu_broker`` / ``tansu``
is one Tansu broker per session (in memory, no JVM: what ``make stream-demo``
runs). A broker that cannot start FAILS the tests that need it (never skips).
Topics get unique names, so tests share a broker without sharing data.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from streaming import kafka_client as kc
from streaming.broker import ApacheKafkaBroker, BrokerError, LocalBroker, TansuBroker
from tests.streaming.conftest import APACHE, TANSU, Kafka


def _session_broker(b: LocalBroker) -> Iterator[LocalBroker]:
    try:
        # A liveness bound: Apache Kafka starts in about 10 s on a quiet machine, much later on a loaded one.
        b.start(timeout_s=180)
    except BrokerError as exc:
        pytest.fail(f"cannot start the {b.kind} test broker: {exc}", pytrace=False)
    yield b
    # Spark's Python workers cache Kafka clients that would log reconnect errors once the broker is gone.
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        active.stop()
    b.stop()


# Kafka's defaults, except how often two background jobs look for work: the coordinator's sweep for
# transactions past their timeout (10 s) and the log cleaner's idle wait (15 s). The tests that
# need a transaction aborted by timeout, or a compaction, then wait a second instead of 10-15.
TEST_BROKER_SETTINGS = {
    "transaction.abort.timed.out.transaction.cleanup.interval.ms": "1000",
    "log.cleaner.backoff.ms": "500",
}


@pytest.fixture(scope="session")
def apache_kafka(tmp_path_factory) -> Iterator[LocalBroker]:
    """One Apache Kafka KRaft node; its log dir is a temp dir, removed when the session ends."""
    log = tmp_path_factory.mktemp("apache-kafka") / "server.log"
    yield from _session_broker(ApacheKafkaBroker(log_path=str(log), settings=TEST_BROKER_SETTINGS))


@pytest.fixture(scope="session")
def apache(apache_kafka) -> Kafka:
    """Topic helpers bound to the Apache Kafka broker (kafka_py finds log ends with ListOffsets)."""
    return Kafka(apache_kafka.bootstrap, kind=APACHE, latest_by=kc.LIST_OFFSETS)


@pytest.fixture(scope="session")
def broker(apache_kafka) -> LocalBroker:
    """The default test broker: Apache Kafka."""
    return apache_kafka


@pytest.fixture(scope="session")
def kafka(apache) -> Kafka:
    """Topic helpers bound to the default test broker (Apache Kafka)."""
    return apache


@pytest.fixture(scope="session")
def tansu_broker(tmp_path_factory) -> Iterator[LocalBroker]:
    """Tansu, in memory."""
    yield from _session_broker(TansuBroker(log_path=str(tmp_path_factory.mktemp("tansu") / "tansu.log")))


@pytest.fixture(scope="session")
def tansu(tansu_broker) -> Kafka:
    """Topic helpers bound to Tansu; its ListOffsets "latest" is a batch short, so kafka_py probes by fetch."""
    return Kafka(tansu_broker.bootstrap, kind=TANSU, latest_by=kc.FETCH_PROBE)
