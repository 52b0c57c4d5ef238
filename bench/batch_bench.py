"""Batch inference benchmark: sparkscore against its peers and its limits, side by side in one run.

    make bench-batch ARGS="--rows 2000000"
    .venv/bin/python bench/batch_bench.py [--rows N] [--repeats 3] [--batch-size 8192] \
        [--models tiny,medium] [--variants sparkscore,...] [--files 8] [--row-group-rows N] \
        [--conf spark.key=value ...] [--out PATH]

For each model (``tiny``: 4 double CTR columns; ``medium``: one ``array<float>[64]`` column)
it generates one Parquet table under build/bench/data (once; reused while rows and layout
match) and times, end to end from ``spark.read`` to the committed write:

* ``sparkscore``: ``df.transform(udfs.spark.with_predictions(...))``, the transform the batch
  job runs, in a session built by the job's own ``udfs.session.build_session``;
* ``sparkscore_udf``: ``udfs.predict_udf`` (the Column UDF: a Spark Arrow UDF returning a struct),
  ``df.select("id", score(*features).alias("p")).select("id", "p.*")``;
* ``predict_batch_udf``: ``pyspark.ml.functions.predict_batch_udf``, same model and batch size;
* ``row_udf``: a row-at-a-time UDF that loads the model per row (5,000-row sample, scaled);
* ``plain_torch``: pyarrow + torch, one process per core, 1 torch thread each, no Spark;
* ``spark_floor``: the same read -> mapInArrow -> write with zeros instead of a model.

Every variant writes the same table: ``id`` plus the core's prediction columns (``prediction``,
``model_version``, ``error``). One SparkSession (local[cores]) serves all Spark variants and is
warmed first; its start-up is not timed. The input is ``--files`` files read as one partition
each (``spark.sql.files.minPartitionNum``), so every core gets equal work. Each variant runs
``--repeats`` times, interleaved with the others, and the best time counts (other work on the
machine only ever adds time); the CPU time of the whole process tree per row is recorded too,
as a steadier cost on a shared machine.
Results: bench/results/batch.json (rows/s) and batch.png; a run over a subset of models or
variants writes under build/bench/results instead, so it never replaces the full result.

Ensemble part (issue 5; on by default, ``--no-ensemble`` skips it and keeps the last ensemble result,
``--only ensemble`` runs it alone and merges it into the existing batch.json, keeping the
``tiny``/``medium`` results): three
``medium`` models with seeds 1, 2, 3 (``m1``, ``m2``, ``m3``), each alone through ``sparkscore``,
then the three as one ensemble (``weighted_mean``, equal weights; inside a Spark task the members
run one after another, as each task already has its core), and ``spark_floor``, on the same
``medium`` table, interleaved, best of ``--repeats``. Target: the data is read and written once,
``t_ensemble <= 1.1 x (t_m1 + t_m2 + t_m3 - 2 x t_floor)``. Written under the top-level
``ensemble`` key of the same JSON, charted in batch_ensemble.png.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: bench/ and udfs/ live one level up

from bench import common  # noqa: E402
from bench.models import CASES, ENSEMBLE_SEEDS, ModelCase  # noqa: E402

WORK = ROOT / "build" / "bench"
SAMPLE_ROWS = 5_000
TARGETS = (
    # (model, variant, baseline, minimum ratio sparkscore / baseline)
    ("medium", "sparkscore", "plain_torch", 0.8),
    ("tiny", "sparkscore", "spark_floor", 0.8),
    ("medium", "sparkscore", "predict_batch_udf", 1.3),
    ("tiny", "sparkscore", "predict_batch_udf", 1.3),
    ("medium", "sparkscore_udf", "predict_batch_udf", 1.05),
    ("tiny", "sparkscore_udf", "predict_batch_udf", 1.05),
    # The Column UDF within 10% of the transform.
    ("medium", "sparkscore_udf", "sparkscore", 0.9),
    ("tiny", "sparkscore_udf", "sparkscore", 0.9),
)


@dataclass
class Bench:
    """Everything the variants share for one run."""

    rows: int
    cores: int
    batch_size: int
    model_paths: dict[str, Path]
    device: str
    data: dict[str, Path]
    sample: dict[str, Path]
    resolved: dict[str, Any] = field(default_factory=dict)  # model name -> ResolvedModel
    spark: Any = None
    pool: Any = None  # plain_torch worker processes
    udfs: dict[str, Any] = field(default_factory=dict)  # per-model peer UDFs, built once like a user would


@dataclass(frozen=True)
class Variant:
    """One way to score the table: ``run(bench, case, out_dir, sample)`` writes predictions to out_dir."""

    run: Callable[[Bench, ModelCase, Path, bool], None]
    help: str
    spark: bool = True
    sample: bool = False  # runs on the 5,000-row sample and is scaled to rows/s


# --- data ---------------------------------------------------------------------------------------


def _table(case: ModelCase, start: int, rows: int, seed: int) -> Any:
    import numpy as np
    import pyarrow as pa

    ids = pa.array(np.arange(start, start + rows, dtype=np.int64))
    if case.num_features is None:
        from udfs.demo import synthetic_ctr

        t = synthetic_ctr(rows, seed=seed)
        return pa.table({"id": ids, **{c: t[c] for c in case.input_columns}})
    rng = np.random.default_rng(seed)
    flat = pa.array(rng.standard_normal(rows * case.num_features, dtype=np.float32))
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * case.num_features)
    return pa.table({"id": ids, case.input_columns[0]: pa.ListArray.from_arrays(offsets, flat)})


def ensure_data(case: ModelCase, rows: int, files: int, row_group_rows: int, compression: str) -> Path:
    """The Parquet table for ``case``: generated once per (rows, layout), then reused."""
    import pyarrow.parquet as pq

    out = WORK / "data" / f"{case.name}-{rows}-f{files}-rg{row_group_rows}-{compression}"
    ready = out / "_READY"
    if ready.exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    print(f"[bench] writing {rows:,} rows for {case.name} to {out} ({files} files)", flush=True)
    per_file = -(-rows // files)
    for i, start in enumerate(range(0, rows, per_file)):
        t = _table(case, start, min(per_file, rows - start), seed=1000 * case.seed + i)
        pq.write_table(
            t, out / f"part-{i:04d}.parquet", row_group_size=row_group_rows, compression=compression
        )
    ready.touch()
    return out


def ensure_sample(case: ModelCase, data: Path, files: int) -> Path:
    """The first SAMPLE_ROWS rows of ``data``, in ``files`` files so every core gets work."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    out = data.with_name(data.name + f"-sample{SAMPLE_ROWS}")
    if (out / "_READY").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t = ds.dataset(data, format="parquet").head(SAMPLE_ROWS)
    per_file = -(-SAMPLE_ROWS // files)
    for i, start in enumerate(range(0, SAMPLE_ROWS, per_file)):
        pq.write_table(t.slice(start, per_file), out / f"part-{i:04d}.parquet")
    (out / "_READY").touch()
    return out


def output_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in path.rglob("*.parquet"))


