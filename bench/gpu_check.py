"""GPU check: the batch job and the batch benchmark on a GPU, placed the way Spark places GPU tasks.

    make gpu-check [ARGS="--rows 2000000 --repeats 3 --cores 8"]

Without CUDA (``torch.cuda.is_available()`` is False) it says so and exits 0, writing nothing.
With CUDA:

1. ``spark-submit jobs/batch_score.py`` with ``device = "cuda"`` on the demo table, on
   ``local-cluster[1,N,M]`` with ``spark.executor.resource.gpu.amount=1`` and
   ``spark.task.resource.gpu.amount=1/N`` (N tasks share the GPU, each gets its address from
   ``TaskContext.resources()["gpu"]``); it checks rows out == rows in, the same bad rows, and every
   prediction against the scoring core's on the CPU (``compare_predictions``, atol and rtol 1e-4).
2. ``bench/batch_bench.py`` on the same master, for ``tiny`` and ``medium``: ``sparkscore``,
   ``sparkscore_udf``, ``spark_floor`` and ``plain_torch`` with the models on ``cuda``, then the
   same on ``cpu``.

Results: bench/results/gpu.json (rows/s per model and variant on cuda and cpu, the floor, plain
torch on cuda, load average, the job's check). Why local-cluster and not ``local[N]``: Spark's local
mode never offers GPU resources to tasks, so a task that asks for one waits forever (measured on
PySpark 4.3.0); local-cluster runs a real executor with a discovery script, as a cluster does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402

WORK = ROOT / "build" / "gpu-check"
VARIANTS = "sparkscore,sparkscore_udf,spark_floor,plain_torch"


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def discovery_script(path: Path) -> Path:
    """Spark's GPU discovery contract: print {"name": "gpu", "addresses": [...]} for this host."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "#!/bin/sh\n"
        "ADDRS=$(nvidia-smi --query-gpu=index --format=csv,noheader | sed -e 's/^/\"/' -e 's/$/\"/' "
        "| paste -sd, -)\n"
        'echo "{\\"name\\": \\"gpu\\", \\"addresses\\": [$ADDRS]}"\n'
    )
    path.chmod(0o755)
    return path


def gpu_conf(cores: int, memory_mb: int, script: Path) -> dict[str, str]:
    """Spark settings for one executor of ``cores`` task slots sharing one GPU."""
    return {
        "spark.master": f"local-cluster[1,{cores},{memory_mb}]",
        "spark.worker.resource.gpu.amount": "1",
        "spark.worker.resource.gpu.discoveryScript": str(script),
        "spark.executor.resource.gpu.amount": "1",
        "spark.executor.resource.gpu.discoveryScript": str(script),
        "spark.task.resource.gpu.amount": f"{1 / cores:.6f}",
        "spark.python.worker.reuse": "true",
    }


