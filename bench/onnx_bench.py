"""ONNX Runtime against PyTorch: the same weights scored by both engines, batch and real-time.

    make bench-onnx ARGS="--rows 2000000"        # the full run: flock /tmp/sparkscore-bench.lock make bench-onnx
    .venv/bin/python bench/onnx_bench.py [--rows N] [--repeats 3] [--batch-size 8192] [--cores 2] \
        [--models tiny,medium] [--parts calls,batch,realtime] [--duration 3] [--max-rate 24000]

The models are the batch bench's ``tiny`` (4 CTR columns -> 32 -> 1, sigmoid) and ``medium``
(64 -> 512 -> 512 -> 1) from bench/models.py, saved as TorchScript and exported to ONNX with
``udfs.demo.save_onnx`` (same seeds, so the same weights). Three parts:

* ``calls``: one model call in this process, one thread, at 1 to 8,192 rows: microseconds per call
  for torch and ONNX Runtime, what each engine costs with no I/O around it.
* ``batch``: on the batch bench's Parquet tables (generated once under build/bench/data), timed end
  to end from read to written Parquet, interleaved, best of ``--repeats``:
  ``plain_torch`` (bench/batch_bench.py's pyarrow + torch loop, one process per core, no Spark),
  ``plain_ort`` (the same loop with an ``InferenceSession``), ``sparkscore`` (the batch job's
  transform, ``udfs.spark.with_predictions``, torch model) and ``sparkscore_onnx`` (the same
  transform with the ONNX model). Targets: plain_ort >= 1.5 x plain_torch on both models;
  sparkscore_onnx >= 0.8 x plain_ort on medium.
* ``realtime``: ``python -m serving`` with the TorchScript model, then with its ONNX export, pinned
  to CPU 0; bench/realtime_bench.py's open-loop load generator (Poisson arrivals, latency from the
  scheduled send time, distinct features, cache off) on CPU 1. The offered rate grows by 25 % while
  p99 < 50 ms, then three bisection steps (a rate that fails is run once more, so one burst from a
  neighbour does not end the search); the highest rate with p99 < 50 ms counts, best of
  ``--rt-repeats`` searches, engines taking turns. Target: ONNX >= 1.2 x torch.

Writes the ``onnx`` key of bench/results/batch.json (calls and batch) and realtime.json (realtime),
leaving every other key as it is, and bench/results/onnx.png. A development run (a subset of models
or parts, or fewer than 2,000,000 rows) writes under build/bench/results instead.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: bench/ and udfs/ live one level up

from bench import batch_bench as bb  # noqa: E402
from bench import common  # noqa: E402
from bench import realtime_bench as rb  # noqa: E402
from bench.models import CASES, ModelCase  # noqa: E402

FULL_ROWS = 2_000_000
CALL_SIZES = (1, 8, 64, 512, 8192)
ENGINES = ("torch", "onnx")
BATCH_VARIANTS = ("plain_torch", "plain_ort", "sparkscore", "sparkscore_onnx")
BATCH_TARGETS = (
    # (model, variant, baseline, minimum ratio)
    ("tiny", "plain_ort", "plain_torch", 1.5),
    ("medium", "plain_ort", "plain_torch", 1.5),
    ("medium", "sparkscore_onnx", "plain_ort", 0.8),
)
REALTIME_TARGET = 1.2
P99_LIMIT_MS = rb.P99_LIMIT_MS


# --- models -------------------------------------------------------------------------------------


def build_models(out: Path) -> dict[str, dict[str, Path]]:
    """{engine: {model: path}}: bench/models.py's TorchScript files and their ONNX exports."""
    from bench.models import build, medium_module, tiny_module
    from udfs.demo import save_onnx

    torch_paths = build(out)
    modules = {"tiny": tiny_module(CASES["tiny"].seed), "medium": medium_module(CASES["medium"].seed)}
    onnx_paths = {n: save_onnx(m, out / f"{n}.onnx", CASES[n].width) for n, m in modules.items()}
    return {"torch": {n: torch_paths[n] for n in CASES}, "onnx": onnx_paths}


