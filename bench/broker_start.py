"""How long each local broker takes from launch to serving a metadata request: Tansu vs Apache Kafka.

    make bench-brokers            # or: .venv/bin/python bench/broker_start.py [--runs 3]

Decides the broker `make stream-demo` starts by default (the Kafka production-stack issue: Tansu stays
the default unless Apache Kafka starts as fast). Each run starts a fresh broker on a free loopback port
with a new temporary log dir (Apache Kafka: format + start, as a first `make kafka` does), waits until
it answers a metadata request, and stops it. Writes bench/results/brokers.json and brokers.png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from streaming.broker import ApacheKafkaBroker, LocalBroker, TansuBroker

BROKERS: dict[str, type[LocalBroker]] = {"tansu": TansuBroker, "apache_kafka": ApacheKafkaBroker}


def time_start(kind: type[LocalBroker]) -> float:
    """Seconds from launch (Apache Kafka: from formatting its log dir) until it serves metadata."""
    broker = kind()
    started = time.perf_counter()
    broker.start(timeout_s=180)
    seconds = time.perf_counter() - started
    broker.stop()
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="starts per broker, interleaved (default 3)")
    args = p.parse_args(argv)
    load_before = os.getloadavg()[0]
    seconds: dict[str, list[float]] = {name: [] for name in BROKERS}
    for run in range(args.runs):
        for name, kind in BROKERS.items():
            seconds[name].append(time_start(kind))
            print(
                f"[brokers] run {run + 1}/{args.runs}: {name} served after {seconds[name][-1]:.2f} s",
                flush=True,
            )
    results = {
        name: {
            "median_s": round(statistics.median(s), 3),
            "min_s": round(min(s), 3),
            "runs_s": [round(x, 3) for x in s],
        }
        for name, s in seconds.items()
    }
    ratio = results["apache_kafka"]["median_s"] / results["tansu"]["median_s"]
    out = {
        **results,
        "apache_kafka_vs_tansu": round(ratio, 1),
        "stream_demo_default": "tansu" if ratio > 2 else "apache_kafka",
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "machine": common.machine(),
    }
    common.write_json(common.RESULTS / "brokers.json", out)
    common.bar_chart(
        common.RESULTS / "brokers.png",
        {"launch to serving": {name: r["median_s"] for name, r in results.items()}},
        title="Local broker start (median of runs)",
        ylabel="seconds",
        log=True,
    )
    print(
        common.table(
            ["broker", "median s", "min s", "runs"],
            [
                [name, r["median_s"], r["min_s"], ", ".join(f"{x:.2f}" for x in r["runs_s"])]
                for name, r in results.items()
            ],
        )
    )
    print(
        f"Apache Kafka takes {ratio:.0f}x Tansu's start; make stream-demo defaults to {out['stream_demo_default']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
