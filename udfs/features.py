"""Arrow columns -> a float32 feature matrix, with a reason for every bad row.

Two input layouts are accepted:

* one fixed-length array column (``array<float>``, ``array<double>``,
  ``array<int>`` or ``array<string>``), of ``num_features`` elements;
* a list of scalar numeric (or numeric-string) columns, one feature each.

Good rows go into one contiguous float32 matrix (zero-copy when the data is
already a clean float32 array column). A row that is null, of the wrong length,
non-numeric, NaN or infinite is left out of the matrix and gets a reason
instead; the reasons are the same strings on every path (batch, stream,
real-time), which is what the parity tests compare.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from udfs.errors import ColumnTypeError, ConfigError, MissingColumnsError

# Zero-copy Arrow buffers are read-only; models never write to their inputs.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


@dataclass(frozen=True)
class Features:
    """The good rows as one matrix, and why each bad row was left out."""

    matrix: np.ndarray  # float32, shape (number of good rows, num_features)
    valid: np.ndarray  # bool, shape (rows,): True where the row is in ``matrix``
    errors: list[str | None] | None  # per row reason, None when every row is good

    @property
    def num_rows(self) -> int:
        return len(self.valid)

    @property
    def num_errors(self) -> int:
        return int(self.num_rows - self.valid.sum())


def is_array_type(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_numeric(t: pa.DataType) -> bool:
    return (
        pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_boolean(t)
    )


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def check_columns(schema: pa.Schema, input_columns: tuple[str, ...], num_features: int | None) -> None:
    """Fail before scoring when the data cannot feed the model (names, types, layout).

    For a model spec, :func:`udfs.core.check_input` picks this or the typed signature's check."""
    existing = schema.names
    missing = [c for c in input_columns if c not in existing]
    if missing:
        raise MissingColumnsError(missing, list(existing))
    if len(input_columns) == 1 and is_array_type(schema.field(input_columns[0]).type):
        name = input_columns[0]
        value_type = schema.field(name).type.value_type
        if not (_is_numeric(value_type) or _is_text(value_type)):
            raise ColumnTypeError(f"input column {name!r} is an array of {value_type}; it must hold numbers")
        if num_features is None:
            raise ConfigError(
                f"input column {name!r} is an array: set num_features in [model] to its fixed length"
            )
        return
    if len(input_columns) == 1 and num_features is not None and num_features != 1:
        name = input_columns[0]
        raise ColumnTypeError(
            f"input column {name!r} is a scalar {schema.field(name).type} but num_features = {num_features}; "
            "name an array column of that length, or list one scalar column per feature and drop num_features"
        )
    for name in input_columns:
        t = schema.field(name).type
        if is_array_type(t):
            raise ColumnTypeError(
                f"input column {name!r} is an array but {len(input_columns)} columns are listed; "
                "name one array column alone, or list scalar numeric columns"
            )
        if not (_is_numeric(t) or _is_text(t)):
            raise ColumnTypeError(
                f"input column {name!r} has type {t}; features must be numeric columns "
                "(use `array` to combine numeric columns into one array column)"
            )


def _column(batch: pa.RecordBatch | pa.Table, name: str) -> pa.Array:
    col = batch.column(name)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col


@dataclass(frozen=True)
class _Floats:
    """One column's values as float32, and masks of the entries that cannot be used (None: none)."""

    values: np.ndarray  # float32; bad entries hold anything
    nulls: np.ndarray | None
    non_numeric: np.ndarray | None
    out_of_range: np.ndarray | None  # finite, but beyond float32 (it would turn into inf)
    wide: np.ndarray | None = None  # the float64 values, kept only to describe out-of-range entries


# A decimal float literal: pandas gives up on exponents beyond float64 ('1e400'), Python reads them
# as +-inf, the same value as 'inf', so they get the same reason.
_FLOAT_LITERAL = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+\s*")