# --- Spark variants -----------------------------------------------------------------------------


def _read(b: Bench, case: ModelCase, sample: bool = False) -> Any:
    return b.spark.read.parquet(str(b.sample[case.name] if sample else b.data[case.name]))


def _literal_outputs(b: Bench, case: ModelCase) -> list[Any]:
    """The core's non-prediction columns, as literals, for peers that only compute a prediction."""
    from pyspark.sql import functions as F

    return [
        F.lit(b.resolved[case.name].version).alias("model_version"),
        F.lit(None).cast("string").alias("error"),
    ]


def run_sparkscore(b: Bench, case: ModelCase, out: Path, sample: bool = False) -> None:
    from udfs.spark import with_predictions

    scored = _read(b, case, sample).transform(with_predictions(b.resolved[case.name], keep=["id"]))
    scored.write.mode("overwrite").parquet(str(out))


def run_sparkscore_udf(b: Bench, case: ModelCase, out: Path, sample: bool = False) -> None:
    from udfs.spark import predict_udf

    key = f"sparkscore_udf:{case.name}"
    if key not in b.udfs:  # built once, like a user's UDF
        b.udfs[key] = predict_udf(b.resolved[case.name])
    score = b.udfs[key]
    scored = _read(b, case, sample).select("id", score(*case.input_columns).alias("p"))
    scored.select("id", "p.*").write.mode("overwrite").parquet(str(out))


def _zeros_fn(version: str, out_schema: Any) -> Callable[[Iterator[Any]], Iterator[Any]]:
    def score_partition(batches: Iterator[Any]) -> Iterator[Any]:
        import numpy as np
        import pyarrow as pa

        for batch in batches:
            n = batch.num_rows
            yield pa.RecordBatch.from_arrays(
                [
                    batch.column(0),
                    pa.array(np.zeros(n)),
                    pa.repeat(pa.scalar(version, pa.string()), n),
                    pa.nulls(n, pa.string()),
                ],
                schema=out_schema,
            )

    return score_partition


def run_spark_floor(b: Bench, case: ModelCase, out: Path, sample: bool = False) -> None:
    from pyspark.sql.pandas.types import to_arrow_schema

    from udfs.spark import scored_schema

    model = b.resolved[case.name]
    df = _read(b, case, sample).select("id", *case.input_columns)
    schema = scored_schema(df.schema, model, ["id"])
    df.mapInArrow(_zeros_fn(model.version, to_arrow_schema(schema)), schema).write.mode("overwrite").parquet(
        str(out)
    )


