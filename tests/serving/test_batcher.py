"""The dynamic batcher under a real server: batching, pipelining, the stuck-request case,
load shedding (429), deadlines (504), model failures (500) and identical requests in flight."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import pytest

from tests.serving.conftest import GatedRunner, wait_until

HELD_AGE = 999.0  # a row with this age is held at the runner's gate


def row(age: float) -> list[float]:
    return [age, 3.0, 25.0, 4.0]


def holds(rows) -> bool:
    return any(r[0] == HELD_AGE for r in rows)


@pytest.fixture
def pool():
    with ThreadPoolExecutor(64) as ex:
        yield ex


def send(pool: ThreadPoolExecutor, url: str, body: dict) -> Future[httpx.Response]:
    return pool.submit(httpx.post, url + "/predict", json=body, timeout=20.0)


def test_concurrent_requests_are_scored_in_batches_larger_than_one(serve, ctr_model, pool):
    # Hold the first batch at the gate so the others queue up behind it whatever the machine's
    # load: how many arrive within max_wait_ms of each other is then not what the test depends on.
    runner = GatedRunner(ctr_model, hold=holds)
    srv = serve(
        runner=runner,
        batcher={"max_batch_size": 32, "max_wait_ms": 20.0, "workers": 1, "default_timeout_ms": 30_000.0},
        cache={"enabled": False},
    )
    first = send(pool, srv.url, {"features": row(HELD_AGE)})
    assert runner.entered.wait(10), "the first batch never reached the model"
    queued = [send(pool, srv.url, {"features": row(20.0 + i)}) for i in range(47)]
    wait_until(lambda: srv.metric("nv_inference_pending_request_count") == 47, "47 requests to queue")
    runner.gate.set()
    assert all(f.result(timeout=20).status_code == 200 for f in [first, *queued])
    assert sorted(len(b) for b in runner.batches) == [1, 15, 32]
    assert srv.metric("nv_inference_batch_size_sum") == 48
    assert srv.metric("nv_inference_batch_size_count") == 3


def test_a_request_arriving_while_a_batch_runs_is_not_stuck_when_its_timer_fires(serve, ctr_model, pool):
    # One worker: B must wait for A's batch. B's max_wait passes while A computes; a batcher that
    # drops B's timer then (lock + processing flag + one timer per first request) leaves B waiting
    # until its deadline. Here no later traffic arrives to rescue it.
    runner = GatedRunner(ctr_model, hold=holds)
    srv = serve(
        runner=runner,
        batcher={"max_batch_size": 8, "max_wait_ms": 5.0, "workers": 1, "default_timeout_ms": 30_000.0},
    )
    a = send(pool, srv.url, {"features": row(HELD_AGE)})
    assert runner.entered.wait(10), "batch A never reached the model"
    b = send(pool, srv.url, {"features": row(33.0)})
    wait_until(lambda: srv.metric("nv_inference_pending_request_count") == 1, "B to be queued")
    time.sleep(0.05)  # well past max_wait_ms: B's wait timer has fired while A is still computing
    runner.gate.set()
    assert a.result(timeout=10).status_code == 200
    resp_b = b.result(timeout=10)
    assert resp_b.status_code == 200, resp_b.text
    assert [r[0] for batch in runner.batches for r in batch] == [HELD_AGE, 33.0]


def test_batches_are_pipelined_a_slow_batch_does_not_block_the_next(serve, ctr_model, pool):
    runner = GatedRunner(ctr_model, hold=holds)
    srv = serve(runner=runner, batcher={"max_batch_size": 8, "max_wait_ms": 1.0, "workers": 2})
    slow = send(pool, srv.url, {"features": row(HELD_AGE)})
    assert runner.entered.wait(10)
    fast = send(pool, srv.url, {"features": row(41.0)})
    assert fast.result(timeout=10).status_code == 200
    assert not slow.done(), "the held batch finished early; the test proves nothing"
    runner.gate.set()
    assert slow.result(timeout=10).status_code == 200


def test_a_full_queue_answers_429_with_retry_after_at_once(serve, ctr_model, pool):
    runner = GatedRunner(ctr_model, hold=holds)
    srv = serve(
        runner=runner, batcher={"max_batch_size": 4, "max_wait_ms": 1.0, "workers": 1, "max_queue": 2}
    )
    held = send(pool, srv.url, {"features": row(HELD_AGE)})
    assert runner.entered.wait(10)
    queued = [send(pool, srv.url, {"features": row(50.0 + i)}) for i in range(2)]
    wait_until(lambda: srv.metric("nv_inference_pending_request_count") == 2, "two queued requests")
    shed = srv.post("/predict", {"features": row(60.0)})
    assert shed.status_code == 429
    assert shed.headers["retry-after"] == "1"
    assert "queue is full" in shed.json()["error"]
    assert srv.metric("sparkscore_shed_requests_total", reason="queue_full") == 1
    runner.gate.set()
    assert held.result(timeout=10).status_code == 200
    assert [f.result(timeout=10).status_code for f in queued] == [200, 200]


def test_an_expired_request_gets_504_and_never_reaches_the_model(serve, ctr_model, pool):
    runner = GatedRunner(ctr_model, hold=holds)
    srv = serve(runner=runner, batcher={"max_batch_size": 4, "max_wait_ms": 1.0, "workers": 1})
    held = send(pool, srv.url, {"features": row(HELD_AGE)})
    assert runner.entered.wait(10)
    late = srv.post("/predict", {"features": row(77.0), "timeout_ms": 100})
    assert late.status_code == 504
    assert "deadline" in late.json()["error"]
    runner.gate.set()
    assert held.result(timeout=10).status_code == 200
    assert srv.post("/predict", {"features": row(78.0)}).status_code == 200
    ages = [r[0] for r in runner.rows_seen()]
    assert 78.0 in ages and 77.0 not in ages
    assert srv.metric("sparkscore_shed_requests_total", reason="deadline") == 1


def test_a_model_exception_fails_its_batch_with_500_and_the_batcher_keeps_running(serve, ctr_model):
    runner = GatedRunner(ctr_model, poison=-1.0)
    srv = serve(runner=runner)
    failed = srv.post("/predict", {"features": row(-1.0)})
    assert failed.status_code == 500
    assert "poisoned row" in failed.json()["error"]
    assert srv.post("/predict", {"features": row(30.0)}).status_code == 200
    assert srv.metric("nv_inference_request_failure", reason="backend") == 1


def test_identical_requests_in_flight_are_computed_once(serve, ctr_model, pool):
    runner = GatedRunner(ctr_model, hold=holds)
    # A deadline far beyond the test's own waits: on a loaded machine 1 s can pass before the gate opens.
    srv = serve(
        runner=runner,
        batcher={"max_batch_size": 8, "max_wait_ms": 1.0, "workers": 1, "default_timeout_ms": 30_000.0},
    )
    held = send(pool, srv.url, {"features": row(HELD_AGE)})
    assert runner.entered.wait(10)
    twins = [send(pool, srv.url, {"user_id": i, "features": row(55.0)}) for i in range(3)]
    wait_until(
        lambda: srv.metric("sparkscore_cache_coalesced_total") == 2, "the twins to join one computation"
    )
    runner.gate.set()
    scores = {f.result(timeout=10).json()["score"] for f in twins}
    assert held.result(timeout=10).status_code == 200
    assert len(scores) == 1
    assert [r[0] for r in runner.rows_seen()].count(55.0) == 1


def test_a_queued_request_whose_client_disconnected_never_reaches_the_model(serve, ctr_model, pool):
    runner = GatedRunner(ctr_model, hold=holds)
    srv = serve(
        runner=runner,
        batcher={"max_batch_size": 8, "max_wait_ms": 1.0, "workers": 1, "default_timeout_ms": 30_000.0},
        cache={"enabled": False},
    )
    held = send(pool, srv.url, {"features": row(HELD_AGE)})
    assert runner.entered.wait(10)
    url = urlparse(srv.url)
    body = json.dumps({"features": row(66.0)}).encode()
    gone = socket.create_connection((url.hostname, url.port), timeout=10)
    gone.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    wait_until(lambda: srv.metric("nv_inference_pending_request_count") == 1, "the request to queue")
    gone.close()
    # A request sent after the hang-up is queued after the server has read the hang-up.
    later = send(pool, srv.url, {"features": row(67.0)})
    wait_until(lambda: srv.metric("nv_inference_pending_request_count") == 2, "the next request to queue")
    runner.gate.set()
    assert held.result(timeout=10).status_code == 200
    assert later.result(timeout=10).status_code == 200
    ages = [r[0] for r in runner.rows_seen()]
    assert 67.0 in ages and 66.0 not in ages
    assert srv.metric("sparkscore_canceled_requests_total") == 1


def test_a_stopped_batcher_refuses_work_instead_of_accepting_what_nothing_will_run(ctr_model):
    import asyncio

    from serving.batcher import Batcher
    from serving.config import BatcherConfig
    from serving.errors import NotReady
    from serving.metrics import VersionMetrics

    async def scenario() -> None:
        b = Batcher(lambda rows: rows, BatcherConfig(), VersionMetrics("m", "v1"))
        await b.start()
        await b.stop()
        with pytest.raises(NotReady, match="stopped"):
            await asyncio.wait_for(b.submit((1.0,), 1000.0), 5)

    asyncio.run(scenario())


def test_a_batch_goes_at_once_when_every_admitted_request_is_already_queued(serve):
    # max_wait_ms of a minute: a lone request (closed-loop clients, low load) must not wait for
    # company that is not coming. Nothing else is admitted, so its batch goes at once.
    srv = serve(batcher={"max_wait_ms": 60_000.0, "default_timeout_ms": 30_000.0}, cache={"enabled": False})
    with httpx.Client(timeout=20) as client:
        for i in range(3):
            resp = client.post(srv.url + "/predict", json={"features": row(30.0 + i)})
            assert resp.status_code == 200, resp.text