def resolved(case: ModelCase, path: Path, batch_size: int) -> Any:
    from udfs.spec import ModelSpec, resolve

    spec = ModelSpec(
        input_columns=case.input_columns,
        path=str(path),
        name=case.name,
        num_features=case.num_features,
        batch_size=batch_size,
        device="cpu",
    )
    return resolve(spec)


# --- calls: the engines alone -------------------------------------------------------------------


def call_costs(paths: dict[str, dict[str, Path]], models: list[str], repeats: int) -> dict[str, Any]:
    """Microseconds per model call, one thread, per model, engine and batch size (best of ``repeats``)."""
    import numpy as np
    import torch

    from udfs import onnx_engine

    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    for name in models:
        case = CASES[name]
        module = torch.jit.load(str(paths["torch"][name])).eval()
        onnx_model = onnx_engine.load(str(paths["onnx"][name]), "cpu", threads=1)
        rng = np.random.default_rng(0)
        out[name] = {e: {} for e in ENGINES}
        for rows in CALL_SIZES:
            x = rng.standard_normal((rows, case.width)).astype(np.float32)

            def torch_call(x: Any = x, module: Any = module) -> Any:
                with torch.inference_mode():
                    return module(torch.from_numpy(x)).numpy()

            def onnx_call(x: Any = x, model: Any = onnx_model) -> Any:
                return model.session.run([model.output], {"features": x})[0]

            calls: dict[str, Callable[[], Any]] = {"torch": torch_call, "onnx": onnx_call}
            for fn in calls.values():  # warm-up: TorchScript specialises over its first calls
                for _ in range(5):
                    fn()
            for engine, fn in calls.items():
                start = time.perf_counter()
                fn()
                once = time.perf_counter() - start
                loops = max(3, int(0.2 / max(once, 1e-6)))
                best, _ = common.best_of(lambda fn=fn, loops=loops: [fn() for _ in range(loops)], repeats)
                out[name][engine][str(rows)] = round(best / loops * 1e6, 2)
            t, o = out[name]["torch"][str(rows)], out[name]["onnx"][str(rows)]
            print(
                f"[bench] calls {name:6} {rows:5} rows: torch {t:10.1f} us  onnx {o:10.1f} us  "
                f"torch / onnx {t / o:5.2f}",
                flush=True,
            )
    return out


# --- batch: plain loops and the job's transform -------------------------------------------------

_sessions: dict[str, Any] = {}


def _pool_init() -> None:
    import onnxruntime  # noqa: F401 - imported once per process, before the clock starts
    import pyarrow  # noqa: F401
    import torch

    torch.set_num_threads(1)


def _plain_ort_score_file(job: tuple[str, str, str, tuple[str, ...], int | None, int, str]) -> int:
    """bench/batch_bench.py's plain loop with ONNX Runtime: what a user writes without Spark."""
    import numpy as np
    import onnxruntime as ort
    import pyarrow as pa
    import pyarrow.parquet as pq

    src, dst, model_path, columns, num_features, batch_size, version = job
    if model_path not in _sessions:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1  # one process per core
        opts.inter_op_num_threads = 1
        _sessions[model_path] = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    session = _sessions[model_path]
    input_name = session.get_inputs()[0].name
    schema = pa.schema(
        [
            ("id", pa.int64()),
            ("prediction", pa.float64()),
            ("model_version", pa.string()),
            ("error", pa.string()),
        ]
    )
    rows = 0
    with pq.ParquetWriter(dst, schema, compression="snappy") as writer:
        for batch in pq.ParquetFile(src).iter_batches(batch_size=batch_size, columns=["id", *columns]):
            n = batch.num_rows
            if num_features is None:
                x = np.column_stack([batch.column(c).to_numpy() for c in columns]).astype(np.float32)
            else:
                x = batch.column(1).flatten().to_numpy().reshape(n, num_features)
            y = session.run(None, {input_name: x})[0].reshape(-1).astype(np.float64)
            writer.write_batch(
                pa.RecordBatch.from_arrays(
                    [
                        batch.column(0),
                        pa.array(y),
                        pa.repeat(pa.scalar(version, pa.string()), n),
                        pa.nulls(n, pa.string()),
                    ],
                    schema=schema,
                )
            )
            rows += n
    return rows


