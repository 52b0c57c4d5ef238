"""Which Kafka source a query uses: the JVM connector when present, else ``kafka_py``.

Both take the same options and return the same schema, so the choice changes
nothing downstream. ``source = "kafka"`` or ``"kafka_py"`` in the config
overrides the automatic choice.
"""

from __future__ import annotations

import glob
import os
from typing import TYPE_CHECKING

from udfs.errors import ConfigError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

JVM = "kafka"
PYTHON = "kafka_py"
JVM_PROVIDER = "org.apache.spark.sql.kafka010.KafkaSourceProvider"
JVM_PACKAGE = "org.apache.spark:spark-sql-kafka-0-10_2.13:4.3.0"

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


def jvm_kafka_jars() -> list[str]:
    """Kafka connector jars in pyspark's own jar folder (what a plain local session puts on its classpath)."""
    import pyspark

    home = os.environ.get("SPARK_HOME") or os.path.dirname(pyspark.__file__)
    return sorted(glob.glob(os.path.join(home, "jars", "spark-sql-kafka-0-10_*.jar")))


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
            f"source = 'kafka' needs the JVM Kafka connector ({JVM_PROVIDER}) on the classpath: "
            f"spark-submit --packages {JVM_PACKAGE} ..., or set source = 'kafka_py' (or 'auto')"
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