def _make_predict_fn(path: str, array_input: bool) -> Callable[[], Callable[..., Any]]:
    def make_predict_fn() -> Callable[..., Any]:
        import numpy as np
        import torch

        torch.set_num_threads(1)  # one task per core, as sparkscore does
        model = torch.jit.load(path).eval()

        def run(x: Any) -> Any:
            with torch.inference_mode():
                y = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
            return y.reshape(-1).to(torch.float64).numpy()

        # predict_batch_udf reads the predict function's arity: one parameter means one (tensor)
        # input, four mean one 1-d array per scalar column.
        def predict_tensor(x: Any) -> Any:
            return run(x)

        def predict_columns(a: Any, b: Any, c: Any, d: Any) -> Any:
            return run(np.column_stack([a, b, c, d]))

        return predict_tensor if array_input else predict_columns

    return make_predict_fn


def _predict_batch_udf(b: Bench, case: ModelCase) -> Any:
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql.types import DoubleType

    key = f"pbu:{case.name}"
    if key not in b.udfs:
        array = case.num_features is not None
        b.udfs[key] = predict_batch_udf(
            _make_predict_fn(str(b.model_paths[case.name]), array),
            return_type=DoubleType(),
            batch_size=b.batch_size,
            input_tensor_shapes=[[case.width]] if array else None,
        )
    return b.udfs[key]


def run_predict_batch_udf(b: Bench, case: ModelCase, out: Path, sample: bool = False) -> None:
    udf = _predict_batch_udf(b, case)
    df = _read(b, case, sample)
    df.select("id", udf(*case.input_columns).alias("prediction"), *_literal_outputs(b, case)).write.mode(
        "overwrite"
    ).parquet(str(out))


def _row_udf(path: str, array_input: bool) -> Callable[..., float]:
    def score(*values: Any) -> float:
        import torch

        model = torch.jit.load(path)  # the naive pattern: the model is loaded for every row
        feats = values[0] if array_input else values
        with torch.no_grad():
            return float(model(torch.tensor([feats], dtype=torch.float32)).reshape(-1)[0])

    return score


def run_row_udf(b: Bench, case: ModelCase, out: Path, sample: bool = False) -> None:
    from pyspark.sql import functions as F
    from pyspark.sql.types import DoubleType

    udf = F.udf(_row_udf(str(b.model_paths[case.name]), case.num_features is not None), DoubleType())
    df = _read(b, case, sample)
    df.select("id", udf(*case.input_columns).alias("prediction"), *_literal_outputs(b, case)).write.mode(
        "overwrite"
    ).parquet(str(out))


def run_job(b: Bench, case: ModelCase, out: Path, sample: bool = False) -> None:
    """The whole job entry point, jobs.batch_score.run: adds its input count and output check."""
    from jobs.batch_score import run
    from udfs.batch import BatchConfig, InputConfig, OutputConfig

    data = b.sample[case.name] if sample else b.data[case.name]
    run(
        BatchConfig(
            model=b.resolved[case.name].spec,
            input=InputConfig(path=str(data)),
            output=OutputConfig(path=str(out), mode="overwrite", keep_columns=("id",)),
            spark={"spark.master": f"local[{b.cores}]"},
        )
    )


def run_zero_model(b: Bench, case: ModelCase, out: Path, sample: bool = False) -> None:
    """sparkscore's own path with a model that returns zeros: everything but the model's compute."""
    from udfs.spark import with_predictions

    key = f"zeros:{case.name}"
    if key not in b.resolved:
        from dataclasses import replace

        from udfs.spec import resolve

        spec = replace(b.resolved[case.name].spec, path=str(b.model_paths["zeros"]), version=None)
        b.resolved[key] = resolve(spec)
    scored = _read(b, case, sample).transform(with_predictions(b.resolved[key], keep=["id"]))
    scored.write.mode("overwrite").parquet(str(out))


# --- plain PyTorch, no Spark --------------------------------------------------------------------

_plain_models: dict[str, Any] = {}


def _plain_init() -> None:
    import pyarrow  # noqa: F401 - imported once per process, before the clock starts
    import torch

    torch.set_num_threads(1)


def _plain_score_file(job: tuple[str, str, str, tuple[str, ...], int | None, int, str, str]) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    src, dst, model_path, columns, num_features, batch_size, version, device = job
    if model_path not in _plain_models:
        _plain_models[model_path] = torch.jit.load(model_path, map_location=device).eval()
    model = _plain_models[model_path]
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
            with torch.inference_mode():
                y = model(torch.from_numpy(x).to(device)).reshape(-1).to("cpu", torch.float64).numpy()
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