def run_plain_ort(b: bb.Bench, case: ModelCase, out: Path, sample: bool = False) -> None:
    data = b.sample[case.name] if sample else b.data[case.name]
    out.mkdir(parents=True, exist_ok=True)
    model = b.resolved[f"{case.name}@onnx"]
    jobs = [
        (
            str(f),
            str(out / f.name),
            model.members[0].path,
            case.input_columns,
            case.num_features,
            b.batch_size,
            model.version,
        )
        for f in sorted(data.glob("*.parquet"))
    ]
    sum(b.pool.imap_unordered(_plain_ort_score_file, jobs, chunksize=1))


def run_sparkscore_onnx(b: bb.Bench, case: ModelCase, out: Path, sample: bool = False) -> None:
    """The batch job's transform (``with_predictions``) with the ONNX model."""
    from udfs.spark import with_predictions

    model = b.resolved[f"{case.name}@onnx"]
    scored = bb._read(b, case, sample).transform(with_predictions(model, keep=["id"]))
    scored.write.mode("overwrite").parquet(str(out))


VARIANTS: dict[str, Callable[[bb.Bench, ModelCase, Path, bool], None]] = {
    "plain_torch": bb.run_plain_torch,
    "plain_ort": run_plain_ort,
    "sparkscore": bb.run_sparkscore,
    "sparkscore_onnx": run_sparkscore_onnx,
}


