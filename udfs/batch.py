"""The batch job's building blocks: its config, where it reads and writes, and its checks.

``jobs/batch_score.py`` is parse -> read -> transform -> write; everything it
composes lives here, so a pipeline that already has a SparkSession can reuse
the same pieces (``read_input``, ``write_output``, ``write_scored``).

Inputs are a catalog table (``table = "db.events"``) or a path with a format
(parquet, orc, json, csv, or any format the session has a package for), with
reader options, an optional DDL schema and an optional ``where`` filter.
Outputs are a table or a path, with ``partition_by`` and a ``mode``:
``errorifexists`` (the default), ``append``, or ``overwrite``, which replaces
only the partitions the run writes (Spark's dynamic partition overwrite).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from udfs.errors import ConfigError, ErrorRateExceeded, InputPathError, OutputExistsError, whole_sentences
from udfs.spec import ModelSpec

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, Observation, SparkSession

# Formats Spark ships with (and the tests cover); any other name is handed to Spark as is.
BUILTIN_FORMATS = ("parquet", "orc", "json", "csv")
Option = str | int | float | bool
WriteMode = Literal["errorifexists", "overwrite", "append", "merge"]


def _check_source(kind: str, table: str | None, path: str | None, fmt: str | None, options: dict) -> None:
    if (table is None) == (path is None):
        raise ValueError(f"give either table or path (with format) for the {kind}, not both or neither")
    # format = "delta" beside a table says the table is a Delta table (the session then gets Delta).
    if table is not None and ((fmt is not None and fmt != "delta") or options):
        raise ValueError(f"format and options apply to a path {kind}; a table knows its own format")


@dataclass(frozen=True)
class InputConfig:
    """``[input]``: a catalog table, or a path read with ``format`` and reader ``options``."""

    table: str | None = None
    path: str | None = None
    format: str | None = None  # default parquet for a path
    options: dict[str, Option] = field(default_factory=dict)
    schema: str | None = None  # DDL, e.g. "age double, price double" (csv and json otherwise infer it)
    where: str | None = None  # a SQL filter: score only the rows it keeps
    # Delta time travel: read the table as of a version or a timestamp ("2026-11-30 00:00:00").
    version_as_of: int | None = None
    timestamp_as_of: str | None = None
    # Score only the rows added since the last successful run (a Delta input; see udfs.incremental).
    incremental: bool = False
    checkpoint: str | None = None  # where an incremental run keeps its progress

    def __post_init__(self) -> None:
        _check_source("input", self.table, self.path, self.format, self.options)
        if self.table is not None and self.schema is not None:
            raise ValueError("schema applies to a path input; a table has its own schema")
        if self.version_as_of is not None and self.timestamp_as_of is not None:
            raise ValueError("give version_as_of or timestamp_as_of, not both")
        if self.path is not None and self.format != "delta":
            for key in ("version_as_of", "timestamp_as_of", "incremental"):
                if getattr(self, key) not in (None, False):
                    raise ValueError(f"{key} reads a Delta table: set format = 'delta' for the input path")
        if self.incremental:
            if self.version_as_of is not None or self.timestamp_as_of is not None:
                raise ValueError("an incremental run reads what is new; drop version_as_of / timestamp_as_of")
            if not self.checkpoint:
                raise ValueError(
                    "an incremental run needs checkpoint = 'PATH', a folder of its own where it keeps "
                    "how far it has scored"
                )

    @property
    def delta(self) -> bool:
        return (
            self.format == "delta"
            or self.incremental
            or self.version_as_of is not None
            or self.timestamp_as_of is not None
        )

    @property
    def describe(self) -> str:
        where = f" where {self.where}" if self.where else ""
        return (f"table {self.table}" if self.table else f"{self.path} ({self.format or 'parquet'})") + where


@dataclass(frozen=True)
class OutputConfig:
    """``[output]``: a catalog table, or a path written with ``format``; partitioning and mode."""

    table: str | None = None
    path: str | None = None
    format: str | None = None  # path default parquet; a new table's default is spark.sql.sources.default
    options: dict[str, Option] = field(default_factory=dict)
    mode: WriteMode = "errorifexists"
    partition_by: tuple[str, ...] = ()
    # Input columns carried into the output; empty means all of them.
    keep_columns: tuple[str, ...] = ()
    # Delta only: upsert by these key columns (MERGE INTO), or replace only the rows this SQL
    # predicate selects (one partition's rescoring).
    merge_on: tuple[str, ...] = ()
    replace_where: str | None = None

    def __post_init__(self) -> None:
        # format stays allowed with a table: it is the provider of a table the run creates.
        _check_source("output", self.table, self.path, None, self.options)
        if self.merge_on and self.mode == "errorifexists":
            object.__setattr__(self, "mode", "merge")  # merge_on alone means merge
        if self.mode == "merge" and not self.merge_on:
            raise ValueError("mode 'merge' needs merge_on = ['key', ...], the columns that identify a row")
        if self.merge_on and self.mode != "merge":
            raise ValueError(f"merge_on upserts by key; it cannot be combined with mode {self.mode!r}")
        if self.replace_where is not None:
            if self.mode == "errorifexists":
                object.__setattr__(self, "mode", "overwrite")
            if self.mode != "overwrite":
                raise ValueError(f"replace_where overwrites the rows it selects; not with mode {self.mode!r}")
        if self.path is not None and self.format != "delta" and (self.merge_on or self.replace_where):
            raise ValueError("merge_on and replace_where write a Delta table: set format = 'delta'")

    @property
    def delta(self) -> bool:
        return self.format == "delta" or bool(self.merge_on) or self.replace_where is not None

    @property
    def describe(self) -> str:
        return f"table {self.table}" if self.table else f"{self.path} ({self.format or 'parquet'})"


@dataclass(frozen=True)
class JobConfig:
    max_error_rate: float | None = None
    quarantine: str | None = None
    # Rows per Arrow batch between the JVM and Python (spark.sql.execution.arrow.maxRecordsPerBatch),
    # apart from the model's batch_size: a GPU batch of 32 rows need not mean Arrow batches of 32.
    arrow_batch_rows: int = 10_000

    def __post_init__(self) -> None:
        if self.max_error_rate is not None and not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"max_error_rate must be between 0 and 1, got {self.max_error_rate}")
        if self.arrow_batch_rows < 1:
            raise ValueError(f"arrow_batch_rows must be >= 1, got {self.arrow_batch_rows}")


@dataclass(frozen=True)
class BatchConfig:
    model: ModelSpec
    input: InputConfig
    output: OutputConfig
    job: JobConfig = JobConfig()
    spark: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.input.incremental:
            out = self.output
            if out.mode in ("overwrite",) or out.replace_where is not None:
                raise ValueError(
                    "an incremental run adds what is new to the output: use mode 'append' or merge_on, "
                    "not overwrite or replace_where"
                )
            if out.mode == "errorifexists":
                # The first run creates the output, every later one appends what is new.
                object.__setattr__(self, "output", replace(out, mode="append"))
            if self.job.max_error_rate is not None or self.job.quarantine:
                raise ValueError("max_error_rate and quarantine apply to whole runs, not incremental ones")

    @property
    def uses_delta(self) -> bool:
        """Whether the run reads or writes Delta Lake (its session then needs Delta)."""
        return self.input.delta or self.output.delta


def plural(n: int, word: str) -> str:
    """'1 row', '2 rows', '1,000 rows', '2 micro-batches'."""
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}{'es' if word.endswith('ch') else 's'}"


def rate(rows: int, seconds: float) -> str:
    """Rows per second with three significant digits, so a tiny run reads 0.48, not 0."""
    if seconds <= 0:
        return "n/a"
    r = rows / seconds
    return f"{r:,.0f}" if r >= 100 else f"{r:.3g}"


@dataclass(frozen=True)
class Summary:
    input_rows: int
    output_rows: int
    scored: int
    errors: int
    startup_seconds: float  # Spark session, schema, model and device checks
    scoring_seconds: float  # from the first read to the committed write
    model_loads: dict[str, int]
    model_version: str = ""  # the version every row was scored with (a registry model: version+hash)
    model_source: str = ""  # where it came from (models:/ctr@champion (version 3, pytorch), a file)
    model_errors: int = 0  # rows the model itself raised for (found by bisecting their batch)
    bisect_calls: int = 0  # the extra model calls that bisection made
    incremental_batches: int | None = None  # an incremental run: how many micro-batches it took

    @property
    def error_rate(self) -> float:
        return self.errors / self.input_rows if self.input_rows else 0.0

    def render(self) -> str:
        loads = sum(self.model_loads.values())
        model = (
            f"[sparkscore] model version: {self.model_version} ({self.model_source})\n"
            if self.model_version
            else ""
        )
        bisected = (
            f"[sparkscore] model errors: {self.model_errors:,} rows (found with {self.bisect_calls:,} extra "
            "model calls)\n"
            if self.model_errors or self.bisect_calls
            else ""
        )
        new = (
            f"[sparkscore] incremental: {plural(self.input_rows, 'new row')} since the last run "
            f"({plural(self.incremental_batches, 'micro-batch')})\n"
            if self.incremental_batches is not None
            else ""
        )
        return (
            model
            + bisected
            + new
            + (
                f"[sparkscore] rows in: {self.input_rows:,}  out: {self.output_rows:,}  "
                f"scored: {self.scored:,}  errors: {self.errors:,} ({self.error_rate:.2%})\n"
                f"[sparkscore] model loads: {loads} across {plural(len(self.model_loads), 'Python worker')}  "
                f"time: {self.startup_seconds + self.scoring_seconds:.1f} s (start-up {self.startup_seconds:.1f} s, "
                f"scoring {self.scoring_seconds:.1f} s: {rate(self.input_rows, self.scoring_seconds)} rows/s)"
            )
        )


# --- checks before Spark starts or any data is read ---------------------------------------------


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def check_local_paths(cfg: BatchConfig) -> None:
    """Fail before Spark starts on a local input path that is not there or an output it would clobber."""
    inp, out = cfg.input, cfg.output
    if inp.path is not None and _is_local(inp.path) and not os.path.exists(inp.path.removeprefix("file://")):
        raise InputPathError(f"input path {inp.path!r} does not exist")
    if (
        out.path is not None
        and out.mode == "errorifexists"
        and _is_local(out.path)
        and os.path.exists(out.path.removeprefix("file://"))
    ):
        raise OutputExistsError(
            f"output path {out.path!r} already exists; pass --mode overwrite (replaces the partitions "
            "written) or --mode append, or choose another path"
        )


def _tables_in(spark: SparkSession, name: str) -> list[str]:
    db = name.rsplit(".", 1)[0] if "." in name else spark.catalog.currentDatabase()
    try:
        return sorted(f"{db}.{t.name}" for t in spark.catalog.listTables(db))
    except Exception:  # noqa: BLE001 - the database itself may not exist
        return []


def check_output_target(spark: SparkSession, out: OutputConfig, columns: list[str]) -> None:
    """Fail before any data is read on an output that the run could not write."""
    missing = [c for c in out.partition_by if c not in columns]
    if missing:
        raise ConfigError(
            f"partition_by {missing} are not among the output columns {columns}; "
            "add them to keep_columns or drop them from partition_by"
        )
    _check_delta_target(spark, out, columns)
    if out.table is None or not spark.catalog.tableExists(out.table):
        return
    if out.mode == "errorifexists":
        raise OutputExistsError(
            f"output table {out.table!r} already exists; set mode = 'overwrite' (replaces the partitions "
            "written) or 'append', or choose another table"
        )
    existing = spark.table(out.table)
    if set(existing.columns) != set(columns):
        raise ConfigError(
            f"output table {out.table!r} has columns {existing.columns} but the run writes {columns}; "
            "match keep_columns to the table or write to a new table"
        )
    partitions = [c.name for c in spark.catalog.listColumns(out.table) if c.isPartition]
    if out.partition_by and list(out.partition_by) != partitions:
        raise ConfigError(
            f"output table {out.table!r} is partitioned by {partitions}, not {list(out.partition_by)}; "
            "drop partition_by or match it"
        )


def _check_delta_target(spark: SparkSession, out: OutputConfig, columns: list[str]) -> None:
    """merge_on and replace_where need a Delta target; merge_on keys in the rows and the target."""
    from udfs import delta

    target: list[str] | None = None
    if out.table is not None and spark.catalog.tableExists(out.table):
        if (out.merge_on or out.replace_where) and not delta.is_delta_table(spark, out.table):
            raise ConfigError(
                f"output table {out.table!r} is not a Delta table; merge_on and replace_where write "
                "Delta tables only"
            )
        target = spark.table(out.table).columns
    elif out.path is not None and out.merge_on and delta.is_delta_path(spark, out.path):
        target = spark.read.format("delta").load(out.path).columns
    if out.merge_on:
        delta.merge_columns_check(out.merge_on, columns, target, out.describe)


# --- read and write -----------------------------------------------------------------------------


def _condition(exc: Exception) -> str:
    get = getattr(exc, "getCondition", None) or getattr(exc, "getErrorClass", None)
    return (get() if get else None) or ""


def _message(exc: Exception) -> str:
    get = getattr(exc, "getMessage", None)
    return whole_sentences(get() if get else str(exc))


def _format_missing(exc: BaseException) -> bool:
    return isinstance(exc, Exception) and "DATA_SOURCE_NOT_FOUND" in f"{_condition(exc)} {exc}"


def _format_error(side: str, fmt: str) -> ConfigError:
    return ConfigError(
        f"{side} format {fmt!r} is not available in this Spark session; use one of "
        f"{list(BUILTIN_FORMATS)} or add the format's package (spark-submit --packages)"
    )


def read_input(spark: SparkSession, inp: InputConfig) -> DataFrame:
    """The input as a DataFrame (lazy: only the schema is read), filtered by ``where``."""
    from pyspark.errors import AnalysisException

    from udfs import delta

    travel: dict[str, str] = {}
    delta.time_travel(travel, inp.version_as_of, inp.timestamp_as_of)
    if inp.table is not None:
        if not spark.catalog.tableExists(inp.table):
            raise InputPathError(
                f"input table {inp.table!r} does not exist; tables there: {_tables_in(spark, inp.table)}"
            )
        try:
            df = spark.read.options(**travel).table(inp.table)
            if travel:
                df.schema  # noqa: B018 - Spark Connect resolves lazily: a missing version fails here
        except Exception as exc:
            delta.time_travel_error(f"input table {inp.table!r}", inp.version_as_of, inp.timestamp_as_of, exc)
            raise
    else:
        fmt = inp.format or "parquet"
        reader = spark.read.format(fmt).options(**inp.options).options(**travel)
        if inp.schema is not None:
            try:
                reader = reader.schema(inp.schema)
            except Exception as exc:  # noqa: BLE001 - a DDL parse error
                raise ConfigError(
                    f"[input] schema {inp.schema!r} is not a valid DDL schema: {_message(exc)}"
                ) from None
        try:
            df = reader.load(inp.path)
            if fmt == "delta":
                df.schema  # noqa: B018 - Spark Connect resolves lazily: a missing version fails here
        except Exception as exc:  # a missing format comes back as a raw Py4JJavaError
            delta.time_travel_error(f"input {inp.path!r}", inp.version_as_of, inp.timestamp_as_of, exc)
            if _format_missing(exc):
                raise _format_error("input", fmt) from None
            if isinstance(exc, AnalysisException):
                raise InputPathError(
                    f"input path {inp.path!r} cannot be read as {fmt}: {_message(exc)}"
                ) from None
            raise
    if inp.where:
        try:
            df = df.where(inp.where)
        except AnalysisException as exc:
            raise ConfigError(
                f"[input] where {inp.where!r} is not a filter on the input: {_message(exc)}"
            ) from None
    return df


@contextmanager
def _dynamic_partition_overwrite(spark: SparkSession) -> Iterator[None]:
    """Overwrite replaces only the partitions written: Spark's dynamic mode, for this write only."""
    keys = {
        "spark.sql.sources.partitionOverwriteMode": "dynamic",
        "hive.exec.dynamic.partition.mode": "nonstrict",
    }
    before = {k: spark.conf.get(k, None) for k in keys}
    for k, v in keys.items():
        spark.conf.set(k, v)
    try:
        yield
    finally:
        for k, old in before.items():
            if old is None:
                spark.conf.unset(k)
            else:
                spark.conf.set(k, old)