def run_plain_torch(b: Bench, case: ModelCase, out: Path, sample: bool = False) -> None:
    data = b.sample[case.name] if sample else b.data[case.name]
    out.mkdir(parents=True, exist_ok=True)
    version = b.resolved[case.name].version
    jobs = [
        (
            str(f),
            str(out / f.name),
            str(b.model_paths[case.name]),
            case.input_columns,
            case.num_features,
            b.batch_size,
            version,
            b.device,
        )
        for f in sorted(data.glob("*.parquet"))
    ]
    sum(b.pool.imap_unordered(_plain_score_file, jobs, chunksize=1))


# --- the registry -------------------------------------------------------------------------------

# The six variants every full run reports in batch.json, in this order.
VARIANTS: dict[str, Variant] = {
    "sparkscore": Variant(run_sparkscore, "udfs.spark.with_predictions (mapInArrow, per-worker model cache)"),
    "sparkscore_udf": Variant(run_sparkscore_udf, "udfs.predict_udf: Arrow UDF returning a struct"),
    "predict_batch_udf": Variant(run_predict_batch_udf, "pyspark.ml.functions.predict_batch_udf"),
    "row_udf": Variant(run_row_udf, "row-at-a-time UDF, model loaded per row (sample, scaled)", sample=True),
    "plain_torch": Variant(run_plain_torch, "pyarrow + torch, one process per core, no Spark", spark=False),
    "spark_floor": Variant(run_spark_floor, "read -> mapInArrow returning zeros -> write"),
}
# Investigation variants: run them with --variants; they are reported under meta.extra.
# Issue 5 adds its ensemble runs (three medium members, and each member alone) here and writes
# them under the top-level "ensemble" key.
EXTRAS: dict[str, Variant] = {
    "sparkscore_job": Variant(run_job, "jobs.batch_score.run(cfg): the transform plus the job's counts"),
    "sparkscore_zero_model": Variant(run_zero_model, "with_predictions with a zeros TorchScript model"),
}
ALL = {**VARIANTS, **EXTRAS}


# --- ensemble: three medium members against each alone and the floor ---------------------------

ENSEMBLE_FORMULA = "t_ensemble <= 1.1 x (t_m1 + t_m2 + t_m3 - 2 x t_floor)"
ENSEMBLE_SLACK = 1.1


def _run_resolved(b: Bench, model: Any, case: ModelCase, out: Path, sample: bool) -> None:
    """sparkscore's transform for any resolved model (a single member or the ensemble)."""
    from udfs.spark import with_predictions

    scored = _read(b, case, sample).transform(with_predictions(model, keep=["id"]))
    scored.write.mode("overwrite").parquet(str(out))


def ensemble_models(b: Bench, case: ModelCase) -> dict[str, Any]:
    """m1, m2, m3 as single models and the three as one weighted_mean ensemble, resolved."""
    from bench.models import build_ensemble
    from udfs.spec import MemberSpec, ModelSpec, resolve

    paths = build_ensemble(WORK / "models")
    common_kw: dict[str, Any] = {
        "input_columns": case.input_columns,
        "num_features": case.num_features,
        "batch_size": b.batch_size,
        "device": "cpu",
    }
    out: dict[str, Any] = {
        name: resolve(ModelSpec(path=str(path), name=name, **common_kw)) for name, path in paths.items()
    }
    out["ensemble"] = resolve(
        ModelSpec(
            members=tuple(MemberSpec(path=str(p), name=n, weight=1.0) for n, p in paths.items()),
            combiner="weighted_mean",
            name="medium_x3",
            **common_kw,
        )
    )
    return out


def check_ensemble(outs: dict[str, Path]) -> float:
    """Max |ensemble - mean of the three members' own predictions| over every row."""
    import numpy as np
    import pyarrow.dataset as ds

    def load(path: Path) -> Any:
        t = ds.dataset(path, format="parquet").to_table(columns=["id", "prediction"])
        order = np.argsort(t["id"].to_numpy())
        return t["prediction"].to_numpy(zero_copy_only=False)[order]

    mean = sum(load(outs[m]) for m in ENSEMBLE_SEEDS) / len(ENSEMBLE_SEEDS)
    return float(np.max(np.abs(load(outs["ensemble"]) - mean)))


