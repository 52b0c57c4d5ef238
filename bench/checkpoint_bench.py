"""What a local checkpoint costs a micro-batch: Hadoop's forked chmod vs java.nio permissions.

    python bench/checkpoint_bench.py [--seconds 40]      # needs build/localfs (make localfs)

Without Hadoop's native library, every file and directory Spark's checkpoint creates on the
local file system gets its permission from a forked ``chmod``. ``jvm/localfs`` (built by
``make localfs``) is Hadoop's local file system with ``setPermission`` done by java.nio; the
checkpoint logs are written exactly as before (temp file, checksum, rename). Each variant runs
the same query in a fresh Spark (local[2]): a ``rate`` source at 5,000 rows/s, a 0 s trigger
and a ``foreachBatch`` that does nothing, so a micro-batch is almost only its checkpoint work.
Records Spark's ``durationMs`` medians (offset log = ``walCommit``, commit log =
``commitOffsets``), the permissions of the files written (they must be equal), and the load
average, in bench/results/checkpoint.json. Run it under ``flock /tmp/sparkscore-bench.lock``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine, write_json  # noqa: E402
from streaming.backends import LOCALFS_JAR, localfs_settings  # noqa: E402

PARTS = ("walCommit", "commitOffsets", "triggerExecution")

CHILD = """
import json, os, stat, sys, time
from pathlib import Path
from pyspark.sql import SparkSession
settings, ck, seconds = json.loads(sys.argv[1]), sys.argv[2], float(sys.argv[3])
b = SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false")
for k, v in settings.items():
    b = b.config(k, v)
spark = b.getOrCreate()
spark.sparkContext.setLogLevel("ERROR")
q = (spark.readStream.format("rate").option("rowsPerSecond", 5000).load()
     .writeStream.option("checkpointLocation", ck).trigger(processingTime="0 seconds")
     .foreachBatch(lambda df, i: None).start())
time.sleep(seconds)
progress = [json.loads(p.json) for p in q.recentProgress]
q.stop()
modes = sorted({oct(stat.S_IMODE(p.stat().st_mode)) for p in Path(ck, "offsets").iterdir()})
print(json.dumps({"progress": [p["durationMs"] for p in progress], "modes": modes}))
"""


def run(settings: dict[str, str], seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="checkpoint-bench-") as tmp:
        # A `chmod` first on PATH that counts its calls, then runs the real one.
        shim = Path(tmp, "bin")
        shim.mkdir()
        calls = Path(tmp, "chmod-calls")
        (shim / "chmod").write_text(f'#!/bin/sh\necho x >> {calls}\nexec /bin/chmod "$@"\n')
        (shim / "chmod").chmod(0o755)
        env = {
            **os.environ,
            "PATH": f"{shim}:{os.environ['PATH']}",
            "PYSPARK_PYTHON": sys.executable,
            "PYSPARK_DRIVER_PYTHON": sys.executable,
        }
        load_before = os.getloadavg()[0]
        out = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(settings), f"{tmp}/ck", str(seconds)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        found = json.loads(out.stdout.strip().splitlines()[-1])
        batches = found["progress"][5:]  # the first batches warm the JVM up
        medians = {k: statistics.median(d.get(k, 0) for d in batches) for k in PARTS}
        forks = len(calls.read_text().splitlines()) if calls.exists() else 0
        return {
            **{f"{k}_ms_median": v for k, v in medians.items()},
            "batches": len(batches),
            "chmod_forks_per_batch": round(forks / max(1, len(found["progress"])), 1),
            "file_modes": found["modes"],
            "load_avg_1m_before": round(load_before, 2),
            "load_avg_1m_after": round(os.getloadavg()[0], 2),
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=40)
    p.add_argument("--rounds", type=int, default=2, help="variants alternate this many times")
    args = p.parse_args(argv)
    if not LOCALFS_JAR.exists():
        print(f"[bench] {LOCALFS_JAR} is missing: run `make localfs`")
        return 2
    results: dict[str, list[dict[str, Any]]] = {"hadoop_chmod": [], "java_nio": []}
    for r in range(args.rounds):
        for name, settings in (("hadoop_chmod", {}), ("java_nio", localfs_settings())):
            res = run(settings, args.seconds)
            results[name].append(res)
            print(f"[{name} round {r}] " + ", ".join(f"{k} {v}" for k, v in res.items()), flush=True)
    summary = {
        name: {f"{k}_ms": statistics.median(x[f"{k}_ms_median"] for x in runs) for k in PARTS}
        for name, runs in results.items()
    }
    write_json(
        ROOT / "bench" / "results" / "checkpoint.json",
        {"summary": summary, "runs": results, "seconds": args.seconds, "machine": machine()},
    )
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