def _fs(spark: SparkSession, path: str) -> tuple[object, object]:
    """(Hadoop FileSystem, Path) for ``path``."""
    jvm = spark.sparkContext._jvm
    assert jvm is not None
    p = jvm.org.apache.hadoop.fs.Path(path)
    return p.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), p  # type: ignore[union-attr]


def _connect(spark: SparkSession) -> bool:
    from udfs.spark import is_connect

    return is_connect(spark)


def _exists(spark: SparkSession, path: str) -> bool:
    if _connect(spark):
        # No JVM in this process: ask through the DataFrame API (a missing path fails analysis).
        try:
            spark.read.format("binaryFile").load(path).schema  # noqa: B018
            return True
        except Exception:  # noqa: BLE001 - PATH_NOT_FOUND
            return False
    fs, p = _fs(spark, path)
    return bool(fs.exists(p))  # type: ignore[attr-defined]


def _delete(spark: SparkSession, path: str) -> None:
    if _connect(spark):
        return  # Spark Connect has no filesystem API: a failed new output stays for the user to remove
    fs, p = _fs(spark, path)
    fs.delete(p, True)  # type: ignore[attr-defined]


def _no_swap_under_connect(spark: SparkSession, what: str) -> None:
    if _connect(spark):
        raise ConfigError(
            f"overwriting {what} atomically needs a file swap, which Spark Connect cannot do; write a "
            "Delta table (format = 'delta'), whose overwrite is one commit, or a partitioned output"
        )


