"""Which Kafka source a query uses: the JVM connector when present, else ``kafka_py``.

Both take the same options and return the same schema, so the choice changes
nothing downstream. ``source = "kafka"`` or ``"kafka_py"`` in the config
overrides the automatic choice.

The connector comes from ``--packages`` (a cluster) or ``--jars 'build/jars/*.jar'``
(local runs: ``make jars`` fetches it with Maven, see ``jvm/pom.xml``). Maven
Central serves no connector for pyspark 4.3.0 yet, so ``make jars`` pins 4.2.0,
whose conformance suite passes on pyspark 4.3.0 (tests/streaming/test_source.py).
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import TYPE_CHECKING

from udfs.errors import ConfigError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

JVM = "kafka"
PYTHON = "kafka_py"
JVM_PROVIDER = "org.apache.spark.sql.kafka010.KafkaSourceProvider"
# The connector version jvm/pom.xml pins (a test keeps the two equal).
CONNECTOR_VERSION = "4.2.0"
JVM_PACKAGE = f"org.apache.spark:spark-sql-kafka-0-10_2.13:{CONNECTOR_VERSION}"
LOCAL_JARS = Path(__file__).resolve().parents[1] / "build" / "jars"
# `make localfs`: Hadoop's local file system setting permissions with java.nio (jvm/localfs).
LOCALFS_JAR = Path(__file__).resolve().parents[1] / "build" / "localfs" / "sparkscore-localfs.jar"


def localfs_settings() -> dict[str, str]:
    """Spark settings for local checkpoints without a forked ``chmod`` per file (needs ``make localfs``).

    Hadoop without its native library sets every new local file's permission by running
    ``chmod``; these settings swap in the same file system with java.nio permissions. The
    class path settings are read when the JVM starts (``spark-submit --driver-class-path``).
    """
    jar = str(LOCALFS_JAR)
    return {
        "spark.driver.extraClassPath": jar,
        "spark.executor.extraClassPath": jar,
        "spark.hadoop.fs.file.impl": "sparkscore.hadoop.NioLocalFileSystem",
        "spark.hadoop.fs.AbstractFileSystem.file.impl": "sparkscore.hadoop.NioLocalFs",
    }


# Options only kafka_py understands; never passed to the JVM source.
PYTHON_ONLY_OPTIONS = ("latestOffsetsBy",)


def jvm_kafka_available(spark: SparkSession) -> bool:
    """Whether the JVM Kafka connector is loadable in this session (``--packages`` / ``--jars``)."""
    jvm = spark.sparkContext._jvm
    assert jvm is not None
    try:
        return bool(jvm.org.apache.spark.util.Utils.classIsLoadable(JVM_PROVIDER))
    except Exception:  # noqa: BLE001 - an old or unusual JVM side: fall back to a class lookup
        try:
            jvm.java.lang.Class.forName(JVM_PROVIDER)
            return True
        except Exception:  # noqa: BLE001
            return False


def local_jars() -> list[str]:
    """The connector jars ``make jars`` put in build/jars ([] before it ran): for ``--jars`` / ``spark.jars``."""
    return sorted(glob.glob(str(LOCAL_JARS / "*.jar")))


# Settings Spark reads only when its JVM starts: set later (a builder's config), the jars reach
# the executors but not the driver's class loader, and format("kafka") is not found.
LAUNCH_SETTINGS = (
    "spark.jars",
    "spark.jars.packages",
    "spark.jars.repositories",
    "spark.driver.extraClassPath",
)


def launch_jvm(spark_conf: dict[str, str]) -> None:
    """Start Spark's JVM with the config's launch-time settings (``[spark] "spark.jars"``, say).

    Under spark-submit the JVM is already running (its ``--jars`` are loaded) and this
    does nothing; for ``python jobs/stream_score.py`` it is what ``--jars`` would do.
    """
    from pyspark import SparkConf, SparkContext

    wanted = {k: v for k, v in spark_conf.items() if k in LAUNCH_SETTINGS}
    if wanted and SparkContext._gateway is None:
        SparkContext._ensure_initialized(conf=SparkConf(loadDefaults=False).setAll(list(wanted.items())))


def register_python_source(spark: SparkSession) -> None:
    from streaming.source import KafkaPyDataSource

    spark.dataSource.register(KafkaPyDataSource)


def available_backends(spark: SparkSession) -> list[str]:
    """Every backend this session can read Kafka with (kafka_py always; kafka when its jar is loaded)."""
    register_python_source(spark)
    return [PYTHON, JVM] if jvm_kafka_available(spark) else [PYTHON]


def choose_backend(spark: SparkSession, wanted: str = "auto") -> str:
    """Resolve ``auto`` / ``kafka`` / ``kafka_py`` to the backend this session will use."""
    if wanted not in ("auto", JVM, PYTHON):
        raise ConfigError(f"source must be 'auto', 'kafka' or 'kafka_py', got {wanted!r}")
    has_jvm = jvm_kafka_available(spark)
    if wanted == JVM and not has_jvm:
        raise ConfigError(
            f"source = 'kafka' needs Spark's JVM Kafka connector ({JVM_PROVIDER}) on the classpath: "
            f"run `make jars` and pass --jars 'build/jars/*.jar' (local), or --packages {JVM_PACKAGE} "
            "(a cluster), or set source = 'kafka_py' (or 'auto')"
        )
    backend = JVM if wanted == JVM or (wanted == "auto" and has_jvm) else PYTHON
    if backend == PYTHON:
        register_python_source(spark)
    return backend


def read_kafka(spark: SparkSession, backend: str, options: dict[str, str]) -> DataFrame:
    """``spark.readStream.format(backend)`` with the options the backend understands."""
    if backend == JVM:
        options = {k: v for k, v in options.items() if k not in PYTHON_ONLY_OPTIONS}
    return spark.readStream.format(backend).options(**options).load()