def run_job(conf: dict[str, str], env: dict[str, str]) -> dict[str, Any]:
    """The batch job on the GPU over the demo table; rows and predictions checked against the CPU core."""
    import pyarrow.dataset as ds

    from udfs import demo
    from udfs.core import load_scorer, score_batch
    from udfs.spec import ModelSpec, resolve

    paths = demo.build(WORK / "demo", rows=200_000)
    out = WORK / "job-out"
    cfg = WORK / "batch-gpu.toml"
    cfg.write_text(
        textwrap.dedent(
            f"""
            [model]
            path = "{paths["torchscript"]}"
            input_columns = {list(demo.CTR_FEATURES)!r}
            device = "cuda"
            [input]
            path = "{paths["table"]}"
            [output]
            path = "{out}"
            mode = "overwrite"
            keep_columns = ["user_id"]
            """
        ).replace("'", '"')
    )
    cmd = [str(Path(sys.executable).parent / "spark-submit")]
    for key, value in conf.items():
        cmd += ["--master", value] if key == "spark.master" else ["--conf", f"{key}={value}"]
    cmd += [str(ROOT / "jobs" / "batch_score.py"), "--config", str(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=WORK)
    print(proc.stdout[-2000:], flush=True)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        return {"ok": False, "exit_code": proc.returncode, "stderr_tail": proc.stderr[-1000:]}
    table = ds.dataset(paths["table"], format="parquet").to_table().sort_by("user_id")
    got = ds.dataset(out, format="parquet").to_table().sort_by("user_id")
    cpu = score_batch(
        table,
        load_scorer(
            resolve(ModelSpec(path=str(paths["torchscript"]), input_columns=demo.CTR_FEATURES, device="cpu"))
        ),
    )
    check = compare_predictions(
        table.column("user_id").to_numpy(),
        cpu.column("prediction").to_numpy(zero_copy_only=False),
        got.column("user_id").to_numpy(),
        got.column("prediction").to_numpy(zero_copy_only=False),
    )
    return {
        **check,
        "summary": [line for line in proc.stdout.splitlines() if line.startswith("[sparkscore]")],
    }


# float32 on a GPU sums in another order than on a CPU: differences of a few ulps are expected.
ATOL, RTOL = 1e-4, 1e-4


def compare_predictions(
    want_ids: Any, want: Any, have_ids: Any, have: Any, *, atol: float = ATOL, rtol: float = RTOL
) -> dict[str, Any]:
    """The GPU job's predictions against the CPU core's, row for row by id: ok only when the same
    rows came out, the same rows are null (bad), and every prediction is within tolerance."""
    import numpy as np

    result: dict[str, Any] = {"rows_in": int(len(want_ids)), "rows_out": int(len(have_ids)), "ok": False}
    if len(want_ids) != len(have_ids) or not np.array_equal(want_ids, have_ids):
        result["reason"] = "the job's rows are not the input's rows"
        return result
    want, have = np.asarray(want, dtype=np.float64), np.asarray(have, dtype=np.float64)
    want_null, have_null = np.isnan(want), np.isnan(have)
    if not np.array_equal(want_null, have_null):
        result["reason"] = f"{int((want_null != have_null).sum())} rows are null on one device only"
        return result
    diff = np.abs(have - want)[~want_null]
    worst = float(diff.max()) if len(diff) else 0.0
    bad = int((diff > atol + rtol * np.abs(want[~want_null])).sum())
    result.update(max_abs_diff_vs_cpu=worst, rows_beyond_tolerance=bad, atol=atol, rtol=rtol)
    if bad:
        result["reason"] = f"{bad} predictions differ from the CPU's beyond atol {atol} + rtol {rtol}"
        return result
    result["ok"] = True
    return result


def run_bench(
    device: str, conf: dict[str, str], args: argparse.Namespace, env: dict[str, str]
) -> dict[str, Any]:
    out = WORK / f"bench-{device.replace(':', '-')}.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "batch_bench.py"),
        "--rows", str(args.rows),
        "--repeats", str(args.repeats),
        "--cores", str(args.cores),
        "--device", device,
        "--variants", VARIANTS,
        "--no-ensemble",
        "--out", str(out),
    ]  # fmt: skip
    for key, value in conf.items():
        cmd += ["--conf", f"{key}={value}"]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, timeout=3600)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--cores", type=int, default=min(8, os.cpu_count() or 2), help="task slots sharing the GPU"
    )
    p.add_argument("--memory-mb", type=int, default=8192, help="the executor's memory")
    p.add_argument("--out", type=Path, default=common.RESULTS / "gpu.json")
    args = p.parse_args(argv)
    if not cuda_available():
        print(
            "[gpu-check] no CUDA device on this host (torch.cuda.is_available() is False): "
            f"skipped the GPU job and benchmark; {args.out} is unchanged",
            flush=True,
        )
        return 0
    import torch

    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    env.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    env["SPARK_WORKER_DIR"] = str(WORK / "worker")
    conf = gpu_conf(args.cores, args.memory_mb, discovery_script(WORK / "gpus.sh"))
    load_before = round(os.getloadavg()[0], 2)
    job = run_job(conf, env)
    runs = {device: run_bench(device, conf, args, env) for device in ("cuda", "cpu")}
    result = {
        "gpu": torch.cuda.get_device_name(0),
        "rows": args.rows,
        "repeats": args.repeats,
        "task_slots": args.cores,
        "spark": conf,
        "job": job,
        "rows_per_s": {
            model: {f"{v}@{d}": runs[d][model].get(v) for d in runs for v in VARIANTS.split(",")}
            for model in ("tiny", "medium")
        },
        "cpu_us_per_row": {d: runs[d]["meta"]["cpu_us_per_row"] for d in runs},
        "load_avg_1m_before": load_before,
        **common.machine(),
    }
    common.write_json(args.out, result)
    rows = [
        [model, name, rate] for model, rates in result["rows_per_s"].items() for name, rate in rates.items()
    ]
    print(common.table(["model", "variant@device", "rows/s"], rows))
    print(f"[gpu-check] job on the GPU: {'ok' if job.get('ok') else 'FAILED'}; wrote {args.out}")
    return 0 if job.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