def _rename(spark: SparkSession, src: str, dst: str) -> None:
    fs, p = _fs(spark, src)
    _, q = _fs(spark, dst)
    if not fs.rename(p, q):  # type: ignore[attr-defined]
        raise OSError(f"could not rename {src} to {dst}")


def _beside(path: str, what: str) -> str:
    """A sibling of ``path`` (same filesystem, so a rename is a metadata operation)."""
    return f"{path.rstrip('/')}.sparkscore-{what}-{uuid.uuid4().hex[:12]}"


def swap_in(spark: SparkSession, staged: str, target: str) -> None:
    """Replace ``target`` by the complete ``staged`` output: two renames, then the old copy goes.

    Until the first rename the old output is untouched; a failure between the two renames leaves it
    whole beside the target (the error names where).
    """
    aside = _beside(target, "previous")
    _rename(spark, target, aside)
    try:
        _rename(spark, staged, target)
    except BaseException:
        try:
            _rename(spark, aside, target)
        except Exception:  # noqa: BLE001 - reported below, the old output is intact at `aside`
            raise OSError(f"the previous output of {target} is intact at {aside}; move it back") from None
        raise
    _delete(spark, aside)


def _table_location(spark: SparkSession, table: str) -> tuple[str, str]:
    """(provider, location) of a catalog table."""
    info = {r["col_name"]: r["data_type"] for r in spark.sql(f"DESCRIBE TABLE EXTENDED {table}").collect()}
    return str(info.get("Provider", "")).lower(), str(info.get("Location", ""))


