"""Where a model runs and how many threads it gets.

``device = "auto"`` follows Spark's GPU scheduling convention: the GPU that
Spark assigned to this task (``spark.task.resource.gpu.amount``, visible as
``TaskContext.resources()["gpu"]``), else ``cuda:0`` when CUDA is present, else
the CPU. GPU addresses are read the way ``pyspark.ml.torch.distributor``
reads them (``_get_gpus_owned``): integer ordinals without zero padding, and
indexes into ``CUDA_VISIBLE_DEVICES`` when that is set, which is also how torch
numbers the devices this process sees. A task uses one device: the first GPU
Spark assigned to it. Intra-op threads follow ``spark.task.cpus`` so N
concurrent tasks on N cores do not oversubscribe the machine.
"""

from __future__ import annotations

import os
import re
from typing import Any

from udfs.errors import DeviceError

# Spark's own pattern for a CUDA ordinal (distributor._get_gpus_owned), anchored as it means to be.
_GPU_ADDRESS = re.compile(r"(0|[1-9][0-9]*)")


def task_context() -> Any:
    """The current Spark TaskContext, or None outside a Spark task."""
    try:
        from pyspark import TaskContext
    except ImportError:  # pragma: no cover - pyspark is a hard dependency
        return None
    return TaskContext.get()


def assigned_gpus(ctx: Any = None) -> list[str]:
    """GPU addresses Spark assigned to the current task (empty outside Spark or without GPUs)."""
    ctx = ctx if ctx is not None else task_context()
    if ctx is None:
        return []
    try:
        gpu = ctx.resources().get("gpu")
    except Exception:  # noqa: BLE001 - older contexts lack resources()
        return []
    return list(gpu.addresses) if gpu is not None else []


def task_gpu(ctx: Any = None) -> int | None:
    """The torch ordinal of the GPU Spark assigned to this task, or None when it assigned none.

    Raises DeviceError for addresses CUDA cannot use: not integers, or beyond the devices that
    ``CUDA_VISIBLE_DEVICES`` lists.
    """
    addresses = assigned_gpus(ctx)
    if not addresses:
        return None
    if not all(_GPU_ADDRESS.fullmatch(a) for a in addresses):
        raise DeviceError(
            f"Spark assigned GPU addresses {addresses}, but CUDA needs integer ordinals without zero "
            "padding; fix the GPU discovery script (spark.executor.resource.gpu.discoveryScript)"
        )
    ordinal = int(addresses[0])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        listed = [d for d in visible.split(",") if d.strip()]
        if ordinal >= len(listed):
            raise DeviceError(
                f"Spark assigned GPU {ordinal}, but CUDA_VISIBLE_DEVICES={visible!r} lists "
                f"{len(listed)} device(s); Spark's GPU addresses index that list, so make the discovery "
                "script report 0..N-1 for the listed devices"
            )
    return ordinal


def _no_cuda(requested: str) -> DeviceError:
    import torch

    build = "a CPU-only torch build" if torch.version.cuda is None else "no GPU or CUDA driver found"
    return DeviceError(
        f"device {requested!r} was requested but CUDA is not available on this host ({build}); "
        "set device = 'auto' or 'cpu' in [model], or run where a GPU is"
    )


def resolve_device(requested: str, ctx: Any = None) -> str:
    """Turn a configured device ('auto', 'cpu', 'cuda', 'cuda:N') into a concrete torch device."""
    import torch

    if requested == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        if requested == "auto":
            return "cpu"
        raise _no_cuda(requested)
    if requested in ("auto", "cuda"):
        gpu = task_gpu(ctx)
        ordinal = 0 if gpu is None else gpu
    else:
        ordinal = int(requested.split(":", 1)[1])
    count = torch.cuda.device_count()
    if ordinal >= count:
        raise DeviceError(
            f"GPU {ordinal} was asked for ({requested!r}) but this process sees {count} CUDA device(s)"
        )
    return f"cuda:{ordinal}"


def task_threads(ctx: Any = None) -> int:
    """Intra-op threads for this task: spark.task.cpus inside Spark, else 1 per process."""
    ctx = ctx if ctx is not None else task_context()
    if ctx is None:
        return 1
    try:
        return max(1, int(ctx.cpus()))
    except Exception:  # noqa: BLE001 - cpus() is missing on very old PySpark
        return 1


def set_threads(n: int) -> None:
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
