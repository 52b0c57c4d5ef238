"""Device placement and thread counts follow what Spark assigned to the task."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from udfs.device import resolve_device, set_threads, task_gpu, task_threads
from udfs.errors import DeviceError


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


@pytest.fixture
def cuda(monkeypatch):
    """A host that has CUDA with 8 devices, as far as device placement can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_auto_uses_the_gpu_spark_assigned_to_the_task(cuda):
    assert resolve_device("auto", FakeTaskContext(gpus=["3"])) == "cuda:3"
    assert resolve_device("cuda", FakeTaskContext(gpus=["5"])) == "cuda:5"


def test_a_task_with_several_gpus_uses_one_the_first_spark_assigned(cuda):
    assert resolve_device("auto", FakeTaskContext(gpus=["2", "0"])) == "cuda:2"


def test_addresses_index_cuda_visible_devices_as_sparks_distributor_does(cuda, monkeypatch):
    # Spark's addresses are positions in CUDA_VISIBLE_DEVICES (pyspark.ml.torch.distributor), which
    # is also how torch numbers the devices this process sees.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert task_gpu(FakeTaskContext(gpus=["1"])) == 1
    assert resolve_device("auto", FakeTaskContext(gpus=["1"])) == "cuda:1"
    with pytest.raises(DeviceError, match=r"Spark assigned GPU 2, but CUDA_VISIBLE_DEVICES='4,6' lists 2"):
        resolve_device("auto", FakeTaskContext(gpus=["2"]))


@pytest.mark.parametrize("address", ["gpu0", "01", "", "-1", "1.0"])
def test_gpu_addresses_cuda_cannot_use_are_refused_with_a_sentence(cuda, address):
    with pytest.raises(DeviceError, match="CUDA needs integer ordinals without zero padding"):
        resolve_device("auto", FakeTaskContext(gpus=[address]))


def test_a_gpu_beyond_the_devices_this_process_sees_is_refused(cuda):
    with pytest.raises(DeviceError, match=r"GPU 9 was asked for \('cuda:9'\) but this process sees 8"):
        resolve_device("cuda:9", FakeTaskContext())
    with pytest.raises(DeviceError, match="GPU 8 was asked for"):
        resolve_device("auto", FakeTaskContext(gpus=["8"]))


def test_auto_without_assigned_gpu_falls_back_to_cuda0_then_cpu(monkeypatch, cuda):
    assert resolve_device("auto", FakeTaskContext()) == "cuda:0"
    assert resolve_device("auto", None) == "cuda:0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", FakeTaskContext(gpus=["1"])) == "cpu"
    assert resolve_device("auto", None) == "cpu"


def test_explicit_cuda_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match=f"device '{device}' was requested but CUDA is not available"):
            resolve_device(device, FakeTaskContext())
    assert resolve_device("cpu", FakeTaskContext(gpus=["0"])) == "cpu"


def test_a_reused_worker_keeps_models_on_one_gpu_only(monkeypatch, tmp_path):
    """A later task can hand the same Python worker another GPU: the copies on the old one go."""
    from udfs import model_cache
    from udfs.spec import ResolvedMember

    monkeypatch.setattr(model_cache, "load_module", lambda path, fmt, device: f"module on {device}")
    monkeypatch.setattr(model_cache, "files_hash", lambda files: "h")
    path = tmp_path / "m.pt"
    path.write_bytes(b"x")
    member = ResolvedMember("m", str(path), "h", "v", "torchscript", 1.0)
    model_cache.clear()
    try:
        model_cache.get_model(member, "cpu")
        model_cache.get_model(member, "cuda:0")
        assert model_cache.get_model(member, "cuda:1") == "module on cuda:1"
        assert sorted(device for _, device in model_cache._cache) == ["cpu", "cuda:1"]
    finally:
        model_cache.clear()


def test_threads_follow_spark_task_cpus():
    before = torch.get_num_threads()
    try:
        set_threads(task_threads(FakeTaskContext(cpus=3)))
        assert torch.get_num_threads() == 3
        set_threads(task_threads(None))  # outside Spark: one thread per process
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# Run in a Spark of its own: the shared session has spark.task.cpus = 1, where a scorer that always
# took one thread would pass too.
TASK_CPUS_PROBE = """
import sys
import pyarrow as pa
import torch
from pyspark.sql import SparkSession
from udfs.core import load_scorer
from udfs.spec import ModelSpec, resolve

spark = (
    SparkSession.builder.master("local[4]").config("spark.task.cpus", "2")
    .config("spark.ui.enabled", "false").getOrCreate()
)
model = resolve(ModelSpec(path=sys.argv[1], input_columns=("a", "b", "c", "d")))

def probe(batches):
    for _ in batches:
        pass
    load_scorer(model)
    yield pa.record_batch({"threads": pa.array([torch.get_num_threads()], pa.int32())})

print("THREADS", sorted({r.threads for r in spark.range(4, numPartitions=2).mapInArrow(probe, "threads int").collect()}))
spark.stop()
"""


@pytest.mark.slow
@pytest.mark.spark
def test_inside_spark_tasks_threads_equal_spark_task_cpus(models, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "probe.py"
    script.write_text(TASK_CPUS_PROBE)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(script), models["torchscript"]],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "THREADS [2]" in proc.stdout, proc.stderr[-2000:]