def _is_partitioned(spark: SparkSession, table: str) -> bool:
    return any(c.isPartition for c in spark.catalog.listColumns(table))


def _overwrite_table_atomically(df: DataFrame, table: str) -> None:
    """An unpartitioned file table replaced whole: Spark's insertInto would delete its files before
    the scoring job runs, so the run writes a complete copy beside the table's folder and swaps."""
    spark = df.sparkSession
    provider, location = _table_location(spark, table)
    columns = spark.table(table).columns
    staged = _beside(location, "staging")
    if provider in ("parquet", "orc", "json", "csv", "avro", "text"):
        try:
            df.select(*columns).write.format(provider).save(staged)
            swap_in(spark, staged, location)
        finally:
            if _exists(spark, staged):
                _delete(spark, staged)
        spark.catalog.refreshTable(table)
        return
    # A Hive-format table: score completely into a staging copy first, so a failed scoring task
    # leaves the table as it was; only the final copy replaces its files.
    try:
        df.write.parquet(staged)
        spark.read.parquet(staged).select(*columns).write.insertInto(table, overwrite=True)
    finally:
        if _exists(spark, staged):
            _delete(spark, staged)


def write_output(df: DataFrame, out: OutputConfig) -> None:
    """Write ``df`` to the output table or path, in ``out.mode``.

    An existing table gets ``insertInto`` (columns matched by name first); a new one is created
    with ``saveAsTable``. A path that a failed write created is removed again, so a rerun does not
    stop on "already exists". ``overwrite`` never removes the old output before the new one is
    complete: partitions are replaced by Spark's dynamic partition overwrite (staged, then moved),
    an unpartitioned path or file table is written beside it and swapped in.
    """
    from pyspark.errors import AnalysisException

    from udfs import delta

    spark = df.sparkSession
    table_exists = out.table is not None and spark.catalog.tableExists(out.table)
    if out.delta or (table_exists and delta.is_delta_table(spark, str(out.table))):
        _write_delta(df, out, table_exists)
        return
    with _dynamic_partition_overwrite(spark):
        if out.table is not None:
            if table_exists:
                if out.mode == "errorifexists":
                    raise OutputExistsError(f"output table {out.table!r} already exists")
                if out.mode == "overwrite" and not _is_partitioned(spark, out.table):
                    _no_swap_under_connect(spark, f"table {out.table!r}")
                    _overwrite_table_atomically(df, out.table)
                    return
                columns = spark.table(out.table).columns
                df.select(*columns).write.insertInto(out.table, overwrite=out.mode == "overwrite")
                return
            writer = df.write.mode("error")
            if out.format is not None:
                writer = writer.format(out.format)
            if out.partition_by:
                writer = writer.partitionBy(*out.partition_by)
            writer.saveAsTable(out.table)
            return
        assert out.path is not None
        fmt = out.format or "parquet"
        existed = _exists(spark, out.path)
        swap = out.mode == "overwrite" and not out.partition_by and existed
        if swap:
            _no_swap_under_connect(spark, f"path {out.path!r}")
        target = _beside(out.path, "staging") if swap else out.path
        writer = (
            df.write.format(fmt)
            .mode("error" if swap or out.mode == "errorifexists" else out.mode)
            .options(**out.options)
        )
        if out.partition_by:
            writer = writer.partitionBy(*out.partition_by)
        try:
            writer.save(target)
            if swap:
                swap_in(spark, target, out.path)
        except BaseException as exc:
            if (swap or not existed) and _exists(spark, target):
                _delete(spark, target)
            if isinstance(exc, AnalysisException) and "PATH_ALREADY_EXISTS" in _condition(exc):
                raise OutputExistsError(
                    f"output path {out.path!r} already exists; pass --mode overwrite or choose another path"
                ) from None
            if _format_missing(exc):
                raise _format_error("output", fmt) from None
            raise


