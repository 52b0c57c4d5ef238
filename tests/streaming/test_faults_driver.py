"""Every crash window of the stream job's driver, with the driver process killed for real, then a restart.

The job runs as its own process (``python jobs/stream_score.py``) with the JVM ``kafka``
source and with ``kafka_py``; at the named point the fault sends SIGKILL to its process
group (the Python driver and its JVM), leaving whatever transaction was open. The restart
runs on the same checkpoint and must leave exactly one record per event for
``read_committed`` consumers (see ``fault_scenarios.py``).
"""

from __future__ import annotations

import pytest

from tests.streaming.conftest import on_source

pytestmark = [pytest.mark.kafka, pytest.mark.spark, pytest.mark.slow]


# -- batch 0: the tasks wrote and committed; the driver writes only the marker ------------------


@on_source("kafka_py")
def test_the_driver_killed_after_the_tasks_committed_but_before_the_marker(scenario, fault_results):
    s = scenario("before-marker")
    s.kill_driver_at("driver.before_marker:batch=0")
    assert (s.folder / "writer.after_commit-p0-b0").exists() and (
        s.folder / "writer.after_commit-p1-b0"
    ).exists()
    deduplicated = s.restart()
    assert deduplicated == 8  # the whole batch was committed by its tasks
    s.check("before_marker", deduplicated, fault_results)


@on_source("kafka")
def test_the_driver_killed_after_the_marker_before_sparks_commit(scenario, fault_results):
    s = scenario("after-marker")
    s.kill_driver_at("driver.after_marker:batch=0")
    deduplicated = s.restart()
    assert deduplicated == 8  # Spark re-runs batch 0; its marker says it is written
    s.check("after_marker", deduplicated, fault_results)


# -- batch 1: the driver writes records and marker in one transaction ---------------------------


@on_source("kafka")
def test_the_driver_killed_before_it_produces(scenario, fault_results):
    s = scenario("driver-before-produce")
    s.kill_driver_at("driver.before_produce:batch=1")
    deduplicated = s.restart()
    assert deduplicated == 0
    s.check("driver_before_produce", deduplicated, fault_results)
    assert sum(s.seen(committed=False).values()) == 16


@on_source("kafka_py")
def test_the_driver_killed_after_k_of_its_records(scenario, fault_results):
    s = scenario("driver-after-k")
    s.kill_driver_at("driver.after_records:k=5,batch=1")
    deduplicated = s.restart()
    assert deduplicated == 0  # nothing of batch 1 was committed
    s.check("driver_after_k_of_n", deduplicated, fault_results)
    assert sum(s.seen(committed=False).values()) == 16 + 5


@on_source("kafka")
def test_the_driver_killed_with_its_records_sent_before_the_marker(scenario, fault_results):
    s = scenario("driver-before-marker")
    s.kill_driver_at("driver.before_marker:batch=1")
    deduplicated = s.restart()
    assert deduplicated == 0  # records and marker were one transaction, never committed
    s.check("driver_before_marker", deduplicated, fault_results)
    assert sum(s.seen(committed=False).values()) == 16 + 8