def run_ensemble(b: Bench, args: argparse.Namespace, out_root: Path) -> dict[str, Any]:
    """Time m1, m2, m3, the ensemble and the floor (interleaved, best of N); the ``ensemble`` result."""
    case = CASES["medium"]
    models = ensemble_models(b, case)
    if "medium" not in b.resolved:  # spark_floor takes its version and schema from it
        b.resolved["medium"] = models["m1"]

    def runner(name: str) -> Callable[[Path, bool], None]:
        if name == "spark_floor":
            return lambda out, sample: run_spark_floor(b, case, out, sample)
        return lambda out, sample: _run_resolved(b, models[name], case, out, sample)

    names = [*ENSEMBLE_SEEDS, "ensemble", "spark_floor"]
    t0 = time.perf_counter()
    for name in names:
        runner(name)(out_root / "warmup" / "ensemble" / name, True)
    print(f"[bench] ensemble warm-up done in {time.perf_counter() - t0:.1f} s", flush=True)

    seconds: dict[str, list[float]] = {n: [] for n in names}
    cpu_us: dict[str, list[float]] = {n: [] for n in names}
    outs: dict[str, Path] = {}
    load_before = round(os.getloadavg()[0], 2)
    started = time.perf_counter()
    for r in range(args.repeats):
        for name in names:
            dest = out_root / "ensemble" / f"{name}-{r}"
            cpu, t = common.tree_cpu_seconds(), time.perf_counter()
            runner(name)(dest, False)
            elapsed, cpu = time.perf_counter() - t, common.tree_cpu_seconds() - cpu
            got = output_rows(dest)
            if got != args.rows:
                raise RuntimeError(f"ensemble/{name} wrote {got:,} rows, expected {args.rows:,}")
            seconds[name].append(elapsed)
            cpu_us[name].append(cpu / args.rows * 1e6)
            print(
                f"[bench] ensemble {name:12} run {r + 1}: {elapsed:7.2f} s  {args.rows / elapsed:>12,.0f} rows/s  "
                f"{cpu / args.rows * 1e6:7.2f} CPU us/row",
                flush=True,
            )
            if r:
                shutil.rmtree(outs[name], ignore_errors=True)
            outs[name] = dest
    timed = time.perf_counter() - started
    diff = check_ensemble(outs)
    print(f"[bench] ensemble: max |ensemble - mean of members|: {diff:.3g}", flush=True)

    best = {n: min(ts) for n, ts in seconds.items()}
    cpu_best = {n: min(ts) for n, ts in cpu_us.items()}
    singles = sum(best[m] for m in ENSEMBLE_SEEDS)
    rhs = ENSEMBLE_SLACK * (singles - 2 * best["spark_floor"])
    # The same check on CPU time per row: steadier when other work shares the machine.
    cpu_rhs = ENSEMBLE_SLACK * (sum(cpu_best[m] for m in ENSEMBLE_SEEDS) - 2 * cpu_best["spark_floor"])
    return {
        "model": "3 x medium (64 -> 512 -> 512 -> 1; seeds 1, 2, 3), weighted_mean, equal weights",
        "path": "sparkscore (udfs.spark.with_predictions); inside a task the members run one after "
        "another (one task per core, so no member thread pool)",
        "rows": args.rows,
        "input_partitions": _read(b, case).rdd.getNumPartitions(),
        "repeats": args.repeats,
        "cores": args.cores,
        "batch_size": args.batch_size,
        "rows_per_s": {n: round(args.rows / t, 1) for n, t in best.items()},
        "best_seconds": {n: round(t, 3) for n, t in best.items()},
        "seconds": {n: [round(t, 3) for t in ts] for n, ts in seconds.items()},
        "cpu_us_per_row": {n: round(v, 3) for n, v in cpu_best.items()},
        "target": {
            "formula": ENSEMBLE_FORMULA,
            "t_ensemble_s": round(best["ensemble"], 3),
            "bound_s": round(rhs, 3),
            "met": best["ensemble"] <= rhs,
            "sum_of_singles_s": round(singles, 3),
            "cpu_formula": ENSEMBLE_FORMULA.replace("t_", "cpu_"),
            "cpu_ensemble_us_per_row": round(cpu_best["ensemble"], 3),
            "cpu_bound_us_per_row": round(cpu_rhs, 3),
            "cpu_met": cpu_best["ensemble"] <= cpu_rhs,
        },
        "ensemble_over_sum_of_singles": round(best["ensemble"] / singles, 3),
        "max_abs_diff_vs_mean_of_members": diff,
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
        "timed_seconds": round(timed, 1),
        "date": common.machine()["date"],
    }


def print_ensemble(ens: dict[str, Any]) -> None:
    rows = [
        [
            n,
            ens["rows_per_s"][n],
            ens["best_seconds"][n],
            max(ens["seconds"][n]),
            ens["cpu_us_per_row"][n],
        ]
        for n in ens["best_seconds"]
    ]
    print(
        f"\nensemble of 3 x medium ({ens['rows']:,} rows, local[{ens['cores']}], batch {ens['batch_size']})"
    )
    print(common.table(["run", "rows/s", "best s", "worst s", "CPU us/row"], rows))
    t = ens["target"]
    print(
        f"{t['formula']}: {t['t_ensemble_s']:.2f} s <= {t['bound_s']:.2f} s: {'met' if t['met'] else 'MISSED'}"
        f"  (CPU per row: {t['cpu_ensemble_us_per_row']:.2f} <= {t['cpu_bound_us_per_row']:.2f} us: "
        f"{'met' if t['cpu_met'] else 'MISSED'}; ensemble / sum of singles {ens['ensemble_over_sum_of_singles']})"
    )