def _write_delta(df: DataFrame, out: OutputConfig, table_exists: bool) -> None:
    """Write a Delta table: every mode is one atomic commit (a failed run leaves the table as it was).

    ``overwrite`` replaces the table (or, partitioned, only the partitions written),
    ``replace_where`` the rows its predicate selects, ``merge`` upserts by ``merge_on``.
    """
    from udfs import delta

    spark = df.sparkSession
    exists = table_exists if out.table is not None else delta.is_delta_path(spark, str(out.path))
    if exists and out.mode == "errorifexists":
        raise OutputExistsError(f"output {out.describe} already exists")
    if exists and out.mode == "merge":
        target = spark.table(out.table) if out.table else spark.read.format("delta").load(str(out.path))
        delta.merge(df.select(*target.columns), delta.sql_name(out.table, out.path), out.merge_on)
        return
    if exists and out.table is not None:
        df = df.select(*spark.table(out.table).columns)
    mode = "errorifexists" if out.mode == "merge" else out.mode  # merge into nothing: a new table
    # "error", not "errorifexists": Spark Connect accepts only the short name.
    writer = (
        df.write.format("delta").mode("error" if mode == "errorifexists" else mode).options(**out.options)
    )
    if out.partition_by and not exists:
        writer = writer.partitionBy(*out.partition_by)
    if out.replace_where is not None:
        writer = writer.option("replaceWhere", out.replace_where)
    elif mode == "overwrite" and out.partition_by:
        writer = writer.option("partitionOverwriteMode", "dynamic")
    try:
        if out.table is not None and not exists:
            # Created empty first, then written by its location like a path: Spark's observed counts
            # do not come back from a Delta CTAS through the catalog.
            empty = spark.createDataFrame([], df.schema)  # not df.limit(0): that would fire df's observations
            create = empty.write.format("delta").options(**out.options)
            if out.partition_by:
                create = create.partitionBy(*out.partition_by)
            create.saveAsTable(out.table)
            writer = writer.mode("overwrite")
        if out.table is not None:
            writer.save(delta.location(spark, out.table))
        else:
            writer.save(str(out.path))
    except Exception as exc:
        if "REPLACE_WHERE" in delta.condition(exc):
            raise ConfigError(
                f"replace_where {out.replace_where!r} does not select every row the run wrote, so nothing "
                "was written; filter the input with the same predicate ([input] where)"
            ) from None
        raise


