"""Delta Lake for the batch job: the session it needs, time travel, MERGE by key, table versions.

Delta is used when a config says so: ``format = "delta"`` on the input or output, ``merge_on``,
``replace_where``, ``version_as_of`` / ``timestamp_as_of`` or ``incremental``. The session then gets
Delta's SQL extension and catalog (``build_session(delta=True)``); its jars come from
``spark-submit --packages io.delta:delta-spark_2.13:4.4.0`` (a cluster) or ``make jars``
(``build/jars``, which a plain ``python jobs/batch_score.py`` run puts on the JVM's class path).
Everything here goes through SQL and the DataFrame API, so it runs under Spark Connect too.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import TYPE_CHECKING

from udfs.errors import ConfigError, InputPathError, whole_sentences

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

DELTA_VERSION = "4.4.0"
DELTA_PACKAGE = f"io.delta:delta-spark_2.13:{DELTA_VERSION}"
EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"
SESSION_CONF = {"spark.sql.extensions": EXTENSION, "spark.sql.catalog.spark_catalog": CATALOG}
LOCAL_JARS = Path(__file__).resolve().parents[1] / "build" / "jars"


def local_delta_jars() -> list[str]:
    """Delta's jars from ``make jars`` ([] before it ran)."""
    return sorted(glob.glob(str(LOCAL_JARS / "delta-*.jar")))


def _message(exc: BaseException) -> str:
    """The error's first line, without its [CONDITION] prefix (PySpark's getMessage() cannot look up
    Delta's error classes, so the text is taken as it came)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return whole_sentences(text)


def condition(exc: BaseException) -> str:
    get = getattr(exc, "getCondition", None) or getattr(exc, "getErrorClass", None)
    return (get() if get else None) or ""


def _is_connect(spark: SparkSession) -> bool:
    from udfs.spark import is_connect

    return is_connect(spark)


def jars_loaded(spark: SparkSession) -> bool:
    """Whether Delta's classes are on this session's class path (a Connect server: assumed)."""
    if _is_connect(spark):
        return True
    jvm = spark.sparkContext._jvm
    assert jvm is not None
    try:
        return bool(jvm.org.apache.spark.util.Utils.classIsLoadable(EXTENSION))
    except Exception:  # noqa: BLE001
        return False


def check_session(spark: SparkSession) -> None:
    """One sentence when this session cannot read or write Delta tables."""
    if not jars_loaded(spark):
        raise ConfigError(
            "this config uses Delta Lake but its jars are not on Spark's class path; pass "
            f"--packages {DELTA_PACKAGE} to spark-submit (or run `make jars` and pass "
            f"--jars {','.join(local_delta_jars()) or 'build/jars/delta-spark_2.13-4.4.0.jar,...'})"
        )
    if _is_connect(spark):
        return
    extensions = str(spark.conf.get("spark.sql.extensions", "") or "")
    if EXTENSION not in extensions:
        raise ConfigError(
            "this config uses Delta Lake but the SparkSession was created without Delta's extension; "
            f"start Spark with --conf spark.sql.extensions={EXTENSION} "
            f"--conf spark.sql.catalog.spark_catalog={CATALOG}"
        )


def is_delta_table(spark: SparkSession, table: str) -> bool:
    """Whether the catalog table ``table`` (which exists) is a Delta table."""
    rows = spark.sql(f"DESCRIBE TABLE EXTENDED {table}").collect()
    info = {r["col_name"]: r["data_type"] for r in rows}
    return str(info.get("Provider", "")).lower() == "delta"


def is_delta_path(spark: SparkSession, path: str) -> bool:
    """Whether ``path`` holds a Delta table (its ``_delta_log``)."""
    try:
        spark.sql(f"DESCRIBE DETAIL delta.`{path}`").collect()
        return True
    except Exception:  # noqa: BLE001 - not a Delta table, or nothing there
        return False


def sql_name(table: str | None, path: str | None) -> str:
    """How SQL names the table: a catalog name, or ``delta.`path```."""
    if table is not None:
        return table
    assert path is not None
    return "delta.`" + path.replace("`", "``") + "`"


def latest_version(spark: SparkSession, name: str) -> int:
    row = spark.sql(f"DESCRIBE HISTORY {name} LIMIT 1").select("version").first()
    assert row is not None
    return int(row["version"])


def location(spark: SparkSession, name: str) -> str:
    """Where the Delta table ``name`` keeps its files."""
    row = spark.sql(f"DESCRIBE DETAIL {name}").select("location").first()
    assert row is not None
    return str(row["location"])


def table_id(spark: SparkSession, name: str) -> str:
    """Delta's id of the table (kept across renames and overwrites; new for a new table)."""
    row = spark.sql(f"DESCRIBE DETAIL {name}").select("id").first()
    assert row is not None
    return str(row["id"])


def time_travel(reader_options: dict[str, str], version: int | None, timestamp: str | None) -> None:
    if version is not None:
        reader_options["versionAsOf"] = str(version)
    if timestamp is not None:
        reader_options["timestampAsOf"] = timestamp


def time_travel_error(what: str, version: int | None, timestamp: str | None, exc: BaseException) -> None:
    """Turn Delta's time-travel errors into one sentence (else return and let the caller raise)."""
    cond = condition(exc)
    if version is None and timestamp is None:
        return
    if cond.startswith("DELTA_") and ("VERSION" in cond or "TIMESTAMP" in cond or "TIME_TRAVEL" in cond):
        at = f"version_as_of = {version}" if version is not None else f"timestamp_as_of = {timestamp!r}"
        raise InputPathError(f"{what} has no {at}: {_message(exc)}") from None


def merge_columns_check(
    keys: tuple[str, ...], columns: list[str], target: list[str] | None, where: str
) -> None:
    """``merge_on`` names columns the run writes and, when it exists, the target has."""
    missing = [k for k in keys if k not in columns]
    if missing:
        raise ConfigError(
            f"merge_on {missing} are not among the output columns {columns}; add them to keep_columns "
            "or merge on other columns"
        )
    if target is not None:
        absent = [k for k in keys if k not in target]
        if absent:
            raise ConfigError(f"merge_on {absent} are not columns of the target {where} (it has {target})")


def merge(df: DataFrame, name: str, keys: tuple[str, ...]) -> None:
    """Upsert ``df`` into the Delta table ``name`` by ``keys``: matched rows are updated, new keys
    inserted, other rows left alone. Running it again with the same rows changes nothing."""
    view = "__sparkscore_merge_source"
    df.createOrReplaceTempView(view)

    def q(c: str) -> str:
        return "`" + c.replace("`", "``") + "`"

    on = " AND ".join(f"t.{q(k)} <=> s.{q(k)}" for k in keys)
    try:
        df.sparkSession.sql(
            f"MERGE INTO {name} AS t USING {view} AS s ON {on} "
            "WHEN MATCHED THEN UPDATE SET * WHEN NOT MATCHED THEN INSERT *"
        )
    except Exception as exc:
        if "MULTIPLE_SOURCE_ROW_MATCHING" in condition(exc):
            raise ConfigError(
                f"merge_on {list(keys)} is not a key of the scored rows: several rows share a key that "
                "the target has; merge on columns that identify a row"
            ) from None
        raise
    finally:
        df.sparkSession.catalog.dropTempView(view)
