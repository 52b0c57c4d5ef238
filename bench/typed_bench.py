"""Typed-signature batch benchmark (issue 17): the DLRM-style and text example models on Spark.

    flock /tmp/sparkscore-bench.lock .venv/bin/python bench/typed_bench.py [--rows 1000000] [--repeats 3]

``dlrm`` (13 float columns + 8 long id columns, one EmbeddingBag per id), end to end from
``spark.read`` of Parquet to the committed Parquet write, best of ``--repeats`` (interleaved):

* ``sparkscore``: ``with_predictions`` on the typed signature (two inputs from 21 scalar columns);
* ``predict_batch_udf``: configured as its docs say for several tensor inputs: the dense and the
  id columns as two array columns (``array(i1..i13)``, ``array(c1..c8)``) with
  ``input_tensor_shapes = [[13], [8]]``, the predict function taking the two arrays;
* ``plain_torch``: pyarrow + torch on the same files, one process per core, no Spark.

Every variant writes the same columns: ``id``, the outputs, ``model_version`` and ``error``.

``text`` (variable-length token ids with a generated attention mask): ``sparkscore`` (pads each
model call to its longest row, rows sorted by length first: ``bucket_by_length``),
``sparkscore_no_buckets`` (pads each call to its longest row in arrival order) and ``plain_torch``
with the same per-call padding as sparkscore (sorted by length within each batch); plus the
padding each one computes (``padded_tokens``, against the real tokens).

Writes the ``dlrm`` and ``text`` keys of bench/results/batch.json (the other keys are kept), with
the 1-minute load average before and after.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402
from bench.batch_bench import start_spark  # noqa: E402

WORK = ROOT / "build" / "bench" / "typed"
BATCH = 4096  # Arrow batch rows, and the DLRM model's batch
TEXT_BATCH = 64  # the text model's calls: each Arrow batch is sorted by length and cut into these


def make_data(name: str, rows: int, files: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from udfs import examples

    out = WORK / f"{name}-{rows}-{files}"
    if out.exists():
        return out
    out.mkdir(parents=True)
    step = -(-rows // files)
    for i in range(files):
        t = examples.table(name, min(step, rows - i * step), seed=i)
        t = t.set_column(0, "id", pa.array(t.column("id").to_numpy() + i * step))
        pq.write_table(t, out / f"part-{i:03d}.parquet")
    return out


def model_of(name: str, path: Path, batch: int) -> Any:
    from udfs import examples
    from udfs.config import from_dict
    from udfs.spec import ModelSpec, resolve

    table = {
        **examples.model_table(name),
        "name": name,
        "path": str(path),
        "batch_size": batch,
        "device": "cpu",
    }
    return resolve(from_dict(ModelSpec, table, where="model"))


# --- variants ---------------------------------------------------------------------------------------


def run_sparkscore(spark: Any, model: Any, data: Path, out: Path) -> None:
    from udfs import with_predictions

    df = spark.read.parquet(str(data))
    df.transform(with_predictions(model, keep=["id"])).write.mode("overwrite").parquet(str(out))


def _dlrm_predict_fn(path: str) -> Any:
    def make_predict_fn() -> Any:
        import numpy as np
        import torch

        torch.set_num_threads(1)
        model = torch.jit.load(path).eval()

        def predict(dense: Any, sparse: Any) -> Any:
            with torch.inference_mode():
                y = model(
                    torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
                    torch.from_numpy(np.ascontiguousarray(sparse, dtype=np.int64)),
                )
            return y.to(torch.float64).numpy()

        return predict

    return make_predict_fn


def run_predict_batch_udf(spark: Any, path: str, data: Path, out: Path, version: str) -> None:
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql import functions as F
    from pyspark.sql.types import DoubleType

    from udfs import examples

    udf = predict_batch_udf(
        _dlrm_predict_fn(path), return_type=DoubleType(), batch_size=BATCH, input_tensor_shapes=[[13], [8]]
    )
    df = spark.read.parquet(str(data))
    dense = F.array(*[F.col(c) for c in examples.DENSE])
    sparse = F.array(*[F.col(c) for c in examples.CATS])
    # The same table as sparkscore writes: the prediction, the model version and a (null) error.
    df.select(
        "id",
        udf(dense, sparse).alias("ctr"),
        F.lit(version).alias("model_version"),
        F.lit(None).cast("string").alias("error"),
    ).write.mode("overwrite").parquet(str(out))


_models: dict[str, Any] = {}


def _plain_init() -> None:
    import torch

    torch.set_num_threads(1)


def _plain_file(job: tuple[str, str, str, str, str]) -> tuple[int, int]:
    """One file scored with pyarrow + torch; returns (rows, padded tokens)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from udfs import examples

    name, src, dst, path, version = job
    if path not in _models:
        _models[path] = torch.jit.load(path).eval()
    model = _models[path]
    rows = padded = 0
    writer = None
    for batch in pq.ParquetFile(src).iter_batches(batch_size=BATCH):
        n = batch.num_rows
        with torch.inference_mode():
            if name == "dlrm":
                dense = np.column_stack([batch.column(c).to_numpy() for c in examples.DENSE]).astype(
                    np.float32
                )
                sparse = np.column_stack([batch.column(c).to_numpy() for c in examples.CATS])
                y = model(torch.from_numpy(dense), torch.from_numpy(sparse)).to(torch.float64).numpy()
                cols = [
                    batch.column("id"),
                    pa.array(y),
                    pa.repeat(pa.scalar(version), n),
                    pa.nulls(n, pa.string()),
                ]
                names = ["id", "ctr", "model_version", "error"]
            else:
                tokens = batch.column("tokens")
                offsets = tokens.offsets.to_numpy()
                flat = tokens.values.to_numpy()
                lengths = np.diff(offsets)
                order = np.argsort(lengths, kind="stable")  # the same per-call padding as sparkscore's
                probs = np.zeros((n, 3), np.float32)
                for start in range(0, n, TEXT_BATCH):
                    idx = order[start : start + TEXT_BATCH]
                    width = int(lengths[idx].max())
                    ids = np.zeros((len(idx), width), np.int64)
                    for r, i in enumerate(idx):
                        ids[r, : lengths[i]] = flat[offsets[i] : offsets[i + 1]]
                    mask = (np.arange(width)[None, :] < lengths[idx][:, None]).astype(np.int64)
                    probs[idx] = torch.softmax(
                        model(torch.from_numpy(ids), torch.from_numpy(mask)), -1
                    ).numpy()
                    padded += len(idx) * width
                cols = [
                    batch.column("id"),
                    pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), 3),
                    pa.array(probs.argmax(1).astype(np.int32)),
                    pa.repeat(pa.scalar(version), n),
                    pa.nulls(n, pa.string()),
                ]
                names = ["id", "probabilities", "label", "model_version", "error"]
        out = pa.RecordBatch.from_arrays(cols, names=names)
        if writer is None:
            writer = pq.ParquetWriter(dst, out.schema)
        writer.write_batch(out)
        rows += n
    if writer is not None:
        writer.close()
    return rows, padded


