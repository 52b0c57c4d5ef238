"""Spark wrappers around the scoring core.

:func:`with_predictions` returns a pure ``DataFrame -> DataFrame`` transform
(use it with ``df.transform``). What it captures on the driver is only the
small :class:`ResolvedModel` record; the model itself is loaded lazily on each
executor's Python worker through the per-process cache, so it is loaded once
per worker and reused across tasks and batches. It runs on ``mapInArrow``:
Spark's Arrow batches reach the core without a pandas round trip.

:func:`predict_udf` is the same core as a Column function: a Spark Arrow UDF
(``pyspark.sql.functions.arrow_udf``; an iterator pandas UDF on a PySpark
without it) that takes the feature columns and returns a struct of the
prediction columns, for ``select`` / ``withColumn`` and, once registered with
``spark.udf.register``, for SQL. It shares the per-worker model cache.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
from pyspark import Accumulator, AccumulatorParam
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema
from pyspark.sql.types import StructField, StructType

from udfs import model_cache
from udfs.core import (
    MODEL_VERSION,
    STATS,
    Scorer,
    check_input,
    check_model,
    load_scorer,
    output_schema,
    score_batch,
)
from udfs.device import resolve_device
from udfs.errors import ColumnTypeError, DeviceError, MissingColumnsError, SparkscoreError
from udfs.spec import ModelSpec, ResolvedModel, resolve


class ColumnConflictError(SparkscoreError):
    """The input already has a column the scorer would add."""


class ArgumentCountError(SparkscoreError):
    """The scoring UDF was called with a different number of columns than input_columns lists."""


class RowCountError(RuntimeError):
    """A scoring task produced a different number of rows than it read (fails the task, so the
    write is never committed)."""


def quoted(name: str) -> Column:
    """The column called ``name`` exactly, even when the name holds dots or backticks."""
    from pyspark.sql import functions as F

    return F.col("`" + name.replace("`", "``") + "`")


def _arrow_field(field: StructField, timezone: str) -> pa.Field | None:
    """The Arrow field Spark hands Python for ``field``, or None when Spark cannot send that type
    through Arrow (``interval year to month``, ``interval``)."""
    try:
        return to_arrow_schema(StructType([field]), timezone=timezone).field(0)
    except Exception:  # noqa: BLE001 - PySparkTypeError UNSUPPORTED_DATA_TYPE_FOR_ARROW_CONVERSION
        return None


def session_time_zone(df: DataFrame) -> str:
    return str(df.sparkSession.conf.get("spark.sql.session.timeZone") or "UTC")


def feature_schema(df_schema: StructType, input_columns: tuple[str, ...], timezone: str = "UTC") -> pa.Schema:
    """The Arrow schema of the feature columns only: the other columns never reach the scorer, so
    their types (timestamps, intervals, variants, maps...) do not matter here."""
    names = df_schema.names
    missing = [c for c in input_columns if c not in names]
    if missing:
        raise MissingColumnsError(missing, list(names))
    fields = []
    for name in dict.fromkeys(input_columns):
        arrow = _arrow_field(df_schema[name], timezone)
        if arrow is None:
            raise ColumnTypeError(
                f"input column {name!r} has type {df_schema[name].dataType.simpleString()}; features "
                "must be numeric columns"
            )
        fields.append(arrow)
    return pa.schema(fields)


def check_keep_columns(df_schema: StructType, model: ResolvedModel, keep: list[str]) -> None:
    """The columns to keep exist and none of them is a column scoring adds."""
    names = df_schema.names
    missing = [c for c in keep if c not in names]
    if missing:
        raise ColumnConflictError(f"columns to keep {missing} are not in the data; it has {names}")
    clash = [f.name for f in output_schema(model) if f.name in keep]
    if clash:
        raise ColumnConflictError(
            f"the input already has column(s) {clash} that scoring adds; drop or rename them first"
        )


class _DictSum(AccumulatorParam):  # type: ignore[type-arg]
    """Accumulates {worker: loads} maps by summing per key."""

    def zero(self, value: dict[str, int]) -> dict[str, int]:
        return {}

    def addInPlace(self, a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
        for k, v in b.items():
            a[k] = a.get(k, 0) + v
        return a


def model_load_tracker(df: DataFrame) -> Accumulator | None:  # type: ignore[type-arg]
    """An accumulator that collects how many times each Python worker loaded the model (None under
    Spark Connect, which has no accumulators)."""
    if is_connect(df.sparkSession):
        return None
    return df.sparkSession.sparkContext.accumulator({}, _DictSum())


def rebatch(batches: Iterator[pa.RecordBatch], min_rows: int) -> Iterator[pa.RecordBatch]:
    """Merge small Arrow batches until they hold ``min_rows`` rows (big ones pass through uncopied)."""
    pending: list[pa.RecordBatch] = []
    rows = 0
    for batch in batches:
        if not pending and batch.num_rows >= min_rows:
            yield batch
            continue
        pending.append(batch)
        rows += batch.num_rows
        if rows >= min_rows:
            yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]
            pending, rows = [], 0
    if pending and rows:
        yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]


def _task_scorer(model: ResolvedModel, tracker: Accumulator | None) -> Scorer:  # type: ignore[type-arg]
    """The cached scorer for this task; reports this worker's model loads to ``tracker``."""
    loads_before = model_cache.total_loads()
    scorer = load_scorer(model)
    if tracker is not None:
        tracker.add({f"{socket.gethostname()}:{os.getpid()}": model_cache.total_loads() - loads_before})
    return scorer


