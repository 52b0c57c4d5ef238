"""``[batcher] parallel_members``: ensemble members on the runner's thread pool, or one after another."""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from serving.config import BatcherConfig, ServeConfig, from_mapping, load_config
from serving.model import ModelRunner
from udfs.core import load_scorer
from udfs.errors import ConfigError
from udfs.spec import resolve

ROOT = Path(__file__).resolve().parents[2]
WIDTH = 4


@pytest.fixture(scope="module")
def member_paths(tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("members")
    paths = []
    for i in range(3):
        torch.manual_seed(20 + i)
        module = torch.nn.Sequential(torch.nn.Linear(WIDTH, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).eval()
        path = out / f"m{i}.pt"
        torch.jit.save(torch.jit.script(module), str(path))
        paths.append(str(path))
    return paths


def config(paths: list[str], **batcher: Any) -> ServeConfig:
    return from_mapping(
        {
            "model": {
                "name": "ens",
                "input_columns": ["f"],
                "num_features": WIDTH,
                "device": "cpu",
                "members": [{"path": p, "name": f"m{i}"} for i, p in enumerate(paths)],
            },
            "batcher": {"max_batch_size": 8, **batcher},
        }
    )


def threads_seen(runner: ModelRunner) -> tuple[list[tuple[int, str]], list[dict[str, Any]]]:
    """Score a few rows and record (member index, thread name) for every member call."""
    runner.load()
    assert runner.scorer is not None
    seen: list[tuple[int, str]] = []
    real = runner.scorer.run_member

    def spy(index: int, x: np.ndarray) -> np.ndarray:
        seen.append((index, threading.current_thread().name))
        return real(index, x)

    runner.scorer.run_member = spy  # type: ignore[method-assign]
    rows = [([float(i + j) for j in range(WIDTH)],) for i in range(5)]
    try:
        return seen, runner.score(rows)
    finally:
        runner.close()


def test_default_is_parallel_and_the_shipped_config_says_so() -> None:
    assert BatcherConfig().parallel_members is True
    assert load_config(str(ROOT / "conf" / "serve.toml")).batcher.parallel_members is True


def test_parallel_members_must_be_a_boolean(member_paths) -> None:
    with pytest.raises(ConfigError, match="parallel_members must be true or false"):
        config(member_paths, parallel_members="no")


def test_parallel_members_run_on_the_member_pool(member_paths) -> None:
    runner = ModelRunner.from_config(config(member_paths, parallel_members=True))
    seen, out = threads_seen(runner)
    assert sorted(i for i, _ in seen) == [0, 1, 2]
    caller = threading.current_thread().name
    assert all(name.startswith("member") and name != caller for _, name in seen), seen
    assert [r["degraded"] for r in out] == [False] * 5


def test_sequential_members_run_in_turn_on_the_calling_thread(member_paths) -> None:
    runner = ModelRunner.from_config(config(member_paths, parallel_members=False))
    seen, out = threads_seen(runner)
    assert runner._member_pool is None
    caller = threading.current_thread().name
    assert seen == [(0, caller), (1, caller), (2, caller)]
    assert [r["degraded"] for r in out] == [False] * 5


def test_both_modes_give_the_same_predictions(member_paths) -> None:
    _, parallel = threads_seen(ModelRunner.from_config(config(member_paths, parallel_members=True)))
    _, sequential = threads_seen(ModelRunner.from_config(config(member_paths, parallel_members=False)))
    assert [r["prediction"] for r in parallel] == [r["prediction"] for r in sequential]
    assert len({r["prediction"] for r in parallel}) == 5  # distinct rows, distinct scores: not all zeros


def test_every_concurrent_batch_gets_a_thread_per_member(member_paths) -> None:
    # Two batcher workers x three members: six member calls at once must all be running together
    # (a barrier of six), or a batch's members would queue behind the other batch's.
    runner = ModelRunner.from_config(config(member_paths, parallel_members=True, workers=2))
    runner.load()
    assert runner.scorer is not None
    real = runner.scorer.run_member
    together = threading.Barrier(6)

    def meet(index: int, x: np.ndarray) -> np.ndarray:
        together.wait(timeout=20)
        return real(index, x)

    runner.scorer.run_member = meet  # type: ignore[method-assign]
    rows = [([1.0, 2.0, 3.0, 4.0],)]
    try:
        with ThreadPoolExecutor(2) as batches:
            outs = list(batches.map(lambda _: runner.score(rows), range(2)))
    finally:
        runner.close()
    assert [o[0]["degraded"] for o in outs] == [False, False]


def test_member_timeout_bounds_the_call_including_a_wait_for_a_thread(member_paths) -> None:
    from udfs.core import QuorumError

    spec = config(member_paths).model
    model = resolve(dataclasses.replace(spec, member_timeout_ms=200.0))
    scorer = load_scorer(model)
    x = np.ones((2, WIDTH), dtype=np.float32)
    with ThreadPoolExecutor(1) as pool:
        pool.submit(time.sleep, 5.0)  # the pool's only thread is busy far past the member timeout
        with pytest.raises(QuorumError, match="timed out after 200 ms"):
            scorer.predict(x, pool=pool)
