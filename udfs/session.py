"""SparkSession construction shared by the spark-submit jobs."""

from __future__ import annotations

import os
import sys

from pyspark import SparkConf, SparkContext
from pyspark.sql import SparkSession

DEFAULTS = {
    # The model cache lives in the Python worker: reuse keeps it across tasks.
    "spark.python.worker.reuse": "true",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.shuffle.partitions": "8",
    "spark.ui.showConsoleProgress": "true",
}


def build_session(
    app_name: str,
    conf: dict[str, str] | None = None,
    *,
    arrow_batch_rows: int | None = None,
    delta: bool = False,
) -> SparkSession:
    """A SparkSession for a job.

    Precedence: ``spark-submit --conf`` / ``--master`` first, then the config
    file's ``[spark]`` table, then sparkscore's defaults (``local[*]`` when no
    master is given). Python workers must run this interpreter (the venv's) or
    they cannot import torch and pyarrow, so ``PYSPARK_PYTHON`` is set for
    local runs.
    """
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    # Under spark-submit this attaches to its JVM, whose system properties hold the user's settings.
    # A plain `python` run that uses Delta starts its JVM with Delta's jars from `make jars`.
    launch = {k: v for k, v in (conf or {}).items() if k in ("spark.jars", "spark.jars.packages")}
    if delta and SparkContext._gateway is None and "spark.jars.packages" not in launch:
        from udfs.delta import local_delta_jars

        jars = [j for j in launch.get("spark.jars", "").split(",") if j]
        launch["spark.jars"] = ",".join(dict.fromkeys(jars + local_delta_jars()))
    if launch and SparkContext._gateway is None:
        SparkContext._ensure_initialized(conf=SparkConf(loadDefaults=False).setAll(list(launch.items())))
    SparkContext._ensure_initialized()
    given = SparkConf()
    wanted = dict(DEFAULTS)
    if delta:
        from udfs.delta import SESSION_CONF

        wanted.update(SESSION_CONF)
    if arrow_batch_rows:
        wanted["spark.sql.execution.arrow.maxRecordsPerBatch"] = str(arrow_batch_rows)
    wanted.update(conf or {})
    wanted.setdefault("spark.master", "local[*]")
    builder = SparkSession.builder.appName(app_name)
    for key, value in wanted.items():
        if not given.contains(key):
            builder = builder.config(key, value)
    spark = builder.getOrCreate()
    if "spark.sql.files.minPartitionNum" not in wanted and not given.contains(
        "spark.sql.files.minPartitionNum"
    ):
        # A table of a few large files otherwise splits by size alone and can leave cores idle while
        # one task scores the tail; two splits per core keeps every core busy (measured in bench/).
        parallelism = spark.sparkContext.defaultParallelism
        spark.conf.set("spark.sql.files.minPartitionNum", str(2 * parallelism))
    spark.sparkContext.setLogLevel(os.environ.get("SPARKSCORE_SPARK_LOG_LEVEL", "ERROR"))
    return spark


def connect_session(
    url: str, conf: dict[str, str] | None = None, *, arrow_batch_rows: int | None = None
) -> SparkSession:
    """A Spark Connect session to ``url`` (``sc://host:port``). Only runtime SQL settings can be set
    from a client; the server's own configuration (jars, Delta's extension) is the server's."""
    if not url.startswith("sc://"):
        from udfs.errors import ConfigError

        raise ConfigError(f"--remote takes a Spark Connect URL such as sc://127.0.0.1:15002, got {url!r}")
    spark = SparkSession.builder.remote(url).getOrCreate()
    wanted = (
        {"spark.sql.execution.arrow.maxRecordsPerBatch": str(arrow_batch_rows)} if arrow_batch_rows else {}
    )
    static = ("spark.sql.extensions", "spark.sql.catalog.", "spark.sql.warehouse.dir")
    wanted.update(
        {k: v for k, v in (conf or {}).items() if k.startswith("spark.sql.") and not k.startswith(static)}
    )
    for key, value in wanted.items():
        spark.conf.set(key, value)
    return spark