# Keys of the tracker accumulator that count bisections rather than a worker's model loads.
MODEL_ERRORS = "__model_errors__"
BISECT_CALLS = "__bisect_calls__"


def _scored(batch: pa.RecordBatch, scorer: Scorer, tracker: Accumulator | None) -> pa.RecordBatch:  # type: ignore[type-arg]
    """score_batch, reporting the rows that got a model error and the extra calls bisection made."""
    before = STATS.snapshot()
    preds = score_batch(batch, scorer)
    if tracker is not None:
        errors, calls = (a - b for a, b in zip(STATS.snapshot(), before, strict=True))
        if errors or calls:
            tracker.add({MODEL_ERRORS: errors, BISECT_CALLS: calls})
    return preds


def check_row_count(batch: pa.RecordBatch, preds: pa.RecordBatch) -> None:
    """Every input row comes out once; checked per batch inside the task, before anything is committed."""
    if preds.num_rows != batch.num_rows:
        raise RowCountError(
            f"scoring returned {preds.num_rows} rows for a batch of {batch.num_rows}; the task fails "
            "so that no incomplete output is committed"
        )


def _score_partitions(
    model: ResolvedModel,
    names: list[str],
    keep: list[str],
    tracker: Accumulator | None,  # type: ignore[type-arg]
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The mapInArrow body: batches of the columns ``names`` (in that order, under placeholder
    names) -> the ``keep`` columns as Spark sent them, then the prediction columns."""
    index = {name: i for i, name in enumerate(names)}
    positions = [index[name] for name in keep]
    # model_version is the same on every row: the JVM adds it (see with_predictions), so it never
    # crosses back from Python as a string per row.
    version_at = output_schema(model).names.index(MODEL_VERSION)

    def score_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        scorer = _task_scorer(model, tracker)
        for batch in rebatch(batches, model.spec.batch_size):
            named = pa.RecordBatch.from_arrays(batch.columns, names=names)
            preds = _scored(named, scorer, tracker)
            check_row_count(batch, preds)
            # Kept columns go back exactly as Spark sent them: Arrow types, time zones and field
            # metadata (a variant's) included.
            kept = [batch.column(i) for i in positions]
            fields = [
                batch.schema.field(i).with_name(f"_sparkscore_out_{n}") for n, i in enumerate(positions)
            ]
            out = [
                (f, c)
                for n, (f, c) in enumerate(zip(preds.schema, preds.columns, strict=True))
                if n != version_at
            ]
            fields += [f.with_name(f"_sparkscore_out_{len(positions) + n}") for n, (f, _) in enumerate(out)]
            yield pa.RecordBatch.from_arrays(kept + [c for _, c in out], schema=pa.schema(fields))

    return score_partition


def scored_schema(df_schema: StructType, model: ResolvedModel, keep: list[str]) -> StructType:
    """The Spark schema of the scored frame: kept input columns, then the prediction columns."""
    kept = StructType([df_schema[name] for name in keep])
    return StructType(kept.fields + from_arrow_schema(output_schema(model)).fields)


def with_predictions(
    model: ResolvedModel,
    *,
    keep: list[str] | None = None,
    tracker: Accumulator | None = None,  # type: ignore[type-arg]
) -> Callable[[DataFrame], DataFrame]:
    """A ``df.transform`` step that appends prediction columns to every row.

    ``keep`` lists input columns to carry through (default: all of them).
    ``tracker`` (from :func:`model_load_tracker`) records model loads per worker.
    The output has exactly one row per input row; bad rows carry ``error``.
    """

    def transform(df: DataFrame) -> DataFrame:
        timezone = session_time_zone(df)
        features = feature_schema(df.schema, model.spec.columns, timezone)
        check_input(features, model)
        kept = list(df.columns) if keep is None else list(keep)
        check_keep_columns(df.schema, model, kept)
        schema = scored_schema(df.schema, model, kept)
        if any(_arrow_field(df.schema[name], timezone) is None for name in kept):
            # A kept column Spark cannot send through Arrow (interval year to month) stays in the
            # JVM: the Column UDF takes only the features and its struct is expanded beside it.
            udf = predict_udf(model, check=False, tracker=tracker)
            pred = "__sparkscore_prediction"
            scored = df.select(
                *[quoted(c) for c in kept], udf(*[quoted(c) for c in model.spec.columns]).alias(pred)
            )
            outputs = [F.col(f"{pred}.`{f.name}`").alias(f.name) for f in output_schema(model)]
            return scored.select(*[quoted(c) for c in kept], *outputs)
        # Only the input columns the model reads or the output keeps cross into Python, under
        # plain names (mapInArrow cannot resolve a column whose name holds a dot); Python and the
        # result get the real names back.
        needed = list(dict.fromkeys(kept + list(model.spec.columns)))
        plain = [f"_sparkscore_{i}" for i in range(len(needed))]
        version_at = len(kept) + output_schema(model).names.index(MODEL_VERSION)
        from_python = [f for i, f in enumerate(schema.fields) if i != version_at]
        plain_schema = StructType(
            [StructField(f"_sparkscore_out_{i}", f.dataType, f.nullable) for i, f in enumerate(from_python)]
        )
        selected = df.select(*[quoted(c).alias(p) for c, p in zip(needed, plain, strict=True)])
        scored = selected.mapInArrow(_score_partitions(model, needed, kept, tracker), plain_schema)
        out = [F.col(f.name) for f in plain_schema.fields]
        # nullif keeps the column nullable, as the UDF's struct field is (the version is never "").
        out.insert(version_at, F.nullif(F.lit(model.version), F.lit("")))
        return scored.select(*out).toDF(*schema.names)

    return transform


# --- the Column UDF -----------------------------------------------------------------------------


def _score_arrays(
    model: ResolvedModel,
    tracker: Accumulator | None,  # type: ignore[type-arg]
) -> Callable[[Iterator[Any]], Iterator[pa.Array]]:
    """The UDF body: each Arrow batch of feature columns (one array, or a tuple) -> a struct array."""
    names = list(model.spec.columns)

    def score(batches: Iterator[Any]) -> Iterator[pa.Array]:
        scorer = _task_scorer(model, tracker)
        checked = False
        for args in batches:
            arrays = list(args) if isinstance(args, tuple) else [args]
            if len(arrays) != len(names):
                raise ArgumentCountError(_arity_message(model, len(arrays)))
            batch = pa.RecordBatch.from_arrays(arrays, names=names)
            if not checked:
                check_input(batch.schema, model)
                checked = True
            preds = _scored(batch, scorer, tracker)
            check_row_count(batch, preds)
            yield pa.StructArray.from_arrays(preds.columns, fields=list(preds.schema))

    return score


def _score_series(
    model: ResolvedModel,
    tracker: Accumulator | None,  # type: ignore[type-arg]
) -> Callable[[Iterator[Any]], Iterator[Any]]:
    """The same body for an iterator pandas UDF (PySpark without ``arrow_udf``).

    Spark hands a pandas UDF a null double as NaN, so on this path a null float feature is
    reported as null and a NaN one too; the Arrow UDF keeps them apart.
    """
    arrow_body = _score_arrays(model, tracker)

    def score(batches: Iterator[Any]) -> Iterator[Any]:
        def as_arrow(args: Any) -> Any:
            if isinstance(args, tuple):
                return tuple(pa.Array.from_pandas(s) for s in args)
            return pa.Array.from_pandas(args)

        for struct in arrow_body(as_arrow(args) for args in batches):
            yield pa.RecordBatch.from_struct_array(struct).to_pandas()

    return score


def _arity_message(model: ResolvedModel, given: int) -> str:
    cols = list(model.spec.columns)
    source = "[[model.inputs]]" if model.spec.signature is not None else "input_columns"
    return (
        f"the scoring UDF of model {model.name!r} takes {len(cols)} column(s), {cols} in that order "
        f"({source}), but was called with {given}"
    )


def _arrow_udf() -> Any:
    """``pyspark.sql.functions.arrow_udf`` where this PySpark has it (4.1+), else None."""
    from pyspark.sql import functions

    return getattr(functions, "arrow_udf", None)


class ScoringUDF:
    """What :func:`predict_udf` returns: call it on feature columns, or register it for SQL.

    It carries the attributes ``spark.udf.register`` reads from a PySpark UDF, so
    ``spark.udf.register("ctr_score", score)`` makes ``ctr_score(...)`` a SQL function.
    """

    def __init__(self, udf: Any, model: ResolvedModel) -> None:
        self._udf = udf
        self.model = model
        self.func = udf.func
        self.returnType = udf.returnType
        self.evalType = udf.evalType
        self.deterministic = udf.deterministic
        self.__name__ = udf.__name__

    def asNondeterministic(self) -> ScoringUDF:
        """The same scoring UDF marked nondeterministic (Spark then never re-evaluates or
        reorders it), with the same argument checks."""
        return ScoringUDF(self._udf.asNondeterministic(), self.model)

    def __call__(self, *cols: Column | str) -> Column:
        """The prediction struct for these feature columns (default: the ones input_columns names)."""
        if not cols:
            cols = tuple(quoted(c) for c in self.model.spec.columns)
        if len(cols) != len(self.model.spec.columns):
            raise ArgumentCountError(_arity_message(self.model, len(cols)))
        return self._udf(*cols)


def predict_udf(
    model: ModelSpec | ResolvedModel,
    *,
    check: bool = True,
    tracker: Accumulator | None = None,  # type: ignore[type-arg]
) -> ScoringUDF:
    """A Spark UDF that scores feature columns and returns a struct of the prediction columns.

    ``score(*columns)`` takes the columns ``input_columns`` names, in that order (or the one array
    column; with no arguments, the columns of those names) and returns a struct of ``prediction``
    (or ``probabilities`` + ``label``), ``model_version``, ``error`` and, for an ensemble,
    ``degraded``, ``missing_members`` and the member columns. ``check`` loads the model on the
    driver first and scores a row of zeros, so a wrong file or spec fails here with one sentence.
    ``tracker`` (from :func:`model_load_tracker`) records model loads per worker.
    """
    resolved = resolve(model) if isinstance(model, ModelSpec) else model
    if check:
        check_model(resolved)
    return_type = StructType(from_arrow_schema(output_schema(resolved)).fields)
    arrow_udf = _arrow_udf()
    width = len(resolved.spec.columns)
    if arrow_udf is not None:
        fn = _score_arrays(resolved, tracker)
        _iterator_hints(fn, pa.Array, pa.Array, width)
    else:
        import pandas as pd

        fn = _score_series(resolved, tracker)
        _iterator_hints(fn, pd.Series, pd.DataFrame, width)
    # Spark names the UDF in plans and in the default column name after the function, so it is
    # named before the UDF is made: `sparkscore_ctr(age, ...)`, not `score(...)`.
    fn.__name__ = udf_name(resolved)
    fn.__qualname__ = fn.__name__
    if arrow_udf is not None:
        udf = arrow_udf(fn, return_type)
    else:
        from pyspark.sql.functions import pandas_udf

        udf = pandas_udf(fn, return_type)  # type: ignore[call-overload]
    return ScoringUDF(udf, resolved)


def udf_name(model: ResolvedModel) -> str:
    """``sparkscore_<model name>`` with anything but letters, digits and _ turned into _."""
    return "sparkscore_" + re.sub(r"\W", "_", model.name)


def _iterator_hints(fn: Callable[..., Any], column: type, result: type, width: int) -> None:
    """PySpark picks a UDF's kind from its type hints: an iterator of one column or of a tuple of
    ``width`` columns, to an iterator of results. The width is only known here, so they are set here."""
    columns = column if width == 1 else tuple.__class_getitem__((column,) * width)
    fn.__annotations__ = {"batches": Iterator[columns], "return": Iterator[result]}  # type: ignore[valid-type]


def ship_model_files(spark: SparkSession, model: ResolvedModel, *, force: bool = False) -> list[str]:
    """Ship every local model file (an ONNX model's external data included) to the executors, as
    ``spark-submit --files`` would; executors find them by name (``model_cache.locate``).

    On a local master the executors read the files where they are, so nothing is shipped unless
    ``force``. Returns the files shipped.
    """
    master = str(spark.conf.get("spark.master", "") or "")
    if master.startswith("local") and not force:
        return []
    files = [f for m in model.members if m.store is None for f in (m.files or (m.path,))]
    if not files:
        return []
    if is_connect(spark):
        spark.addArtifacts(*files, file=True)
    else:
        for f in files:
            spark.sparkContext.addFile(f)
    return files


def is_connect(spark: SparkSession) -> bool:
    """Whether ``spark`` is a Spark Connect session (no SparkContext, no JVM in this process)."""
    try:
        from pyspark.sql.connect.session import SparkSession as ConnectSession
    except ImportError:
        return False
    return isinstance(spark, ConnectSession)


def check_device(spark: SparkSession, model: ResolvedModel) -> str:
    """The device a scoring task gets, found by one probe task before any data is read.

    Raises DeviceError, with its one sentence, when the configured device is not available where
    tasks run (``device = "cuda"`` on executors without CUDA, GPU addresses CUDA cannot use).
    """
    requested = model.spec.device
    if requested == "cpu":
        return "cpu"

    def probe(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for _ in batches:
            pass
        try:
            device, error = resolve_device(requested), None
        except DeviceError as exc:
            device, error = None, str(exc)
        yield pa.record_batch(
            {"device": pa.array([device], pa.string()), "error": pa.array([error], pa.string())}
        )

    row = spark.range(1, numPartitions=1).mapInArrow(probe, "device string, error string").first()
    assert row is not None
    if row["error"]:
        raise DeviceError(row["error"])
    return str(row["device"])
