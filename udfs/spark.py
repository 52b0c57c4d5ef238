"""Spark wrappers around the scoring core.

:func:`with_predictions` returns a pure ``DataFrame -> DataFrame`` transform
(use it with ``df.transform``). What it captures on the driver is only the
small :class:`ResolvedModel` record; the model itself is loaded lazily on each
executor's Python worker through the per-process cache, so it is loaded once
per worker and reused across tasks and batches. It runs on ``mapInArrow``:
Spark's Arrow batches reach the core without a pandas round trip.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator

import pyarrow as pa
from pyspark import Accumulator, AccumulatorParam
from pyspark.sql import DataFrame
from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema
from pyspark.sql.types import StructType

from udfs import model_cache
from udfs.core import load_scorer, output_schema, score_batch
from udfs.errors import SparkscoreError
from udfs.features import check_columns
from udfs.spec import ResolvedModel


class ColumnConflictError(SparkscoreError):
    """The input already has a column the scorer would add."""


class _DictSum(AccumulatorParam):  # type: ignore[type-arg]
    """Accumulates {worker: loads} maps by summing per key."""

    def zero(self, value: dict[str, int]) -> dict[str, int]:
        return {}

    def addInPlace(self, a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
        for k, v in b.items():
            a[k] = a.get(k, 0) + v
        return a


def model_load_tracker(df: DataFrame) -> Accumulator:  # type: ignore[type-arg]
    """An accumulator that collects how many times each Python worker loaded the model."""
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


def _score_partitions(
    model: ResolvedModel,
    keep: list[str],
    out_schema: pa.Schema,
    tracker: Accumulator | None,  # type: ignore[type-arg]
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    def score_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        loads_before = model_cache.total_loads()
        scorer = load_scorer(model)
        loaded = model_cache.total_loads() - loads_before
        if tracker is not None:
            tracker.add({f"{socket.gethostname()}:{os.getpid()}": loaded})
        for batch in rebatch(batches, model.spec.batch_size):
            preds = score_batch(batch, scorer)
            kept = [batch.column(name) for name in keep]
            yield pa.RecordBatch.from_arrays(kept + preds.columns, schema=out_schema)

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
        arrow_schema = to_arrow_schema(df.schema)
        check_columns(arrow_schema, model.spec.input_columns, model.spec.num_features)
        kept = list(df.columns) if keep is None else list(keep)
        missing = [c for c in kept if c not in df.columns]
        if missing:
            raise ColumnConflictError(f"columns to keep {missing} are not in the data; it has {df.columns}")
        clash = [f.name for f in output_schema(model) if f.name in kept]
        if clash:
            raise ColumnConflictError(
                f"the input already has column(s) {clash} that scoring adds; drop or rename them first"
            )
        schema = scored_schema(df.schema, model, kept)
        out_arrow = to_arrow_schema(schema)
        # Only the input columns the model reads or the output keeps cross into Python.
        needed = list(dict.fromkeys(kept + list(model.spec.input_columns)))
        return df.select(*needed).mapInArrow(_score_partitions(model, kept, out_arrow, tracker), schema)

    return transform