def plot_ensemble(ens: dict[str, Any], path: Path) -> Path:
    """Best seconds per run as bars, with the sum of the singles and the target bound as lines."""
    plt = common._pyplot()
    names = list(ens["best_seconds"])
    secs = [ens["best_seconds"][n] for n in names]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = ["tab:blue"] * len(ENSEMBLE_SEEDS) + ["tab:green", "tab:gray"]
    bars = ax.bar(names, secs, color=colors)
    ax.bar_label(bars, labels=[f"{v:.1f} s" for v in secs], fontsize=8, padding=2)
    t = ens["target"]
    ax.axhline(t["sum_of_singles_s"], color="tab:red", linestyle=":", label="m1 + m2 + m3")
    ax.axhline(t["bound_s"], color="tab:orange", linestyle="--", label="target: 1.1 x (sum - 2 x floor)")
    ax.set_ylabel(f"seconds (best of {ens['repeats']})")
    ax.set_title(
        f"Batch, 3-member ensemble of medium vs each member alone, {ens['rows']:,} rows, local[{ens['cores']}]"
        f"\ntarget {'met' if t['met'] else 'MISSED'}: {t['t_ensemble_s']:.1f} s vs bound {t['bound_s']:.1f} s",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- driver -------------------------------------------------------------------------------------


def start_spark(cores: int, batch_size: int, files: int, conf: dict[str, str]) -> Any:
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    # spark-submit's shell defaults switch the progress bar on; only a submit argument beats them.
    os.environ.setdefault(
        "PYSPARK_SUBMIT_ARGS",
        f"--conf spark.ui.showConsoleProgress=false --driver-java-options "
        f'"-Dlog4j2.configurationFile=file:{ROOT / "conf" / "log4j2.properties"}" pyspark-shell',
    )
    from udfs.session import build_session

    settings = {
        "spark.master": f"local[{cores}]",
        # One input file per task: Spark would otherwise pack the files into about one partition
        # per core, or into an odd count that leaves a core idle for the last wave.
        "spark.sql.files.minPartitionNum": str(files),
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        **conf,
    }
    return build_session("sparkscore-bench", settings, arrow_batch_rows=batch_size)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="batch_bench.py", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=2_000_000, help="rows per model table (default 2,000,000)")
    p.add_argument(
        "--repeats", type=int, default=3, help="timed runs per variant; the best counts (default 3)"
    )
    p.add_argument("--batch-size", type=int, default=8192, help="rows per Arrow batch and per model call")
    p.add_argument("--cores", type=int, default=2, help="local[N] and plain_torch processes (default 2)")
    p.add_argument("--device", default="cpu", help="the models' device: cpu (default), cuda, cuda:N")
    p.add_argument("--models", default="tiny,medium", help="comma list of: " + ",".join(CASES))
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ",".join(ALL))
    p.add_argument("--files", type=int, default=8, help="Parquet files per table (default 8)")
    p.add_argument("--row-group-rows", type=int, default=131_072, help="rows per Parquet row group")
    p.add_argument("--compression", default="snappy", help="Parquet codec of the input (default snappy)")
    p.add_argument(
        "--conf", action="append", default=[], metavar="KEY=VALUE", help="extra Spark setting (repeatable)"
    )
    p.add_argument("--out", type=Path, help="result JSON (default bench/results/batch.json on a full run)")
    p.add_argument("--keep-output", action="store_true", help="keep the predictions under build/bench/out")
    common.add_ensemble_args(p, "result JSON")
    args = p.parse_args(argv)
    common.check_ensemble_args(p, args)
    for name, known in (("models", CASES), ("variants", ALL)):
        unknown = [v for v in getattr(args, name).split(",") if v not in known]
        if unknown:
            p.error(f"--{name}: unknown {unknown}; choose from {list(known)}")
    if args.repeats < 1 or args.rows < SAMPLE_ROWS:
        p.error(f"--repeats must be >= 1 and --rows >= {SAMPLE_ROWS}")
    return args