# --- counts, the error-rate limit and the quarantine --------------------------------------------


def count_errors(df: DataFrame) -> tuple[int, int]:
    """(rows, rows with an error) in one aggregation."""
    from pyspark.sql import functions as F

    row = df.agg(F.count(F.lit(1)).alias("n"), F.count("error").alias("bad")).first()
    assert row is not None  # a global aggregation always returns one row
    return int(row["n"]), int(row["bad"])


def check_error_rate(limit: float | None, n: int, bad: int, quarantine: str | None) -> None:
    if limit is None or not n or bad / n <= limit:
        return
    where = (
        f"the bad rows, with their reasons, are in {quarantine}"
        if quarantine
        else "use --quarantine PATH to keep the bad rows with their reasons"
    )
    raise ErrorRateExceeded(
        f"{bad:,} of {n:,} rows ({bad / n:.2%}) have bad features, above --max-error-rate "
        f"{limit:.2%}; nothing was written to the output ({where})"
    )


@dataclass(frozen=True)
class Written:
    """What a run wrote: rows read, rows written, rows with an error, and how long it took."""

    input_rows: int
    output_rows: int
    errors: int
    seconds: float


def observe_rows(df: DataFrame) -> tuple[DataFrame, Observation]:
    """``df`` counting its rows as they pass (read the count after an action ran on it)."""
    from pyspark.sql import Observation
    from pyspark.sql import functions as F

    seen = Observation("sparkscore_rows")
    return df.observe(seen, F.count(F.lit(1)).alias("rows")), seen