def run_plain(pool: Any, name: str, path: str, data: Path, out: Path, version: str) -> int:
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(name, str(f), str(out / f.name), path, version) for f in sorted(data.glob("*.parquet"))]
    return sum(p for _, p in pool.imap_unordered(_plain_file, jobs, chunksize=1))


def padding(data: Path, bucket: bool) -> int:
    """Tokens the model computes (padding included) when each call of TEXT_BATCH rows pads to its
    longest, with or without sorting each Arrow batch of BATCH rows by length first."""
    import numpy as np
    import pyarrow.parquet as pq

    total = 0
    for f in sorted(data.glob("*.parquet")):
        for batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH, columns=["tokens"]):
            lengths = np.diff(batch.column("tokens").offsets.to_numpy())
            if bucket:
                lengths = np.sort(lengths)
            for start in range(0, len(lengths), TEXT_BATCH):
                chunk = lengths[start : start + TEXT_BATCH]
                total += len(chunk) * int(chunk.max())
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="DLRM rows (the text table gets a tenth)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--out", type=Path, default=common.RESULTS / "batch.json")
    args = p.parse_args(argv)
    import numpy as np
    import pyarrow.parquet as pq

    from udfs import examples

    cores = os.cpu_count() or 2
    WORK.mkdir(parents=True, exist_ok=True)
    paths = {
        name: examples.save(name, examples.MODULES[name](), WORK / "models", ("torchscript",))["torchscript"]
        for name in ("dlrm", "text")
    }
    data = {
        "dlrm": make_data("dlrm", args.rows, args.files),
        "text": make_data("text", args.rows // 10, args.files),
    }
    spark = start_spark(cores, BATCH, args.files, {})
    models = {
        "dlrm": model_of("dlrm", paths["dlrm"], BATCH),
        "text": model_of("text", paths["text"], TEXT_BATCH),
        "text_nb": None,
    }
    from dataclasses import replace

    from udfs.spec import resolve

    models["text_nb"] = resolve(replace(models["text"].spec, bucket_by_length=False))
    pool = mp.get_context("spawn").Pool(cores, initializer=_plain_init)
    out = WORK / "out"
    variants = {
        ("dlrm", "sparkscore"): lambda: run_sparkscore(spark, models["dlrm"], data["dlrm"], out / "d-s"),
        ("dlrm", "predict_batch_udf"): lambda: run_predict_batch_udf(
            spark, str(paths["dlrm"]), data["dlrm"], out / "d-p", models["dlrm"].version
        ),
        ("dlrm", "plain_torch"): lambda: run_plain(
            pool, "dlrm", str(paths["dlrm"]), data["dlrm"], out / "d-t", models["dlrm"].version
        ),
        ("text", "sparkscore"): lambda: run_sparkscore(spark, models["text"], data["text"], out / "t-s"),
        ("text", "sparkscore_no_buckets"): lambda: run_sparkscore(
            spark, models["text_nb"], data["text"], out / "t-n"
        ),
        ("text", "plain_torch"): lambda: run_plain(
            pool, "text", str(paths["text"]), data["text"], out / "t-t", models["text"].version
        ),
    }
    # Warm-up: every variant once on the full data (JIT, worker start-up, page cache).
    for fn in variants.values():
        fn()
    load_before = round(os.getloadavg()[0], 2)
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for key, fn in variants.items():
            if out.exists():
                shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            fn()
            times.setdefault(key, []).append(time.perf_counter() - start)
    load_after = round(os.getloadavg()[0], 2)
    # Same predictions: sparkscore against plain torch, and against predict_batch_udf.
    run_sparkscore(spark, models["dlrm"], data["dlrm"], out / "d-s")
    run_predict_batch_udf(spark, str(paths["dlrm"]), data["dlrm"], out / "d-p", models["dlrm"].version)
    run_plain(pool, "dlrm", str(paths["dlrm"]), data["dlrm"], out / "d-t", models["dlrm"].version)
    got = {
        k: pq.read_table(out / k, columns=["id", "ctr"]).sort_by("id").column("ctr").to_numpy()
        for k in ("d-s", "d-p", "d-t")
    }
    diff = max(float(np.abs(got["d-s"] - got[k]).max()) for k in ("d-p", "d-t"))
    pool.close()
    spark.stop()

    rows = {"dlrm": args.rows, "text": args.rows // 10}
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name in ("dlrm", "text"):
        entry: dict[str, Any] = {}
        for (model, variant), ts in times.items():
            if model == name:
                best = min(ts)
                entry[variant] = {
                    "rows_per_s": round(rows[name] / best),
                    "seconds": round(best, 3),
                    "runs": [round(t, 3) for t in ts],
                }
        entry["rows"] = rows[name]
        entry["batch_size"] = BATCH if name == "dlrm" else TEXT_BATCH
        entry["arrow_batch_rows"] = BATCH
        entry["cores"] = cores
        entry["load_avg_1m_before"] = load_before
        entry["load_avg_1m_after"] = load_after
        result[name] = entry
    d = result["dlrm"]
    d["vs_predict_batch_udf"] = round(d["sparkscore"]["rows_per_s"] / d["predict_batch_udf"]["rows_per_s"], 3)
    d["vs_plain_torch"] = round(d["sparkscore"]["rows_per_s"] / d["plain_torch"]["rows_per_s"], 3)
    d["targets"] = {"vs_predict_batch_udf": 1.1, "vs_plain_torch": 0.8}
    d["max_abs_prediction_difference"] = diff
    t = result["text"]
    real = sum(
        int(np.diff(b.column("tokens").offsets.to_numpy()).sum())
        for f in sorted(data["text"].glob("*.parquet"))
        for b in pq.ParquetFile(f).iter_batches(batch_size=BATCH, columns=["tokens"])
    )
    t["padded_tokens"] = {
        "real": real,
        "bucketed": padding(data["text"], True),
        "arrival_order": padding(data["text"], False),
    }
    t["vs_plain_torch"] = round(t["sparkscore"]["rows_per_s"] / t["plain_torch"]["rows_per_s"], 3)
    t["bucketing_speedup"] = round(
        t["sparkscore"]["rows_per_s"] / t["sparkscore_no_buckets"]["rows_per_s"], 3
    )
    common.write_json(args.out, result)
    print(json.dumps({"dlrm": result["dlrm"], "text": result["text"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
