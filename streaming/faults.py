"""Deterministic fault injection at the sink's named crash windows (tests and ``make faults`` only).

``SPARKSCORE_FAULT`` names one point and what happens there; ``SPARKSCORE_FAULT_DIR``
(required with it) is a folder every process can write::

    SPARKSCORE_FAULT="writer.after_records:k=5,writer=p1,after=writer.after_commit-p0,action=exit"

Points, in the order a batch passes them:

* ``driver.before_produce``, ``driver.after_records`` (after ``k`` records), ``driver.before_marker``,
  ``driver.after_marker``: the driver (``begin`` .. ``commit`` of a batch; the marker is the batch's
  commit marker, after which only Spark's own commit log entry is missing).
* ``writer.before_produce``, ``writer.after_records`` (``k``), ``writer.before_commit``,
  ``writer.after_commit``: an executor task writing its partition (``writer`` is ``p<index>``).
* ``delta.before_write``, ``delta.after_write``: the driver of a Delta output (``[output] kind =
  "delta"``) before its batch's first Delta commit and after its last (then only Spark's own commit
  log entry is missing).

Actions: ``raise`` (the default: :class:`InjectedFault`; the batch fails and the sink abandons
its producer with the transaction left open, as a dead driver would), ``exit`` (``os._exit``:
the process dies at once, e.g. a Python worker, i.e. the task), ``kill`` (SIGKILL to the
process group: from the driver, the whole job; Spark starts its Python worker daemons in groups of
their own, so from a writer, every Python worker), ``sleep`` (hold the task up for ``seconds``,
then go on: a batch caught in flight). Selectors: ``batch``, ``writer``, ``attempt``
(default 0, so a retried task does not fail again), ``after`` (wait until that hit file exists,
i.e. another point was passed, before firing). A fault fires once: its ``fired`` file stays.

Every point passed leaves a hit file ``<point>-<writer>-b<batch>`` in the folder, so a test can
prove which windows a run went through.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV = "SPARKSCORE_FAULT"
ENV_DIR = "SPARKSCORE_FAULT_DIR"

POINTS = (
    "driver.before_produce",
    "driver.after_records",
    "driver.before_marker",
    "driver.after_marker",
    "writer.before_produce",
    "writer.after_records",
    "writer.before_commit",
    "writer.after_commit",
    "delta.before_write",
    "delta.after_write",
)

ACTIONS = ("raise", "exit", "kill", "sleep")

# In-process test hook: called at every point with (point, context); may block or raise.
HOOK: Callable[[str, dict[str, Any]], None] | None = None


class InjectedFault(RuntimeError):
    """Raised at a fault point with action ``raise``."""


@dataclass(frozen=True)
class Fault:
    point: str
    action: str = "raise"
    k: int = 0
    batch: int | None = None
    writer: str | None = None
    attempt: int = 0
    after: str | None = None
    seconds: float = 0.0  # action=sleep: how long the point holds its task up

    @classmethod
    def parse(cls, spec: str) -> Fault:
        point, _, rest = spec.partition(":")
        if point not in POINTS:
            raise ValueError(f"{ENV}: unknown point {point!r}; points are {list(POINTS)}")
        kw: dict[str, Any] = {}
        for item in filter(None, rest.split(",")):
            name, _, value = item.partition("=")
            if name in ("k", "batch", "attempt"):
                kw[name] = int(value)
            elif name == "seconds":
                kw[name] = float(value)
            elif name in ("action", "writer", "after"):
                kw[name] = value
            else:
                raise ValueError(f"{ENV}: unknown setting {name!r} in {spec!r}")
        fault = cls(point, **kw)
        if fault.action not in ACTIONS:
            raise ValueError(f"{ENV}: action must be one of {', '.join(ACTIONS)}, got {fault.action!r}")
        return fault


@dataclass(frozen=True)
class FaultPlan:
    """What the driver read from the environment; travels to executors inside the batch plan."""

    spec: str | None = None
    folder: str | None = None

    @classmethod
    def from_env(cls) -> FaultPlan:
        spec = os.environ.get(ENV) or None
        folder = os.environ.get(ENV_DIR) or None
        if spec and not folder:
            raise ValueError(f"{ENV} needs {ENV_DIR}: a folder for the hit and fired files")
        if spec:
            Fault.parse(spec)
        return cls(spec, folder)

    def records_k(self, where: str) -> int:
        """The ``k`` of an ``<where>.after_records`` fault (0 when none): produce loops test only this."""
        if self.spec is None:
            return 0
        fault = Fault.parse(self.spec)
        return fault.k if fault.point == f"{where}.after_records" else 0


NO_FAULTS = FaultPlan()


def point(
    plan: FaultPlan, name: str, *, batch: int, writer: str = "driver", attempt: int = 0, count: int = 0
) -> None:
    """Pass the named point: record the hit, and fire the configured fault if it is this one."""
    if HOOK is not None:
        HOOK(name, {"batch": batch, "writer": writer, "attempt": attempt, "count": count})
    if plan.folder is None:
        return
    folder = Path(plan.folder)
    if not name.endswith("after_records"):
        (folder / f"{name}-{writer}-b{batch}").touch()
    if plan.spec is None:
        return
    fault = Fault.parse(plan.spec)
    if (
        fault.point != name
        or (fault.batch is not None and fault.batch != batch)
        or (fault.writer is not None and fault.writer != writer)
        or fault.attempt != attempt
        or (name.endswith("after_records") and count != fault.k)
    ):
        return
    fired = folder / "fired"
    try:
        fired.touch(exist_ok=False)
    except FileExistsError:
        return
    if fault.after is not None:
        # Another point must be passed first (by another task, say): wait for its hit file.
        # A liveness bound, not a timing assumption: the other side runs independently of us.
        deadline = time.monotonic() + 300
        while not (folder / fault.after).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    (folder / f"{name}-{writer}-b{batch}.fired").write_text(f"{fault.action} after {count} record(s)\n")
    if fault.action == "exit":
        os._exit(137)
    if fault.action == "sleep":
        time.sleep(fault.seconds)  # a task caught mid-batch (a stop signal's window), then it goes on
        return
    if fault.action == "kill":
        os.killpg(os.getpgrp(), signal.SIGKILL)
    raise InjectedFault(f"injected fault at {name} (batch {batch}, {writer}, {count} record(s) produced)")