def write_scored(scored: DataFrame, cfg: BatchConfig, *, columns: list[str], read: Observation) -> Written:
    """Write ``columns`` of the scored frame to the output, and its bad rows (all columns) to the
    quarantine; with ``max_error_rate`` the rate is checked before the output is written.

    ``read`` is the input's :func:`observe_rows`. Rows in equals rows out is checked inside every
    scoring task (``udfs.spark.with_predictions``), so a task that lost a row fails before Spark
    commits anything; the counts come from observations of the pass that writes, so the input is
    read once.
    """
    from pyspark.sql import Observation
    from pyspark.sql import functions as F

    from udfs.core import ERROR

    job = cfg.job
    started = time.monotonic()
    output = scored.select(*columns) if columns != scored.columns else scored
    # A MERGE runs its source inside a SQL command, whose observed counts Spark Connect does not
    # return: merged runs count from the persisted scores instead (scored once either way).
    if job.max_error_rate is None and not job.quarantine and cfg.output.mode != "merge":
        wrote = Observation("sparkscore_output")
        output = output.observe(wrote, F.count(F.lit(1)).alias("rows"), F.count(ERROR).alias("bad"))
        write_output(output, cfg.output)
        n, bad = int(wrote.get["rows"]), int(wrote.get["bad"])
    else:
        # The rate needs the counts before anything is written: score once, keep the result.
        scored.persist()
        try:
            n, bad = count_errors(scored)
            if job.quarantine:
                scored.filter(F.col(ERROR).isNotNull()).write.mode("overwrite").parquet(job.quarantine)
            check_error_rate(job.max_error_rate, n, bad, job.quarantine)
            write_output(output, cfg.output)
        finally:
            scored.unpersist()
    return Written(int(read.get["rows"]), n, bad, time.monotonic() - started)
