"""Device placement and thread counts follow what Spark assigned to the task."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from udfs.device import resolve_device, set_threads, task_threads


@dataclass
class Gpu:
    addresses: list[str]


class FakeTaskContext:
    """The two TaskContext calls the core uses: resources() and cpus()."""

    def __init__(self, gpus: list[str] | None = None, cpus: int = 1) -> None:
        self._gpus = gpus
        self._cpus = cpus

    def resources(self) -> dict[str, Gpu]:
        return {"gpu": Gpu(self._gpus)} if self._gpus is not None else {}

    def cpus(self) -> int:
        return self._cpus


def test_auto_uses_the_gpu_spark_assigned_to_the_task(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", FakeTaskContext(gpus=["3"])) == "cuda:3"


def test_auto_without_assigned_gpu_falls_back_to_cuda0_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", FakeTaskContext()) == "cuda:0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", FakeTaskContext(gpus=["1"])) == "cpu"
    assert resolve_device("auto", None) == "cpu"


def test_explicit_cuda_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda", FakeTaskContext())
    assert resolve_device("cpu", FakeTaskContext(gpus=["0"])) == "cpu"


def test_threads_follow_spark_task_cpus():
    before = torch.get_num_threads()
    try:
        set_threads(task_threads(FakeTaskContext(cpus=3)))
        assert torch.get_num_threads() == 3
        set_threads(task_threads(None))  # outside Spark: one thread per process
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.spark
def test_inside_spark_tasks_threads_equal_spark_task_cpus(spark, models):
    from udfs.core import load_scorer
    from udfs.spec import ModelSpec, resolve

    model = resolve(ModelSpec(path=models["torchscript"], input_columns=("a", "b", "c", "d")))

    def probe(batches):
        import pyarrow as pa

        for _ in batches:
            pass
        load_scorer(model)
        yield pa.record_batch({"threads": pa.array([torch.get_num_threads()], pa.int32())})

    got = {r.threads for r in spark.range(4, numPartitions=2).mapInArrow(probe, "threads int").collect()}
    assert got == {int(spark.conf.get("spark.task.cpus", "1"))}