def check_predictions(b: Bench, case: ModelCase, outs: dict[str, Path]) -> dict[str, float]:
    """Max |prediction - plain torch| per variant, on the rows each variant scored."""
    import numpy as np
    import pyarrow.dataset as ds

    def load(path: Path) -> tuple[Any, Any]:
        t = ds.dataset(path, format="parquet").to_table(columns=["id", "prediction"])
        order = np.argsort(t["id"].to_numpy())
        return t["id"].to_numpy()[order], t["prediction"].to_numpy(zero_copy_only=False)[order]

    if "plain_torch" not in outs:
        return {}
    ref_ids, ref = load(outs["plain_torch"])
    diffs = {}
    for name, path in outs.items():
        if name in ("plain_torch", "spark_floor", "sparkscore_zero_model"):
            continue
        ids, pred = load(path)
        idx = np.searchsorted(ref_ids, ids)
        diffs[name] = float(np.max(np.abs(pred - ref[idx]))) if len(ids) else float("nan")
    return diffs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench.models import build

    only_ensemble = args.only == "ensemble"
    models = [] if only_ensemble else args.models.split(",")
    variants = [] if only_ensemble else args.variants.split(",")
    full = args.device == "cpu" and (
        only_ensemble or (set(models) == set(CASES) and set(variants) >= set(VARIANTS))
    )
    out_json = args.out or (common.RESULTS if full else WORK / "results") / "batch.json"
    conf = dict(kv.split("=", 1) for kv in args.conf)

    model_paths = build(WORK / "models")
    b = Bench(
        rows=args.rows,
        cores=args.cores,
        batch_size=args.batch_size,
        model_paths=model_paths,
        device=args.device,
        data={},
        sample={},
    )
    for name in dict.fromkeys(models + (["medium"] if args.ensemble else [])):
        case = CASES[name]
        b.data[name] = ensure_data(case, args.rows, args.files, args.row_group_rows, args.compression)
        b.sample[name] = ensure_sample(case, b.data[name], files=2 * args.cores)

    from udfs.spec import ModelSpec, resolve

    for name in models:
        case = CASES[name]
        b.resolved[name] = resolve(
            ModelSpec(
                input_columns=case.input_columns,
                path=str(model_paths[name]),
                name=name,
                num_features=case.num_features,
                batch_size=args.batch_size,
                device=args.device,
            )
        )

    t0 = time.perf_counter()
    if any(not ALL[v].spark for v in variants):
        b.pool = mp.get_context("spawn").Pool(args.cores, initializer=_plain_init)
    if args.ensemble or any(ALL[v].spark for v in variants):
        b.spark = start_spark(args.cores, args.batch_size, args.files, conf)
    print(f"[bench] started Spark and worker pool in {time.perf_counter() - t0:.1f} s", flush=True)

    partitions = {}
    out_root = WORK / "out"
    shutil.rmtree(out_root, ignore_errors=True)
    if b.spark is not None:
        for name in models:
            partitions[name] = _read(b, CASES[name]).rdd.getNumPartitions()
        print(f"[bench] input partitions: {partitions}", flush=True)
    # Warm-up on the sample: JIT, Python workers with torch imported, models in every cache.
    t0 = time.perf_counter()
    for name in models:
        for v in variants:
            if v != "row_udf":  # it loads the model for every row anyway
                ALL[v].run(b, CASES[name], out_root / "warmup" / name / v, True)
    print(f"[bench] warm-up done in {time.perf_counter() - t0:.1f} s", flush=True)

    seconds: dict[str, dict[str, list[float]]] = {m: {v: [] for v in variants} for m in models}
    cpu_us: dict[str, dict[str, list[float]]] = {m: {v: [] for v in variants} for m in models}
    load_before = round(os.getloadavg()[0], 2)
    outs: dict[str, dict[str, Path]] = {m: {} for m in models}
    diffs: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    for name in models:
        case = CASES[name]
        for r in range(args.repeats):
            for v in variants:
                variant = ALL[v]
                dest = out_root / name / f"{v}-{r}"
                cpu, t = common.tree_cpu_seconds(), time.perf_counter()
                variant.run(b, case, dest, variant.sample)
                elapsed, cpu = time.perf_counter() - t, common.tree_cpu_seconds() - cpu
                rows = SAMPLE_ROWS if variant.sample else args.rows
                got = output_rows(dest)
                if got != rows:
                    raise RuntimeError(f"{name}/{v} wrote {got:,} rows, expected {rows:,}")
                seconds[name][v].append(elapsed)
                cpu_us[name][v].append(cpu / rows * 1e6)
                print(
                    f"[bench] {name:6} {v:22} run {r + 1}: {elapsed:7.2f} s  {rows / elapsed:>12,.0f} rows/s  "
                    f"{cpu / rows * 1e6:7.2f} CPU us/row",
                    flush=True,
                )
                if r:
                    shutil.rmtree(outs[name][v], ignore_errors=True)
                outs[name][v] = dest
        diffs[name] = check_predictions(b, case, outs[name])
        print(f"[bench] {name}: max |prediction - plain_torch|: {diffs[name]}", flush=True)
    total = time.perf_counter() - started
    ensemble = run_ensemble(b, args, out_root) if args.ensemble else None

    if b.pool is not None:
        b.pool.close()
        b.pool.join()
    if b.spark is not None:
        b.spark.stop()
    if not args.keep_output:
        shutil.rmtree(out_root, ignore_errors=True)

    if models:
        result = report(args, models, variants, seconds, cpu_us, diffs, partitions, conf, load_before, total)
    else:  # --only ensemble: keep everything else the file holds
        result = json.loads(out_json.read_text()) if out_json.exists() else {}
    if ensemble is not None:
        result["ensemble"] = ensemble
    elif out_json.exists() and "ensemble" in (kept := json.loads(out_json.read_text())):
        result["ensemble"] = kept["ensemble"]  # --no-ensemble keeps the last ensemble run
    if out_json.exists() and "onnx" in (kept := json.loads(out_json.read_text())):
        result.setdefault("onnx", kept["onnx"])  # bench/onnx_bench.py's part, from its own run
    common.write_json(out_json, result)
    if models:
        png = out_json.with_suffix(".png")
        common.bar_chart(
            png,
            {
                m: {v: result[m].get(v, result["meta"]["extra"][m].get(v, 0.0)) for v in variants}
                for m in models
            },
            title=f"Batch scoring, {args.rows:,} rows, local[{args.cores}] (log scale)",
            ylabel="rows/s",
            log=True,
        )
        print(f"\n[bench] wrote {png}")
    if ensemble is not None:
        print_ensemble(ensemble)
        png = plot_ensemble(ensemble, out_json.with_name(out_json.stem + "_ensemble.png"))
        print(f"\n[bench] wrote {png}")
    print(f"[bench] wrote {out_json}")
    return 0


