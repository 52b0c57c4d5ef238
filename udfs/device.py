"""Where a model runs and how many threads it gets.

``device = "auto"`` follows Spark's GPU scheduling convention: the GPU that
Spark assigned to this task (``spark.task.resource.gpu.amount``, visible as
``TaskContext.resources()["gpu"]``), else ``cuda:0`` when CUDA is present, else
the CPU. Intra-op threads follow ``spark.task.cpus`` so N concurrent tasks on N
cores do not oversubscribe the machine.
"""

from __future__ import annotations

from typing import Any


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


def resolve_device(requested: str, ctx: Any = None) -> str:
    """Turn a configured device ('auto', 'cpu', 'cuda', 'cuda:N') into a concrete torch device."""
    import torch

    if requested == "cpu":
        return "cpu"
    gpus = assigned_gpus(ctx)
    if requested == "auto" and not torch.cuda.is_available():
        return "cpu"
    if requested in ("auto", "cuda"):
        if gpus:
            return f"cuda:{gpus[0]}"
        if torch.cuda.is_available():
            return "cuda:0"
        raise RuntimeError("device 'cuda' was requested but CUDA is not available on this host")
    return requested


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
