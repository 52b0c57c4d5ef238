"""The request hot path's shortcuts keep their meaning: one in-process cache entry per row of features,
however the row arrives (by position, by name, through KServe v2, as an array column), and the TTL holds."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

import pytest

from serving.batcher import Batcher
from serving.config import BatcherConfig
from serving.errors import DeadlineExceeded
from serving.metrics import US_BUCKETS, Histogram, VersionMetrics
from tests.serving.conftest import GatedRunner
from udfs.demo import CTR_FEATURES

ROW = [31.0, 4.0, 19.5, 7.0]


def test_one_cache_entry_per_row_by_position_by_name_and_through_v2(serve, ctr_model):
    runner = GatedRunner(ctr_model)
    srv = serve(runner=runner)
    first = srv.post("/predict", {"features": ROW}).json()
    assert first["cache_hit"] is False
    by_name = srv.post("/predict", {"features": dict(zip(CTR_FEATURES, ROW, strict=True))}).json()
    assert by_name["cache_hit"] is True
    assert by_name["score"] == first["score"]
    inputs = [
        {"name": c, "shape": [1], "datatype": "FP64", "data": [v]}
        for c, v in zip(CTR_FEATURES, ROW, strict=True)
    ]
    v2 = srv.post("/v2/models/demo_ctr/infer", {"inputs": inputs}).json()
    assert v2["parameters"]["cache_hits"] == 1
    assert [o for o in v2["outputs"] if o["name"] == "score"][0]["data"] == [first["score"]]
    assert runner.rows_seen() == [tuple(ROW)]
    assert srv.metric("nv_cache_num_hits_per_model") == 2
    assert srv.metric("nv_cache_num_misses_per_model") == 1
    # A different row is a different entry.
    other = srv.post("/predict", {"features": [*ROW[:3], 8.0]}).json()
    assert other["cache_hit"] is False


def test_an_array_column_model_caches_its_vector(serve, clf_model):
    srv = serve(model=clf_model)
    vec = [0.1, -0.2, 0.3, 0.0, 1.5, -1.0]
    first = srv.post("/predict", {"features": vec}).json()
    assert first["cache_hit"] is False
    again = srv.post("/predict", {"features": {"features": vec}}).json()
    assert again["cache_hit"] is True
    assert again["probabilities"] == first["probabilities"]
    assert srv.post("/predict", {"features": [*vec[:5], 2.0]}).json()["cache_hit"] is False


def test_an_entry_past_its_ttl_is_computed_again(serve):
    srv = serve(cache={"ttl_s": 0.2})
    assert srv.post("/predict", {"features": ROW}).json()["cache_hit"] is False
    time.sleep(0.3)
    assert srv.post("/predict", {"features": ROW}).json()["cache_hit"] is False
    assert srv.post("/predict", {"features": ROW}).json()["cache_hit"] is True


@pytest.mark.parametrize("values", [[], [50.0], [100.0, 100.5, 7e6, 0.0, 2_500.0, 99.9]])
def test_observe_each_records_what_observe_records(values):
    one, each = Histogram("h", "", US_BUCKETS), Histogram("h", "", US_BUCKETS)
    for v in values:
        one.observe(v)
    each.observe_each(values)
    assert (each.counts, each.count, each.sum) == (one.counts, one.count, pytest.approx(one.sum))


async def _deadline_cases() -> list[str]:
    """Requests held behind a computing batch: which ones get their 504 while the batch still runs."""
    gate = threading.Event()

    def score(rows: list[Any]) -> list[dict[str, Any]]:
        gate.wait(30)
        return [{"prediction": r[0]} for r in rows]

    batcher = Batcher(
        score, BatcherConfig(max_batch_size=1, max_wait_ms=0.0, workers=1), VersionMetrics("m", "v")
    )
    await batcher.start()
    seen: list[str] = []

    async def outcome(name: str, fut: asyncio.Future[Any]) -> None:
        with contextlib.suppress(DeadlineExceeded):
            await asyncio.wait_for(fut, 10)
        seen.append(f"{name}: {'504' if isinstance(fut.exception(), DeadlineExceeded) else fut.result()}")

    try:
        # In deadline order, sharing the timer: one computing, one queued behind it.
        computing, queued = batcher.submit((1.0,), 100.0), batcher.submit((2.0,), 150.0)
        await outcome("computing", computing)
        await outcome("queued", queued)
        gate.set()
        # Out of order: a shorter deadline than the one before it gets a timer of its own.
        gate.clear()
        long, short = batcher.submit((3.0,), 60_000.0), batcher.submit((4.0,), 50.0)
        await outcome("short", short)
        gate.set()
        await outcome("long", long)
        # The long one answered, the shared timer still armed for its 60 s: a new short deadline re-arms it.
        gate.clear()
        await outcome("fresh", batcher.submit((5.0,), 50.0))
    finally:
        gate.set()
        await batcher.stop()
    return seen


def test_deadlines_fire_while_the_batch_computes_in_and_out_of_order():
    assert asyncio.run(_deadline_cases()) == [
        "computing: 504",
        "queued: 504",
        "short: 504",
        "long: {'prediction': 3.0}",
        "fresh: 504",
    ]
