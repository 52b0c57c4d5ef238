"""Small helpers shared by the benchmarks: timing, result JSON, a text table and PNG charts."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def add_ensemble_args(p: argparse.ArgumentParser, results: str) -> None:
    """``--no-ensemble`` / ``--only ensemble``: the issue-5 part of a benchmark, on by default."""
    p.add_argument(
        "--no-ensemble", dest="ensemble", action="store_false", help="skip the ensemble part (on by default)"
    )
    p.add_argument(
        "--only",
        choices=["ensemble"],
        help=f"run only this part and merge it into the existing {results} (keeps the other results)",
    )


def check_ensemble_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.only == "ensemble" and not args.ensemble:
        p.error("--only ensemble and --no-ensemble contradict each other")


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    """Run ``fn`` ``repeats`` times; (best seconds, all seconds). Best, because the noise only adds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), times


def tree_cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process and all its descendants, live or reaped (Linux /proc).

    Wall time on a shared machine measures the neighbours too; CPU time mostly does not, so
    the difference of two readings is a steadier cost of what ran in between.
    """
    root = os.getpid() if pid is None else pid
    ticks = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    used: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                rest = fh.read().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        parent[int(entry.name)] = int(rest[1])
        used[int(entry.name)] = sum(int(v) for v in rest[11:15])  # utime stime cutime cstime
    total = 0
    for p in used:
        q = p
        while q and q != root:
            q = parent.get(q, 0)
        if q == root:
            total += used[p]
    return total / ticks


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def write_json(path: Path, data: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table; numbers are right-aligned."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(values: Sequence[str], raw: Sequence[Any] | None = None) -> str:
        out = []
        for i, v in enumerate(values):
            numeric = raw is not None and isinstance(raw[i], (int, float))
            out.append(v.rjust(widths[i]) if numeric else v.ljust(widths[i]))
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(headers)), sep, *(line(c, r) for c, r in zip(cells, rows, strict=True))])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(
    path: Path,
    groups: Mapping[str, Mapping[str, float]],
    *,
    title: str,
    ylabel: str,
    log: bool = False,
) -> Path:
    """Grouped bars: one group per outer key, one bar per inner key (same inner keys in every group)."""
    plt = _pyplot()
    names = list(dict.fromkeys(k for g in groups.values() for k in g))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(names) * len(groups)), 4.5))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(groups))]
        ys = [groups[g].get(name, 0.0) for g in groups]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, labels=[_short(y) for y in ys], fontsize=7, padding=2)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def line_chart(
    path: Path,
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
) -> Path:
    """One line per series of (x, y) points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in series.items():
        xs, ys = zip(*points, strict=True) if points else ((), ())
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logx:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _short(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.1f}M"
    if v >= 1e3:
        return f"{v / 1e3:.0f}k"
    return f"{v:.0f}"
