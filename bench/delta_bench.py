"""Delta Lake benchmark: the batch job writing Delta tables against Parquet paths, and an incremental
run against a full one. Merged into bench/results/batch.json under the key ``delta``.

    flock /tmp/sparkscore-bench.lock make bench-delta ARGS="--rows 2000000"

On one ``tiny`` (demo CTR model) table of ``--rows`` rows, in one warm local[cores] session with
Delta, through the job's own ``jobs.batch_score.run`` (so the timings include what a run checks
before it reads: the model, the schema, the target):

* rows/s of ``append`` and ``overwrite`` into a Delta path and into a Parquet path, and of a
  ``merge_on = ["id"]`` MERGE of a table whose keys are 90 % in the target and 10 % new;
* ``full_seconds``: the whole table scored (overwrite) and ``incremental_seconds``: an incremental
  run after 1 % new rows were appended to the Delta input (target: incremental <= 5 % of full).

Each figure is the median of ``--repeats`` runs; the load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402

WORK = ROOT / "build" / "bench" / "delta"
CTR = ["age", "purchase_count", "price", "category_id"]


def make_table(spark: Any, rows: int, start: int, seed: int) -> Any:
    import numpy as np
    import pyarrow as pa

    from udfs.demo import synthetic_ctr

    t = synthetic_ctr(rows, seed=seed)
    ids = pa.array(np.arange(start, start + rows, dtype=np.int64))
    return spark.createDataFrame(pa.table({"id": ids, **{c: t[c] for c in CTR}}).to_pandas())


def config(model: str, inp: str, out: str) -> Any:
    import tomllib

    from udfs.batch import BatchConfig
    from udfs.config import from_dict

    text = textwrap.dedent(
        f"""
        [model]
        path = "{model}"
        version = "bench"
        input_columns = {CTR!r}
        [input]
        {inp}
        [output]
        {out}
        keep_columns = ["id"]
        """
    ).replace("'", '"')
    return from_dict(BatchConfig, tomllib.loads(text), where="bench config")


def timed(cfg: Any) -> tuple[float, Any]:
    from jobs import batch_score

    start = time.perf_counter()
    summary = batch_score.run(cfg)
    return time.perf_counter() - start, summary


def median(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="delta_bench.py", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--out", type=Path, default=common.RESULTS / "batch.json")
    args = p.parse_args(argv)

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from udfs import demo
    from udfs.session import build_session

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    model = str(demo.save_torchscript(demo.ctr_module(), WORK / "ctr.pt"))
    spark = build_session(
        "sparkscore-delta-bench",
        {
            "spark.master": f"local[{args.cores}]",
            "spark.ui.enabled": "false",
            "spark.ui.showConsoleProgress": "false",
            "spark.sql.shuffle.partitions": str(2 * args.cores),
            "spark.databricks.delta.snapshotPartitions": str(2 * args.cores),
        },
        delta=True,
    )
    load_before = round(os.getloadavg()[0], 2)
    n = args.rows
    src = WORK / "in"
    make_table(spark, n, 0, 1).write.format("delta").save(str(src))
    delta_in = f'path = "{src}"\nformat = "delta"'
    # Warm-up: the model in the Python workers, Delta's classes in the JVM.
    timed(config(model, delta_in + '\nwhere = "id < 1000"', f'path = "{WORK / "warm"}"\nformat = "delta"'))

    runs: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        runs.setdefault(name, []).append(seconds)
        print(f"[bench] {name}: {seconds:.2f} s", flush=True)

    # MERGE source: 90 % of the keys already in the target, 10 % new.
    merge_src = WORK / "merge-in"
    make_table(spark, n, n // 10, 2).write.format("delta").save(str(merge_src))
    for r in range(args.repeats):
        for fmt in ("delta", "parquet"):
            out = WORK / f"out-{fmt}-{r}"
            target = f'path = "{out}"\nformat = "{fmt}"'
            record(f"{fmt}_create", timed(config(model, delta_in, target))[0])
            record(f"{fmt}_append", timed(config(model, delta_in, target + '\nmode = "append"'))[0])
            record(f"{fmt}_overwrite", timed(config(model, delta_in, target + '\nmode = "overwrite"'))[0])
        merge_target = f'path = "{WORK / f"out-delta-{r}"}"\nformat = "delta"\nmerge_on = ["id"]'
        record(
            "delta_merge", timed(config(model, f'path = "{merge_src}"\nformat = "delta"', merge_target))[0]
        )

    # Incremental: a first run scores everything, then 1 % new rows arrive.
    inc_in = WORK / "inc-in"
    make_table(spark, n, 0, 3).write.format("delta").save(str(inc_in))
    ckpt = WORK / "inc-ckpt"
    inc_cfg = config(
        model,
        f'path = "{inc_in}"\nformat = "delta"\nincremental = true\ncheckpoint = "{ckpt}"',
        f'path = "{WORK / "inc-out"}"\nformat = "delta"',
    )
    record("incremental_first", timed(inc_cfg)[0])
    new = max(1, n // 100)
    for r in range(args.repeats):
        make_table(spark, new, n + r * new, 10 + r).write.format("delta").mode("append").save(str(inc_in))
        seconds, summary = timed(inc_cfg)
        assert summary.input_rows == new, (summary.input_rows, new)
        record("incremental", seconds)
        full = f'path = "{WORK / f"full-out-{r}"}"\nformat = "delta"'
        record("full", timed(config(model, f'path = "{inc_in}"\nformat = "delta"', full))[0])

    rows_per_s = {
        k: round(n / median(v)) for k, v in runs.items() if not k.startswith(("incremental", "full"))
    }
    full_s, inc_s = median(runs["full"]), median(runs["incremental"])
    result = {
        "rows": n,
        "repeats": args.repeats,
        "cores": args.cores,
        "note": "jobs.batch_score.run in one warm session, tiny (demo CTR) model; medians; "
        "delta_merge: MERGE of n rows, 90% existing keys / 10% new",
        "rows_per_s": rows_per_s,
        "seconds_median": {k: median(v) for k, v in runs.items()},
        "new_rows_incremental": new,
        "incremental_seconds": inc_s,
        "full_seconds": full_s,
        "incremental_over_full": round(inc_s / full_s, 3),
        "target_incremental_over_full": 0.05,
        "target_met": inc_s <= 0.05 * full_s,
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
        **common.machine(),
    }
    existing = json.loads(args.out.read_text()) if args.out.exists() else {}
    existing["delta"] = result
    common.write_json(args.out, existing)
    print(json.dumps(result, indent=2))
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