def _parse_text(values: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
    """Numeric strings as float64, plus the mask of entries that are not numbers."""
    import pandas as pd

    raw = values.to_numpy(zero_copy_only=False)
    series = pd.Series(raw, dtype=object)
    numbers = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.isnan(numbers) & series.notna().to_numpy()
    for i in np.flatnonzero(bad):
        if _FLOAT_LITERAL.fullmatch(raw[i]):
            numbers[i] = float(raw[i])
            bad[i] = False
    # A literal "nan" parses to NaN on purpose: it is reported as non-finite, not non-numeric.
    bad &= ~series.str.strip().str.lower().isin(["nan", "+nan", "-nan"]).to_numpy(dtype=bool)
    return numbers, bad if bad.any() else None


def _to_float(values: pa.Array) -> _Floats:
    """Numbers as float32, with masks of null, non-numeric and out-of-float32-range entries."""
    t = values.type
    nulls = np.asarray(values.is_null(), dtype=bool) if values.null_count else None
    non_numeric = None
    if _is_text(t):
        wide, non_numeric = _parse_text(values)
    else:
        if pa.types.is_decimal(t) or pa.types.is_boolean(t):
            values = pc.cast(values, pa.float64())
        # Zero-copy for a clean float32 buffer; nulls come back as NaN and are masked below.
        wide = values.to_numpy(zero_copy_only=False)
    # Overflow to inf is detected below and reported as out of range, so numpy's warning is noise.
    with np.errstate(over="ignore", invalid="ignore"):
        arr = wide.astype(np.float32, copy=False)
    out_of_range = None
    if wide.dtype != np.float32 and not (pa.types.is_integer(t) or pa.types.is_boolean(t)):
        overflow = np.isinf(arr)
        if overflow.any():
            overflow &= ~np.isinf(wide)
            if nulls is not None:
                overflow &= ~nulls
            out_of_range = overflow if overflow.any() else None
    if nulls is not None:
        arr = np.where(nulls, np.float32(0), arr)
    return _Floats(arr, nulls, non_numeric, out_of_range, wide if out_of_range is not None else None)


def _describe(value: float) -> str:
    return "nan" if np.isnan(value) else ("inf" if value > 0 else "-inf")


def _out_of_range(where: str, value: float) -> str:
    return f"out-of-range feature: {where} = {value:g} (beyond float32)"


def _scalar_columns(batch: pa.RecordBatch | pa.Table, columns: tuple[str, ...]) -> Features:
    n = batch.num_rows
    mats = []
    reasons: list[str | None] | None = None
    bad_rows = np.zeros(n, dtype=bool)
    for name in columns:
        col = _column(batch, name)
        floats = _to_float(col)
        arr, nulls, non_numeric, too_big = (
            floats.values,
            floats.nulls,
            floats.non_numeric,
            floats.out_of_range,
        )
        nonfinite = ~np.isfinite(arr)
        for m in (nulls, non_numeric, too_big):
            if m is not None:
                nonfinite &= ~m
        kinds = ((nulls, "null"), (non_numeric, "non-numeric"), (too_big, "range"), (nonfinite, "non-finite"))
        for mask, kind in kinds:
            if mask is None or not mask.any():
                continue
            new = mask & ~bad_rows
            if not new.any():
                continue
            if reasons is None:
                reasons = [None] * n
            raw = col.to_pylist() if kind == "non-numeric" else None
            for i in np.flatnonzero(new):
                if kind == "null":
                    reasons[i] = f"null feature: {name!r}"
                elif kind == "non-numeric":
                    reasons[i] = f"non-numeric feature: {name!r} = {raw[i]!r}"  # type: ignore[index]
                elif kind == "range":
                    reasons[i] = _out_of_range(repr(name), floats.wide[i])  # type: ignore[index]
                else:
                    reasons[i] = f"non-finite feature: {name!r} = {_describe(arr[i])}"
            bad_rows |= new
        mats.append(arr)
    matrix = np.column_stack(mats) if len(mats) > 1 else mats[0].reshape(n, 1)
    valid = ~bad_rows
    if reasons is not None:
        matrix = matrix[valid]
    return Features(np.ascontiguousarray(matrix, dtype=np.float32), valid, reasons)


def _array_column(batch: pa.RecordBatch | pa.Table, name: str, d: int) -> Features:
    col = _column(batch, name)
    n = len(col)
    if pa.types.is_fixed_size_list(col.type):
        size = col.type.list_size
        offsets = (np.arange(n + 1, dtype=np.int64) + col.offset) * size
    else:
        offsets = np.asarray(col.offsets, dtype=np.int64)
    base, end = int(offsets[0]), int(offsets[-1])
    flat_values = col.values.slice(base, end - base)
    rel = offsets - base
    lengths = np.diff(rel)
    list_null = np.asarray(col.is_null(), dtype=bool) if col.null_count else None
    floats = _to_float(flat_values)
    flat, elem_null, elem_non_numeric, elem_big = (
        floats.values,
        floats.nulls,
        floats.non_numeric,
        floats.out_of_range,
    )

    clean = (
        list_null is None
        and elem_null is None
        and elem_non_numeric is None
        and elem_big is None
        and bool((lengths == d).all())
    )
    if clean:
        matrix = flat.reshape(n, d)
        finite = np.isfinite(matrix).all(axis=1)
        if finite.all():
            return Features(matrix, np.ones(n, dtype=bool), None)

    def per_row(mask: np.ndarray | None) -> np.ndarray:
        if mask is None:
            return np.zeros(n, dtype=bool)
        cs = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
        return (cs[rel[1:]] - cs[rel[:-1]]) > 0

    nonfinite_elems = ~np.isfinite(flat)
    for m in (elem_null, elem_non_numeric, elem_big):
        if m is not None:
            nonfinite_elems &= ~m
    is_null_list = list_null if list_null is not None else np.zeros(n, dtype=bool)
    wrong_len = ~is_null_list & (lengths != d)
    has_null = ~is_null_list & ~wrong_len & per_row(elem_null)
    has_text = ~is_null_list & ~wrong_len & ~has_null & per_row(elem_non_numeric)
    has_big = ~is_null_list & ~wrong_len & ~has_null & ~has_text & per_row(elem_big)
    has_nonfinite = ~is_null_list & ~wrong_len & ~has_null & ~has_text & ~has_big & per_row(nonfinite_elems)
    bad = is_null_list | wrong_len | has_null | has_text | has_big | has_nonfinite
    valid = ~bad

    reasons: list[str | None] = [None] * n
    raw = None
    for i in np.flatnonzero(bad):
        start, stop = rel[i], rel[i + 1]
        if is_null_list[i]:
            reasons[i] = f"null feature: {name!r}"
        elif wrong_len[i]:
            reasons[i] = f"wrong length: expected {d} features, got {lengths[i]}"
        elif has_null[i]:
            j = int(np.flatnonzero(elem_null[start:stop])[0])  # type: ignore[index]
            reasons[i] = f"null feature: {name}[{j}]"
        elif has_text[i]:
            j = int(np.flatnonzero(elem_non_numeric[start:stop])[0])  # type: ignore[index]
            raw = raw if raw is not None else flat_values.to_pylist()
            reasons[i] = f"non-numeric feature: {name}[{j}] = {raw[start + j]!r}"
        elif has_big[i]:
            j = int(np.flatnonzero(elem_big[start:stop])[0])  # type: ignore[index]
            reasons[i] = _out_of_range(f"{name}[{j}]", floats.wide[start + j])  # type: ignore[index]
        else:
            j = int(np.flatnonzero(nonfinite_elems[start:stop])[0])
            reasons[i] = f"non-finite feature: {name}[{j}] = {_describe(flat[start + j])}"

    good = np.flatnonzero(valid)
    idx = rel[:-1][good][:, None] + np.arange(d, dtype=np.int64)
    matrix = flat[idx] if len(good) else np.empty((0, d), dtype=np.float32)
    return Features(np.ascontiguousarray(matrix, dtype=np.float32), valid, reasons)


def extract_features(
    batch: pa.RecordBatch | pa.Table, input_columns: tuple[str, ...], num_features: int | None
) -> Features:
    """Split a batch into a float32 matrix of good rows and a reason for each bad row."""
    first = batch.schema.field(input_columns[0]).type
    if len(input_columns) == 1 and is_array_type(first):
        if num_features is None:
            raise ConfigError(
                f"input column {input_columns[0]!r} is an array: set num_features in [model] to its fixed length"
            )
        return _array_column(batch, input_columns[0], num_features)
    return _scalar_columns(batch, input_columns)