def report(
    args: argparse.Namespace,
    models: list[str],
    variants: list[str],
    seconds: dict[str, dict[str, list[float]]],
    cpu_us: dict[str, dict[str, list[float]]],
    diffs: dict[str, dict[str, float]],
    partitions: dict[str, int],
    conf: dict[str, str],
    load_before: float,
    total: float,
) -> dict[str, Any]:
    """The main part's result (rows/s per model and variant, targets, meta), printed as tables."""
    rates = {
        m: {v: (SAMPLE_ROWS if ALL[v].sample else args.rows) / min(ts) for v, ts in seconds[m].items()}
        for m in models
    }
    result: dict[str, Any] = {
        m: {v: round(rates[m][v], 1) for v in variants if v in VARIANTS} for m in models
    }
    targets = []
    for m, v, base, need in TARGETS:
        if m in rates and v in rates[m] and base in rates[m]:
            ratio = rates[m][v] / rates[m][base]
            # The same ratio from CPU cost per row: what the two would reach with the cores to
            # themselves (every variant here keeps all cores busy), steadier on a shared machine.
            cpu_ratio = min(cpu_us[m][base]) / min(cpu_us[m][v])
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
    result["meta"] = {
        "rows": args.rows,
        "sample_rows": SAMPLE_ROWS,
        "cores": args.cores,
        "batch_size": args.batch_size,
        "device": args.device,
        "repeats": args.repeats,
        "layout": {
            "files": args.files,
            "row_group_rows": args.row_group_rows,
            "compression": args.compression,
        },
        "input_partitions": partitions,
        "spark_conf": conf,
        "sparkscore_path": "df.transform(udfs.spark.with_predictions(resolved, keep=['id'])) in a "
        "udfs.session.build_session session (the job's transform and settings)",
        "seconds": {m: {v: [round(t, 3) for t in ts] for v, ts in seconds[m].items()} for m in models},
        # CPU time of this process tree (driver, JVM, Python workers, pool) per row: steadier than
        # wall time when other work shares the machine.
        "cpu_us_per_row": {m: {v: round(min(ts), 3) for v, ts in cpu_us[m].items()} for m in models},
        "load_avg_1m_before": load_before,
        "max_abs_diff_vs_plain_torch": diffs,
        "targets": targets,
        "extra": {m: {v: round(rates[m][v], 1) for v in variants if v not in VARIANTS} for m in models},
        "total_timed_seconds": round(total, 1),
        **common.machine(),
    }

    for m in models:
        rate = rates[m]
        rows_out: list[list[Any]] = []
        for v in variants:
            rows_out.append(
                [
                    v,
                    rate[v],
                    min(seconds[m][v]),
                    max(seconds[m][v]),
                    min(cpu_us[m][v]),
                    *(
                        rate[v] / rate[base] if base in rate else "-"
                        for base in ("plain_torch", "spark_floor", "predict_batch_udf")
                    ),
                ]
            )
        print(f"\n{m} ({args.rows:,} rows, local[{args.cores}], batch {args.batch_size})")
        print(
            common.table(
                ["variant", "rows/s", "best s", "worst s", "CPU us/row", "x plain", "x floor", "x pbu"],
                rows_out,
            )
        )
    print()
    print(
        common.table(
            ["model", "target", "wall ratio", "", "CPU ratio", ""],
            [
                [
                    c["model"],
                    f"{c['check']} >= {c['target']}",
                    c["ratio"],
                    "met" if c["met"] else "MISSED",
                    c["cpu_ratio"],
                    "met" if c["cpu_met"] else "MISSED",
                ]
                for c in targets
            ],
        )
    )
    return result


if __name__ == "__main__":
    sys.exit(main())
