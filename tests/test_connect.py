"""Spark Connect: with_predictions, predict_udf, SQL registration and the batch job (``--remote``)
against a local Spark Connect server (the server class ships in PySpark's jars), started once for
this module on a free loopback port, with Delta's jars and extension."""

from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streaming.broker import free_port
from udfs import demo, predict_udf, with_predictions
from udfs.core import load_scorer, score_batch
from udfs.spec import ModelSpec, resolve

pytestmark = [pytest.mark.spark, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
CTR = demo.CTR_FEATURES
ROWS = [(1, 30.0, 1.0, 5.0, 1.0), (2, None, 1.0, 5.0, 1.0), (3, 41.0, 2.0, 6.0, 3.0)]
SCHEMA = "id long, age double, purchase_count double, price double, category_id double"


@pytest.fixture(scope="module")
def connect_url(tmp_path_factory):
    """A Spark Connect server on 127.0.0.1 (spark-submit of SparkConnectServer), stopped afterwards."""
    port = free_port()
    log = tmp_path_factory.mktemp("connect") / "server.log"
    cmd = [
        str(Path(sys.executable).parent / "spark-submit"),
        "--master", "local[2]",
        "--class", "org.apache.spark.sql.connect.service.SparkConnectServer",
        "--jars", ",".join(sorted(glob.glob(str(ROOT / "build" / "jars" / "delta-*.jar")))),
        "--conf", "spark.connect.grpc.binding.address=127.0.0.1",
        "--conf", f"spark.connect.grpc.binding.port={port}",
        "--conf", "spark.ui.enabled=false",
        "--conf", "spark.sql.session.timeZone=UTC",
        "--conf", "spark.sql.shuffle.partitions=2",
        "--conf", "spark.databricks.delta.snapshotPartitions=2",
        "--conf", "spark.python.worker.reuse=true",
        "--conf", "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension",
        "--conf", "spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "--conf", f"spark.sql.warehouse.dir={tmp_path_factory.mktemp('connect-warehouse')}",
        "spark-internal",
    ]  # fmt: skip
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}
    with log.open("w") as out:
        server = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                assert server.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "Spark Connect server did not start in 240 s"
                time.sleep(0.5)
        yield f"sc://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture(scope="module")
def remote(connect_url):
    """A Connect session beside any classic one this pytest worker made for earlier files.

    ``getOrCreate`` refuses a remote session while a classic one exists; ``create`` does not, and
    marks the process as Connect mode (so ``pyspark.sql.functions`` build Connect columns). The
    mark is taken back afterwards, so files that run later in this worker get classic columns.
    """
    from pyspark.sql import SparkSession

    before = os.environ.get("SPARK_CONNECT_MODE_ENABLED")
    session = SparkSession.builder.remote(connect_url).create()
    try:
        yield session
    finally:
        session.stop()
        if before is None:
            os.environ.pop("SPARK_CONNECT_MODE_ENABLED", None)
        else:
            os.environ["SPARK_CONNECT_MODE_ENABLED"] = before


@pytest.fixture(scope="module")
def ctr(models):
    return resolve(ModelSpec(path=models["torchscript"], input_columns=CTR, name="ctr"))


def core_rows(ctr) -> list[tuple]:
    table = pa.table({"id": [r[0] for r in ROWS], **{c: [r[i + 1] for r in ROWS] for i, c in enumerate(CTR)}})
    preds = score_batch(table, load_scorer(ctr)).to_pylist()
    return [(r[0], p["prediction"], p["model_version"], p["error"]) for r, p in zip(ROWS, preds, strict=True)]


def test_with_predictions_over_spark_connect_equals_the_core(remote, ctr):
    from udfs.spark import is_connect

    assert is_connect(remote)
    df = remote.createDataFrame(ROWS, SCHEMA)
    actual = df.transform(with_predictions(ctr, keep=["id"]))
    got = sorted(tuple(r) for r in actual.collect())
    want = core_rows(ctr)
    assert [(g[0], g[2], g[3]) for g in got] == [(w[0], w[2], w[3]) for w in want]
    assert [g[1] for g in got] == pytest.approx([w[1] for w in want], abs=1e-6, nan_ok=True)


def test_predict_udf_and_its_sql_registration_over_spark_connect(remote, ctr):
    df = remote.createDataFrame(ROWS, SCHEMA)
    score = predict_udf(ctr)
    by_column = sorted(df.select("id", score().alias("p")).select("id", "p.*").collect())
    assert [(r["id"], r["error"]) for r in by_column] == [(1, None), (2, "null feature: 'age'"), (3, None)]
    remote.udf.register("ctr_score_remote", score)
    df.createOrReplaceTempView("connect_events")
    by_sql = remote.sql(
        "SELECT id, ctr_score_remote(age, purchase_count, price, category_id).prediction AS p "
        "FROM connect_events ORDER BY id"
    ).collect()
    want = core_rows(ctr)
    assert by_sql[1]["p"] is None
    assert [by_sql[0]["p"], by_sql[2]["p"]] == pytest.approx([want[0][1], want[2][1]], abs=1e-6)


def test_batch_job_with_remote_runs_without_a_jvm_in_its_process(connect_url, remote, models, tmp_path):
    table = demo.synthetic_ctr(200, seed=3, bad_fraction=0.05)
    pq.write_table(table, tmp_path / "events.parquet")
    cfg = tmp_path / "batch.toml"
    cfg.write_text(
        textwrap.dedent(
            f"""
            [model]
            path = "{models["torchscript"]}"
            input_columns = {list(CTR)!r}
            [input]
            path = "{tmp_path / "events.parquet"}"
            [output]
            path = "{tmp_path / "out"}"
            format = "delta"
            merge_on = ["user_id"]
            keep_columns = ["user_id"]
            """
        ).replace("'", '"')
    )
    # No java on PATH and a JAVA_HOME that is not there: any SparkContext / py4j gateway would fail.
    env = {**os.environ, "PATH": str(Path(sys.executable).parent), "JAVA_HOME": str(tmp_path / "no-java")}
    env.pop("PYSPARK_GATEWAY_PORT", None)
    cmd = [
        sys.executable,
        str(ROOT / "jobs" / "batch_score.py"),
        "--config",
        str(cfg),
        "--remote",
        connect_url,
    ]
    for _ in range(2):  # a rerun merges the same rows: the table is unchanged
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "rows in: 200  out: 200" in proc.stdout, proc.stdout
    written = remote.read.format("delta").load(str(tmp_path / "out"))
    assert written.count() == 200
    bad = sum(1 for r in written.collect() if r["error"] is not None)
    assert f"errors: {bad:,}" in proc.stdout and bad > 0
    ops = [
        r["operation"]
        for r in remote.sql(f"DESCRIBE HISTORY delta.`{tmp_path / 'out'}`").orderBy("version").collect()
    ]
    assert ops == ["WRITE", "MERGE"]