def batch_part(
    args: argparse.Namespace, paths: dict[str, dict[str, Path]], models: list[str]
) -> dict[str, Any]:
    """rows/s of the four variants per model, interleaved, best of ``--repeats``."""
    b = bb.Bench(
        rows=args.rows,
        cores=args.cores,
        batch_size=args.batch_size,
        model_paths={n: paths["torch"][n] for n in models},
        device="cpu",
        data={},
        sample={},
    )
    for name in models:
        case = CASES[name]
        b.data[name] = bb.ensure_data(case, args.rows, args.files, args.row_group_rows, "snappy")
        b.sample[name] = bb.ensure_sample(case, b.data[name], files=2 * args.cores)
        b.resolved[name] = resolved(case, paths["torch"][name], args.batch_size)
        b.resolved[f"{name}@onnx"] = resolved(case, paths["onnx"][name], args.batch_size)
    b.pool = mp.get_context("spawn").Pool(args.cores, initializer=_pool_init)
    b.spark = bb.start_spark(args.cores, args.batch_size, args.files, {})
    out_root = bb.WORK / "out-onnx"
    shutil.rmtree(out_root, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        for name in models:  # warm-up on the sample: workers, imports, model caches
            for v, run in VARIANTS.items():
                run(b, CASES[name], out_root / "warmup" / name / v, True)
        print(f"[bench] batch warm-up done in {time.perf_counter() - t0:.1f} s", flush=True)
        seconds: dict[str, dict[str, list[float]]] = {m: {v: [] for v in VARIANTS} for m in models}
        cpu_us: dict[str, dict[str, list[float]]] = {m: {v: [] for v in VARIANTS} for m in models}
        diffs: dict[str, dict[str, float]] = {}
        load_before = round(os.getloadavg()[0], 2)
        for name in models:
            outs: dict[str, Path] = {}
            for r in range(args.repeats):
                for v, run in VARIANTS.items():
                    dest = out_root / name / f"{v}-{r}"
                    cpu, t = common.tree_cpu_seconds(), time.perf_counter()
                    run(b, CASES[name], dest, False)
                    elapsed, cpu = time.perf_counter() - t, common.tree_cpu_seconds() - cpu
                    got = bb.output_rows(dest)
                    if got != args.rows:
                        raise RuntimeError(f"{name}/{v} wrote {got:,} rows, expected {args.rows:,}")
                    seconds[name][v].append(elapsed)
                    # A reading can come out negative when a worker exits between the two (its time
                    # leaves the tree): such a run has no CPU figure.
                    if cpu > 0:
                        cpu_us[name][v].append(cpu / args.rows * 1e6)
                    print(
                        f"[bench] batch {name:6} {v:16} run {r + 1}: {elapsed:7.2f} s  "
                        f"{args.rows / elapsed:>12,.0f} rows/s  {cpu / args.rows * 1e6:7.2f} CPU us/row  "
                        f"load {os.getloadavg()[0]:.2f}",
                        flush=True,
                    )
                    if r:
                        shutil.rmtree(outs[v], ignore_errors=True)
                    outs[v] = dest
            diffs[name] = bb.check_predictions(b, CASES[name], outs)
            print(f"[bench] batch {name}: max |prediction - plain_torch|: {diffs[name]}", flush=True)
        load_after = round(os.getloadavg()[0], 2)
    finally:
        b.pool.close()
        b.pool.join()
        b.spark.stop()
        shutil.rmtree(out_root, ignore_errors=True)

    rates = {m: {v: args.rows / min(ts) for v, ts in seconds[m].items()} for m in models}
    cpu_best = {m: {v: min(ts, default=float("nan")) for v, ts in cpu_us[m].items()} for m in models}
    targets = []
    for m, v, base, need in BATCH_TARGETS:
        if m in rates:
            ratio = rates[m][v] / rates[m][base]
            cpu_ratio = cpu_best[m][base] / cpu_best[m][v]
            targets.append(
                {
                    "model": m,
                    "check": f"{v} / {base}",
                    "target": need,
                    "ratio": round(ratio, 3),
                    "met": ratio >= need,
                    "cpu_ratio": round(cpu_ratio, 3),
                    "cpu_met": cpu_ratio >= need,
                }
            )
    return {
        "rows_per_s": {m: {v: round(r, 1) for v, r in rates[m].items()} for m in models},
        "targets": targets,
        "seconds": {m: {v: [round(t, 3) for t in ts] for v, ts in seconds[m].items()} for m in models},
        "cpu_us_per_row": {m: {v: round(c, 3) for v, c in cpu_best[m].items()} for m in models},
        "max_abs_diff_vs_plain_torch": diffs,
        "rows": args.rows,
        "repeats": args.repeats,
        "cores": args.cores,
        "batch_size": args.batch_size,
        "load_avg_1m_before_after": [load_before, load_after],
    }


# --- real-time: the scorer with either engine ---------------------------------------------------

SERVE_TOML = """
[model]
path = "{model}"
name = "{name}"
input_columns = {columns}
{num_features}
device = "cpu"

[server]
port = {port}
log_level = "warning"

[batcher]
max_batch_size = 64
max_wait_ms = 2.0
max_queue = 4096
default_timeout_ms = 1000
workers = 2

[cache]
enabled = false
"""


def scorer(workdir: Path, case: ModelCase, engine: str, model: Path) -> rb.Server:
    port = rb._free_port()
    cfg = workdir / f"{case.name}-{engine}.toml"
    cfg.write_text(
        SERVE_TOML.format(
            model=model,
            name=case.name,
            columns=json.dumps(list(case.input_columns)),
            num_features=f"num_features = {case.num_features}" if case.num_features else "",
            port=port,
        )
    )
    cmd = [sys.executable, "-m", "serving", "--config", str(cfg)]
    return rb.Server(f"{case.name}/{engine}", cmd, port, "/v2/health/ready")


def search_max_rate(server: rb.Server, case: ModelCase, duration: float, max_rate: int) -> dict[str, Any]:
    """The highest open-loop rate with p99 < 50 ms: x1.25 steps from 1,000 req/s, then 3 bisections."""
    width = ("--width", str(case.num_features)) if case.num_features else ()
    seed = 0

    def p99_at(rate: int) -> float:
        """p99 at ``rate``; a failing rate is run once more and the better p99 counts."""
        first = p99_once(rate)
        return first if first < P99_LIMIT_MS else min(first, p99_once(rate))

    def p99_once(rate: int) -> float:
        nonlocal seed
        seed += 1
        res, _ = rb.run_client(
            server.port,
            "--mode",
            "open",
            "--rate",
            str(rate),
            "--duration",
            str(duration),
            "--seed",
            str(seed),
            *width,
        )
        p99 = res["p99_ms"] if res["p99_ms"] is not None else float("inf")
        points.append([rate, res["p50_ms"], res["p99_ms"], res["ok"], res["requests"], rb._loadavg()])
        print(
            f"  {server.name:14} {rate:6d} req/s  p50 {rb._fmt(res['p50_ms'])}  p99 {rb._fmt(res['p99_ms'])}  "
            f"ok {res['ok']}/{res['requests']}",
            flush=True,
        )
        return p99

    points: list[list[Any]] = []
    rb.run_client(server.port, "--mode", "open", "--rate", "200", "--duration", "1", "--seed", "99", *width)
    passed, failed = 0, None
    rate = 1000
    while rate <= max_rate:
        if p99_at(rate) < P99_LIMIT_MS:
            passed, rate = rate, int(rate * 1.25)
        else:
            failed = rate
            break
    if failed is not None:
        low, high = passed, failed
        for _ in range(3):
            mid = (low + high) // 2
            if p99_at(mid) < P99_LIMIT_MS:
                low = mid
            else:
                high = mid
        passed = low
    return {"max_rps_p99_under_50ms": passed, "capped": failed is None, "points": points}


def realtime_part(
    args: argparse.Namespace, paths: dict[str, dict[str, Path]], models: list[str]
) -> dict[str, Any]:
    """Max req/s at p99 < 50 ms per model and engine, best of ``--rt-repeats`` searches."""
    out: dict[str, Any] = {}
    load_start = rb._loadavg()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            case = CASES[name]
            searches: dict[str, list[dict[str, Any]]] = {e: [] for e in ENGINES}
            for r in range(args.rt_repeats):
                for engine in ENGINES if r % 2 == 0 else ENGINES[::-1]:
                    print(f"[bench] realtime {name} {engine} search {r + 1}:", flush=True)
                    server = scorer(Path(tmp), case, engine, paths[engine][name])
                    try:
                        searches[engine].append(search_max_rate(server, case, args.duration, args.max_rate))
                    finally:
                        server.stop()
            best = {e: max(s["max_rps_p99_under_50ms"] for s in searches[e]) for e in ENGINES}
            ratio = best["onnx"] / best["torch"] if best["torch"] else None
            out[name] = {
                "max_rps_p99_under_50ms": best,
                "onnx_over_torch": round(ratio, 3) if ratio else None,
                "target": REALTIME_TARGET,
                "met": bool(ratio and ratio >= REALTIME_TARGET),
                "capped_at_max_rate": {e: any(s["capped"] for s in searches[e]) for e in ENGINES},
                "searches": {e: [s["points"] for s in searches[e]] for e in ENGINES},
            }
            print(
                f"[bench] realtime {name}: {best} (onnx / torch {out[name]['onnx_over_torch']})", flush=True
            )
    out["setup"] = (
        f"python -m serving pinned to CPU {rb.SERVER_CPU} (max_batch_size 64, max_wait_ms 2, workers 2, cache "
        f"off), realtime_bench's open-loop Poisson load generator on CPU {rb.CLIENT_CPU}; {args.duration:g} s per "
        f"rate; rate x1.25 from 1,000 req/s while p99 < {P99_LIMIT_MS:g} ms, then 3 bisections, a failing rate "
        f"retried once; best of "
        f"{args.rt_repeats} searches per engine, engines taking turns"
    )
    out["loadavg_1m_start_end"] = [load_start, rb._loadavg()]
    out["seconds"] = round(time.monotonic() - started, 1)
    return out


# --- report -------------------------------------------------------------------------------------


def print_tables(
    batch: dict[str, Any] | None, calls: dict[str, Any] | None, realtime: dict[str, Any] | None
) -> None:
    if calls:
        rows = [
            [
                f"{m} {n}",
                calls[m]["torch"][n],
                calls[m]["onnx"][n],
                calls[m]["torch"][n] / calls[m]["onnx"][n],
            ]
            for m in calls
            for n in calls[m]["torch"]
        ]
        print("\none model call, one thread (microseconds)")
        print(common.table(["model rows", "torch us", "onnx us", "torch / onnx"], rows))
    if batch:
        rates = batch["rows_per_s"]
        print(
            f"\nbatch ({batch['rows']:,} rows, local[{batch['cores']}], batch {batch['batch_size']}), rows/s"
        )
        print(
            common.table(
                ["model", *BATCH_VARIANTS], [[m, *(rates[m][v] for v in BATCH_VARIANTS)] for m in rates]
            )
        )
        print(
            common.table(
                ["model", "target", "wall ratio", "", "CPU ratio", ""],
                [
                    [
                        t["model"],
                        f"{t['check']} >= {t['target']}",
                        t["ratio"],
                        "met" if t["met"] else "MISSED",
                        t["cpu_ratio"],
                        "met" if t["cpu_met"] else "MISSED",
                    ]
                    for t in batch["targets"]
                ],
            )
        )
    if realtime:
        print("\nreal-time scorer: max req/s at p99 < 50 ms")
        print(
            common.table(
                ["model", "torch", "onnx", "onnx / torch", f"target {REALTIME_TARGET}"],
                [
                    [
                        m,
                        r["max_rps_p99_under_50ms"]["torch"],
                        r["max_rps_p99_under_50ms"]["onnx"],
                        r["onnx_over_torch"] or "-",
                        "met" if r["met"] else "MISSED",
                    ]
                    for m, r in realtime.items()
                    if isinstance(r, dict) and "max_rps_p99_under_50ms" in r
                ],
            )
        )


def plot(
    path: Path, batch: dict[str, Any] | None, calls: dict[str, Any] | None, realtime: dict[str, Any] | None
) -> Path:
    """Three panels: engine cost per call, batch rows/s, real-time max req/s."""
    plt = common._pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    for m, per in (calls or {}).items():
        for engine, style in (("torch", "-o"), ("onnx", "--s")):
            sizes = [int(n) for n in per[engine]]
            ax.plot(sizes, [int(n) / per[engine][n] * 1e6 for n in per[engine]], style, label=f"{m} {engine}")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="rows per call",
        ylabel="rows/s (one thread)",
        title="One model call",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax = axes[1]
    if batch:
        rates = batch["rows_per_s"]
        width = 0.8 / len(BATCH_VARIANTS)
        for i, v in enumerate(BATCH_VARIANTS):
            xs = [j + (i - (len(BATCH_VARIANTS) - 1) / 2) * width for j in range(len(rates))]
            bars = ax.bar(xs, [rates[m][v] for m in rates], width, label=v)
            ax.bar_label(bars, labels=[common._short(rates[m][v]) for m in rates], fontsize=7, padding=2)
        ax.set_xticks(range(len(rates)), list(rates))
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set(
        ylabel="rows/s", title=f"Batch, {batch['rows']:,} rows, local[{batch['cores']}]" if batch else "Batch"
    )
    ax = axes[2]
    if realtime:
        models = [m for m, r in realtime.items() if isinstance(r, dict) and "max_rps_p99_under_50ms" in r]
        for i, engine in enumerate(ENGINES):
            vals = [realtime[m]["max_rps_p99_under_50ms"][engine] for m in models]
            bars = ax.bar([j + (i - 0.5) * 0.4 for j in range(len(models))], vals, 0.4, label=engine)
            ax.bar_label(bars, labels=[common._short(v) for v in vals], fontsize=8, padding=2)
        ax.set_xticks(range(len(models)), models)
        ax.legend(fontsize=8)
    ax.set(ylabel="req/s", title="Real-time scorer: max req/s at p99 < 50 ms")
    fig.suptitle(
        f"PyTorch vs ONNX Runtime, same weights ({os.cpu_count()} cores, shared machine)", fontsize=10
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def merge(path: Path, onnx: dict[str, Any]) -> None:
    """Set the ``onnx`` key of a result file, keeping everything else it holds."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data["onnx"] = onnx
    common.write_json(path, data)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="onnx_bench.py", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=FULL_ROWS, help="rows per batch table (default 2,000,000)")
    p.add_argument(
        "--repeats", type=int, default=3, help="timed runs per batch variant / call size (best counts)"
    )
    p.add_argument("--batch-size", type=int, default=8192, help="rows per Arrow batch and model call")
    p.add_argument("--cores", type=int, default=2, help="local[N] and plain-loop processes (default 2)")
    p.add_argument("--files", type=int, default=8, help="Parquet files per table (default 8)")
    p.add_argument("--row-group-rows", type=int, default=131_072, help="rows per Parquet row group")
    p.add_argument("--models", default="tiny,medium", help="comma list of: " + ",".join(CASES))
    p.add_argument("--parts", default="calls,batch,realtime", help="comma list of: calls,batch,realtime")
    p.add_argument("--duration", type=float, default=3.0, help="real-time: seconds of load per offered rate")
    p.add_argument("--max-rate", type=int, default=24_000, help="real-time: highest offered rate tried")
    p.add_argument("--rt-repeats", type=int, default=2, help="real-time: searches per engine (best counts)")
    args = p.parse_args(argv)
    for name, known in (("models", CASES), ("parts", ("calls", "batch", "realtime"))):
        unknown = [v for v in getattr(args, name).split(",") if v not in known]
        if unknown:
            p.error(f"--{name}: unknown {unknown}; choose from {list(known)}")
    if args.rows < bb.SAMPLE_ROWS or args.repeats < 1 or args.rt_repeats < 1:
        p.error(f"--rows must be >= {bb.SAMPLE_ROWS} and the repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    models = args.models.split(",")
    parts = args.parts.split(",")
    full = (
        set(models) == set(CASES) and set(parts) == {"calls", "batch", "realtime"} and args.rows >= FULL_ROWS
    )
    results_dir = common.RESULTS if full else bb.WORK / "results"
    paths = build_models(bb.WORK / "models")
    machine = common.machine()
    print(f"[bench] load average {machine['load_avg_1m']} at start; results to {results_dir}", flush=True)
    calls = call_costs(paths, models, args.repeats) if "calls" in parts else None
    batch = batch_part(args, paths, models) if "batch" in parts else None
    realtime = realtime_part(args, paths, models) if "realtime" in parts else None

    model_text = {
        "tiny": "4 CTR columns -> 32 -> 1 (sigmoid), bench/models.py seed 0",
        "medium": "64 -> 512 -> 512 -> 1, bench/models.py seed 1",
    }
    meta = {
        "models": {m: model_text[m] for m in models},
        "export": "udfs.demo.save_onnx (torch.onnx.export, dynamic batch); same weights as the TorchScript files",
        "onnxruntime": __import__("onnxruntime").__version__,
        **machine,
    }
    if calls is not None or batch is not None:
        merge(
            results_dir / "batch.json",
            {"calls_us_one_thread": calls, **(batch or {}), "meta": meta},
        )
    if realtime is not None:
        merge(results_dir / "realtime.json", {**realtime, "meta": meta})
    print_tables(batch, calls, realtime)
    png = plot(results_dir / "onnx.png", batch, calls, realtime)
    print(f"\n[bench] wrote {png} and the onnx key of {results_dir / 'batch.json'} / realtime.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
