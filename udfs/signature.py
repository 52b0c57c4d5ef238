"""A model's signature: its named, typed inputs and outputs, and the decoders every path shares.

``[[model.inputs]]`` and ``[[model.outputs]]`` in a config become :class:`InputSpec` and
:class:`OutputSpec`; the old ``input_columns`` / ``num_features`` stay as the one-input
shorthand (a float32 matrix, read by :mod:`udfs.features`). Each path brings its wire
format to the same place: :func:`decode_arrow` turns Arrow columns (Spark's batches, the
stream job's parsed events, the real-time scorer's requests, which arrive as Arrow columns
too) into :class:`Decoded`: one numpy array per input for the good rows, and one reason per
bad row. The reasons are the same strings on every path, which the parity tests compare.

Checks before the model, per row: nulls, a fixed length that does not match, a sequence
longer than ``max_length`` (or empty), a value that does not fit the dtype (3.5 for an
int64 input, 300 for a bool), non-finite floats, and ids outside ``range`` (or outside the
embedding table an input names, read from the model file).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from udfs.errors import ColumnTypeError, MissingColumnsError

DType = Literal["float32", "float64", "int64", "int32", "bool"]
OutputKind = Literal["score", "probabilities", "label", "vector"]
Activation = Literal["none", "sigmoid", "softmax"]

NUMPY = {
    "float32": np.float32,
    "float64": np.float64,
    "int64": np.int64,
    "int32": np.int32,
    "bool": np.bool_,
}
# KServe v2 datatypes of each dtype (and back).
V2_DATATYPE = {"float32": "FP32", "float64": "FP64", "int64": "INT64", "int32": "INT32", "bool": "BOOL"}
INT_LIMITS = {"int64": (-(2**63), 2**63 - 1), "int32": (-(2**31), 2**31 - 1)}


@dataclass(frozen=True)
class InputSpec:
    """One model input (``[[model.inputs]]``).

    ``columns`` (several scalar columns, one value each) or ``column`` (one column: a scalar,
    an ``array<...>`` or a nested ``array<array<...>>``), or ``mask_of`` (generated: 1 where the
    named variable-length input has a value, 0 on padding). ``shape`` is without the batch
    dimension; ``-1`` as the first dimension makes a variable-length input, padded with ``pad``
    to the longest row of each micro-batch. ``range = [lo, hi]`` bounds ids (``lo <= id < hi``);
    ``embedding`` names the model's embedding table(s) whose sizes bound them instead (one name,
    or one per position of the last dimension).
    """

    name: str
    columns: tuple[str, ...] = ()
    column: str | None = None
    dtype: DType = "float32"
    shape: tuple[int, ...] | None = None
    pad: float = 0
    mask_of: str | None = None
    max_length: int | None = None
    range: tuple[float, ...] = ()
    embedding: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        where = f"input {self.name!r}"
        if not self.name:
            raise ValueError("every [[model.inputs]] needs a name")
        given = sum([bool(self.columns), self.column is not None, self.mask_of is not None])
        if given != 1:
            raise ValueError(
                f"{where}: give exactly one of columns (scalar columns), column (one column) or mask_of"
            )
        if len(set(self.columns)) != len(self.columns):
            raise ValueError(f"{where}: columns has duplicates: {list(self.columns)}")
        shape = self.shape
        if shape is not None and (any(d == 0 or d < -1 for d in shape) or -1 in shape[1:]):
            raise ValueError(
                f"{where}: shape {list(shape)} must hold sizes >= 1, with -1 only as the first "
                "dimension (a variable length)"
            )
        if self.columns and shape is not None and (math.prod(shape) != len(self.columns) or -1 in shape):
            raise ValueError(
                f"{where}: shape {list(shape or ())} does not hold its {len(self.columns)} columns; "
                f"drop shape or set it to [{len(self.columns)}]"
            )
        if self.column is not None and shape is None:
            raise ValueError(f"{where}: set shape (e.g. [13], [-1] or [4, 8]; [] for a scalar column)")
        if self.mask_of is not None and (self.shape is not None or self.range or self.embedding):
            raise ValueError(
                f"{where}: a mask takes its shape from {self.mask_of!r}; drop shape/range/embedding"
            )
        if self.max_length is not None and not (shape and shape[0] == -1):
            raise ValueError(f"{where}: max_length applies to a variable-length input (shape [-1, ...])")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"{where}: max_length must be >= 1")
        if self.range:
            if len(self.range) != 2 or not self.range[0] < self.range[1]:
                raise ValueError(f"{where}: range must be [lo, hi] with lo < hi, got {list(self.range)}")
            if self.dtype not in ("int64", "int32"):
                raise ValueError(f"{where}: range bounds ids; it applies to int64/int32 inputs")
        if self.embedding is not None and self.dtype not in ("int64", "int32"):
            raise ValueError(f"{where}: embedding bounds ids; it applies to int64/int32 inputs")
        if self.embedding is not None and self.range:
            raise ValueError(f"{where}: give range or embedding, not both")

    @property
    def dims(self) -> tuple[int, ...]:
        """The per-row shape (a mask's is resolved by :class:`Signature`)."""
        if self.shape is not None:
            return self.shape
        return (len(self.columns),) if self.columns else ()

    @property
    def variable(self) -> bool:
        return bool(self.dims) and self.dims[0] == -1

    @property
    def source_columns(self) -> tuple[str, ...]:
        if self.column is not None:
            return (self.column,)
        return self.columns

    @property
    def np_dtype(self) -> Any:
        return NUMPY[self.dtype]


@dataclass(frozen=True)
class OutputSpec:
    """One prediction output (``[[model.outputs]]``).

    ``kind``: ``score`` (one double per row), ``probabilities`` (``array<float>``), ``label``
    (the argmax, int), ``vector`` (``array<float>``, e.g. an embedding). ``source`` picks the
    model's output: its name (a dict output, an ONNX output name) or its position (default:
    this output's position among the outputs). ``index`` takes one column of it as a score.
    """

    name: str
    kind: OutputKind = "score"
    source: str | int | None = None
    index: int | None = None
    activation: Activation = "none"

    def __post_init__(self) -> None:
        where = f"output {self.name!r}"
        if not self.name:
            raise ValueError("every [[model.outputs]] needs a name")
        if self.index is not None and self.kind != "score":
            raise ValueError(f"{where}: index takes one class's value as a score; set kind = 'score'")
        if self.index is not None and self.index < 0:
            raise ValueError(f"{where}: index must be >= 0")
        if self.kind == "score" and self.activation == "softmax" and self.index is None:
            raise ValueError(
                f"{where}: softmax over one score makes every prediction 1.0; use sigmoid, or "
                "kind = 'probabilities', or index to take one class's probability"
            )


@dataclass(frozen=True)
class Signature:
    """The inputs and outputs of a model, checked against each other."""

    inputs: tuple[InputSpec, ...]
    outputs: tuple[OutputSpec, ...]
    call: Literal["positional", "keyword"] = "positional"

    def __post_init__(self) -> None:
        names = [i.name for i in self.inputs] + [o.name for o in self.outputs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"input and output names must be unique, got {dupes} more than once")
        by_name = {i.name: i for i in self.inputs}
        for i in self.inputs:
            if i.mask_of is not None:
                target = by_name.get(i.mask_of)
                if target is None or not target.variable:
                    raise ValueError(
                        f"input {i.name!r}: mask_of = {i.mask_of!r} must name a variable-length input "
                        "(shape [-1, ...])"
                    )
        cols = [c for i in self.inputs for c in i.source_columns]
        dupes = sorted({c for c in cols if cols.count(c) > 1})
        if dupes:
            raise ValueError(f"column(s) {dupes} feed more than one input")

    @property
    def columns(self) -> tuple[str, ...]:
        """Every data column the inputs read, in order."""
        return tuple(c for i in self.inputs for c in i.source_columns)

    @property
    def fed(self) -> tuple[InputSpec, ...]:
        """The inputs read from data (not generated masks)."""
        return tuple(i for i in self.inputs if i.mask_of is None)

    def dims(self, spec: InputSpec) -> tuple[int, ...]:
        if spec.mask_of is not None:
            return self.input(spec.mask_of).dims[:1]
        return spec.dims

    def input(self, name: str) -> InputSpec:
        for i in self.inputs:
            if i.name == name:
                return i
        raise KeyError(name)


# --- decoding ------------------------------------------------------------------------------------


@dataclass
class Ragged:
    """A variable-length input's good rows: values concatenated, row ``r`` is ``values[offsets[r]:offsets[r+1]]``
    (in units of the first dimension; ``inner`` is the fixed rest of the shape)."""

    values: np.ndarray
    offsets: np.ndarray
    inner: tuple[int, ...]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1


@dataclass
class Decoded:
    """Typed inputs for the good rows, and why each bad row was left out."""

    inputs: dict[str, np.ndarray | Ragged]
    valid: np.ndarray  # bool (rows,)
    errors: list[str | None] | None

    @property
    def num_rows(self) -> int:
        return len(self.valid)

    @property
    def num_good(self) -> int:
        return int(self.valid.sum())


def _column(batch: pa.RecordBatch | pa.Table, name: str) -> pa.Array:
    col = batch.column(name)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _leaf_type(t: pa.DataType) -> tuple[pa.DataType, int]:
    depth = 0
    while _is_list(t):
        t = t.value_type
        depth += 1
    return t, depth


def _numeric(t: pa.DataType) -> bool:
    return (
        pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)
    )


def check_schema(schema: pa.Schema, sig: Signature) -> None:
    """Fail before scoring when the data cannot feed the inputs (names, types, nesting)."""
    missing = [c for c in sig.columns if c not in schema.names]
    if missing:
        raise MissingColumnsError(missing, list(schema.names))
    for spec in sig.fed:
        for c in spec.source_columns:
            t = schema.field(c).type
            leaf, depth = _leaf_type(t)
            if not _numeric(leaf):
                raise ColumnTypeError(
                    f"column {c!r} of input {spec.name!r} holds {leaf}; it must hold numbers ({spec.dtype})"
                )
            want = len(spec.dims) if spec.column is not None else 0
            if depth != want:
                if want == 0:
                    raise ColumnTypeError(
                        f"column {c!r} of input {spec.name!r} is {t}, but columns lists scalar columns; "
                        "name an array column with column = ... and a shape"
                    )
                raise ColumnTypeError(
                    f"column {c!r} of input {spec.name!r} is {t} ({depth} array levels), but its shape "
                    f"{list(spec.dims)} needs {want}"
                )


def _offsets(col: pa.Array) -> np.ndarray:
    n = len(col)
    if pa.types.is_fixed_size_list(col.type):
        size = col.type.list_size
        return (np.arange(n + 1, dtype=np.int64) + col.offset) * size
    return np.asarray(col.offsets, dtype=np.int64)


@dataclass
class _Leaves:
    """The leaf values of a column: per row, where its leaves are, and what is wrong with it."""

    values: pa.Array  # flat leaves
    row_offsets: np.ndarray  # (rows+1,) leaf offsets per row
    first_len: np.ndarray  # (rows,) length of the first dimension
    reasons: dict[int, str]


def _flatten(col: pa.Array, dims: tuple[int, ...], label: str) -> _Leaves:
    """Walk the list levels of ``col`` down to its leaves, checking every fixed length on the way."""
    n = len(col)
    reasons: dict[int, str] = {}
    if not dims:
        if col.null_count:
            for i in np.flatnonzero(np.asarray(col.is_null(), dtype=bool)):
                reasons[int(i)] = f"null input: {label}"
        return _Leaves(col, np.arange(n + 1, dtype=np.int64), np.ones(n, np.int64), reasons)
    # row_of[k]: the row element k of the current level belongs to.
    row_of = np.arange(n, dtype=np.int64)
    level = col
    first_len = np.zeros(n, np.int64)
    for depth, d in enumerate(dims):
        offs = _offsets(level)
        base = int(offs[0])
        lengths = np.diff(offs)
        nulls = np.asarray(level.is_null(), dtype=bool) if level.null_count else None
        if nulls is not None:
            for k in np.flatnonzero(nulls):
                r = int(row_of[k])
                reasons.setdefault(r, f"null input: {label}" if depth == 0 else f"null value in {label}")
            lengths = np.where(nulls, 0, lengths)
        if depth == 0:
            first_len = lengths.copy()
            if d == -1:
                empty = lengths == 0 if nulls is None else (lengths == 0) & ~nulls
                for r in np.flatnonzero(empty).tolist():
                    reasons.setdefault(int(r), f"empty sequence: {label}")
            else:
                for r in np.flatnonzero(lengths != d).tolist():
                    if nulls is None or not nulls[r]:
                        reasons.setdefault(
                            int(r), f"wrong shape: {label} expects {_shape(dims)}, got {lengths[r]} values"
                        )
        else:
            bad = lengths != d
            if nulls is not None:
                bad &= ~nulls
            for k in np.flatnonzero(bad):
                reasons.setdefault(
                    int(row_of[k]),
                    f"wrong shape: {label} expects {_shape(dims)}, got a row of {lengths[k]} values at depth {depth}",
                )
        # Next level: the values of this level, with each element's row.
        raw_offsets = offs - base
        values = level.values.slice(base, int(offs[-1]) - base)
        row_of = np.repeat(row_of, np.diff(raw_offsets))
        level = values
        if depth == 0:
            # leaf offsets per row at this level, refined below
            pass
    # Leaf offsets per row: count leaves per row.
    counts = np.bincount(row_of, minlength=n) if len(row_of) else np.zeros(n, np.int64)
    row_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return _Leaves(level, row_offsets, first_len, reasons)


def _shape(dims: tuple[int, ...]) -> str:
    return "[" + ", ".join("n" if d == -1 else str(d) for d in dims) + "]"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:g}"
    return str(v)


def _convert(values: pa.Array, dtype: str) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Leaves as ``dtype``, the mask of leaves that are bad, and the reason's wording."""
    t = values.type
    target = NUMPY[dtype]
    nulls = np.asarray(values.is_null(), dtype=bool) if values.null_count else None
    if pa.types.is_decimal(t):
        values = pc.cast(values, pa.float64())
        t = values.type
    if dtype in ("float32", "float64"):
        if pa.types.is_boolean(t):
            values = pc.cast(values, pa.float64())
        wide = values.to_numpy(zero_copy_only=False)
        with np.errstate(over="ignore", invalid="ignore"):
            arr = wide.astype(target, copy=False)
        bad = ~np.isfinite(arr)
        if nulls is not None:
            bad |= nulls
        return arr, bad if bad.any() else None, "non-finite value"
    if dtype == "bool":
        if pa.types.is_boolean(t):
            arr = values.to_numpy(zero_copy_only=False)
            arr = np.asarray(arr, dtype=object) if nulls is not None else arr
            bad = nulls
            arr = np.where(nulls, False, arr).astype(np.bool_) if nulls is not None else arr.astype(np.bool_)
            return arr, bad, "not a boolean"
        wide = values.to_numpy(zero_copy_only=False).astype(np.float64)
        bad = ~((wide == 0) | (wide == 1))
        if nulls is not None:
            bad |= nulls
        return (wide == 1), bad if bad.any() else None, "not a boolean (0 or 1)"
    lo, hi = INT_LIMITS[dtype]
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        if pa.types.is_uint64(t):
            big = np.asarray(pc.greater(values, pa.scalar(hi, pa.uint64())).fill_null(False), dtype=bool)
            values = pc.if_else(pc.greater(values, pa.scalar(hi, pa.uint64())), 0, values).cast(pa.int64())
        else:
            big = None
            values = values.cast(pa.int64()) if not pa.types.is_int64(t) else values
        arr64 = values.fill_null(0).to_numpy(zero_copy_only=False)
        bad = (arr64 < lo) | (arr64 > hi)
        if big is not None:
            bad |= big
        if nulls is not None:
            bad |= nulls
        return arr64.astype(target), bad if bad.any() else None, f"out of range for {dtype}"
    wide = values.to_numpy(zero_copy_only=False).astype(np.float64)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(wide) | (np.floor(wide) != wide) | (wide < lo) | (wide >= float(hi) + 1)
    if nulls is not None:
        bad |= nulls
    arr = np.where(bad, 0, wide).astype(target)
    return arr, bad if bad.any() else None, f"not an {dtype} id"


def _clean_columns(batch: pa.RecordBatch | pa.Table, spec: InputSpec) -> np.ndarray | None:
    """Several scalar columns without nulls, all of the input's kind (floats for a float input, integers
    for an int one) and every value fine for the dtype: the flat row-major values in a few numpy
    operations. None when any of that does not hold (the per-column path then finds the reasons)."""
    if spec.dtype == "bool":
        return None
    cols = []
    for c in spec.columns:
        col = _column(batch, c)
        t = col.type
        if col.null_count or not (
            pa.types.is_floating(t) if spec.dtype.startswith("float") else pa.types.is_integer(t)
        ):
            return None
        if pa.types.is_uint64(t):
            return None
        cols.append(col.to_numpy(zero_copy_only=False))
    matrix = np.column_stack(cols) if len(cols) > 1 else cols[0].reshape(-1, 1)
    if spec.dtype.startswith("float"):
        with np.errstate(over="ignore", invalid="ignore"):
            out: np.ndarray = matrix.astype(NUMPY[spec.dtype], copy=False)
        if not np.isfinite(out).all():
            return None
        return out.reshape(-1)
    lo, hi = INT_LIMITS[spec.dtype]
    if spec.dtype == "int32" and matrix.size and (matrix.min() < lo or matrix.max() > hi):
        return None
    return matrix.astype(NUMPY[spec.dtype], copy=False).reshape(-1)


def decode_arrow(
    batch: pa.RecordBatch | pa.Table,
    sig: Signature,
    bounds: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> Decoded:
    """Decode every input of ``sig`` from ``batch``'s columns; ``bounds`` are id ranges by input name."""
    n = batch.num_rows
    bounds = bounds or {}
    reasons: dict[int, str] = {}
    leaves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for spec in sig.fed:
        label = spec.name
        fast = _clean_columns(batch, spec) if spec.columns else None
        if fast is not None:
            flat = fast
            offsets = np.arange(n + 1, dtype=np.int64) * len(spec.columns)
            first = np.full(n, len(spec.columns), np.int64)
        elif spec.columns:
            arrs = []
            for c in spec.columns:
                col = _column(batch, c)
                lv = _flatten(col, (), f"{label} ({c!r})")
                for r, why in lv.reasons.items():
                    reasons.setdefault(r, why)
                arr, bad, word = _convert(lv.values, spec.dtype)
                if bad is not None:
                    raw = None
                    for r in np.flatnonzero(bad).tolist():
                        if int(r) in reasons:
                            continue
                        raw = raw if raw is not None else col.to_pylist()
                        reasons[int(r)] = f"{word}: {label} ({c!r}) = {_fmt(raw[r])}"
                arrs.append(arr)
            flat = np.column_stack(arrs).reshape(-1) if arrs else np.empty(0, spec.np_dtype)
            offsets = np.arange(n + 1, dtype=np.int64) * len(spec.columns)
            first = np.full(n, len(spec.columns), np.int64)
            values_pa = None
        else:
            col = _column(batch, spec.column)  # type: ignore[arg-type]
            lv = _flatten(col, spec.dims, label)
            for r, why in lv.reasons.items():
                reasons.setdefault(r, why)
            flat, bad, word = _convert(lv.values, spec.dtype)
            offsets, first = lv.row_offsets, lv.first_len
            values_pa = lv.values
            if bad is not None:
                cs = np.concatenate([[0], np.cumsum(bad, dtype=np.int64)])
                row_bad = (cs[offsets[1:]] - cs[offsets[:-1]]) > 0
                raw = None
                for r in np.flatnonzero(row_bad).tolist():
                    if int(r) in reasons:
                        continue
                    j = int(np.flatnonzero(bad[offsets[r] : offsets[r + 1]])[0])
                    raw = raw if raw is not None else values_pa.to_pylist()
                    at = f"[{_index(spec.dims, first[r], j)}]" if spec.dims else ""
                    reasons[int(r)] = f"{word}: {label}{at} = {_fmt(raw[offsets[r] + j])}"
        if spec.variable and spec.max_length is not None:
            for r in np.flatnonzero(first > spec.max_length).tolist():
                reasons.setdefault(
                    int(r),
                    f"sequence too long: {label} has {first[r]} values, max_length is {spec.max_length}",
                )
        rng = bounds.get(spec.name)
        if rng is not None and len(flat):
            lo, hi = rng
            width = len(lo)
            if width == 1:
                oob = (flat < lo[0]) | (flat >= hi[0])
            else:
                counts = np.diff(offsets)
                pos = (np.arange(len(flat)) - np.repeat(offsets[:-1], counts)) % width
                oob = (flat < lo[pos]) | (flat >= hi[pos])
            if oob.any():
                cs = np.concatenate([[0], np.cumsum(oob, dtype=np.int64)])
                row_bad = (cs[offsets[1:]] - cs[offsets[:-1]]) > 0
                for r in np.flatnonzero(row_bad).tolist():
                    if int(r) in reasons:
                        continue
                    j = int(np.flatnonzero(oob[offsets[r] : offsets[r + 1]])[0])
                    k = j % width if width > 1 else 0
                    where = (
                        f"[{_index(spec.dims, first[r], j)}]"
                        if spec.column is not None
                        else f"[{spec.columns[j]!r}]"
                    )
                    where = where if spec.dims else ""
                    reasons[int(r)] = (
                        f"id out of range: {label}{where} = {int(flat[offsets[r] + j])}, "
                        f"expected {int(lo[k])} <= id < {int(hi[k])}"
                    )
        leaves[spec.name] = (flat, offsets, first)
    valid = np.ones(n, dtype=bool)
    errors: list[str | None] | None = None
    if reasons:
        errors = [None] * n
        for r, why in reasons.items():
            errors[r] = why
            valid[r] = False
    good = np.flatnonzero(valid)
    inputs: dict[str, np.ndarray | Ragged] = {}
    for spec in sig.fed:
        flat, offsets, first = leaves[spec.name]
        dims = spec.dims
        if spec.variable:
            inner = dims[1:]
            per = math.prod(inner) if inner else 1
            lengths = first[good]
            new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            idx = _gather_index(offsets[good], lengths * per)
            inputs[spec.name] = Ragged(flat[idx].reshape((-1, *inner)), new_offsets, inner)
        else:
            per = math.prod(dims) if dims else 1
            if len(good) == n:
                arr = (
                    flat.reshape((n, *dims))
                    if len(flat) == n * per
                    else flat[_gather_index(offsets[:-1], np.full(n, per))].reshape((n, *dims))
                )
            else:
                arr = flat[_gather_index(offsets[good], np.full(len(good), per))].reshape((len(good), *dims))
            inputs[spec.name] = arr
    return Decoded(inputs, valid, errors)


def _gather_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The flat indices of ``lengths[i]`` elements starting at ``starts[i]``, concatenated."""
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, np.int64)
    ends = np.cumsum(lengths)
    rep = np.repeat(starts - (ends - lengths), lengths)
    return np.arange(total, dtype=np.int64) + rep


def _index(dims: tuple[int, ...], first: int, j: int) -> str:
    """A flat leaf index as a (multi-)index: 7 in shape [4, 2] is 3, 1."""
    if len(dims) <= 1:
        return str(j)
    inner = dims[1:]
    idx = []
    for d in reversed(inner):
        idx.append(j % d)
        j //= d
    idx.append(j)
    return ", ".join(str(i) for i in reversed(idx))


def take(sig: Signature, decoded: dict[str, np.ndarray | Ragged], rows: np.ndarray) -> dict[str, np.ndarray]:
    """The model's input arrays for good rows ``rows``: variable-length inputs padded to the longest of
    these rows with their ``pad`` value, and the masks generated."""
    out: dict[str, np.ndarray] = {}
    lengths: dict[str, np.ndarray] = {}
    for spec in sig.fed:
        value = decoded[spec.name]
        if isinstance(value, Ragged):
            lens = value.lengths[rows]
            width = int(lens.max()) if len(lens) else 0
            padded = np.full((len(rows), width, *value.inner), spec.pad, dtype=spec.np_dtype)
            # Scatter each row's values into its padded row.
            starts = value.offsets[rows]
            src = _gather_index(starts, lens)
            row_idx = np.repeat(np.arange(len(rows)), lens)
            col_idx = np.arange(len(src)) - np.repeat(np.cumsum(lens) - lens, lens)
            padded[row_idx, col_idx] = value.values[src]
            out[spec.name] = padded
            lengths[spec.name] = lens
        else:
            out[spec.name] = np.ascontiguousarray(value[rows])
    for spec in sig.inputs:
        if spec.mask_of is not None:
            lens = lengths[spec.mask_of]
            width = out[spec.mask_of].shape[1]
            mask = np.arange(width)[None, :] < lens[:, None]
            out[spec.name] = mask.astype(spec.np_dtype)
    return {spec.name: out[spec.name] for spec in sig.inputs}


def lengths_of(sig: Signature, decoded: dict[str, np.ndarray | Ragged]) -> np.ndarray | None:
    """Per good row, the longest of its variable-length inputs (None when none is variable)."""
    longest = None
    for spec in sig.fed:
        value = decoded[spec.name]
        if isinstance(value, Ragged):
            lens = value.lengths
            longest = lens if longest is None else np.maximum(longest, lens)
    return longest


# --- the other wire formats: JSON values and KServe v2 tensors, into Arrow columns ---------------


def arrow_type(spec: InputSpec, dims: tuple[int, ...] | None = None) -> pa.DataType:
    """The Arrow type one column of ``spec`` carries (nested lists for each dimension)."""
    leaf = {
        "float32": pa.float64(),
        "float64": pa.float64(),
        "int64": pa.int64(),
        "int32": pa.int64(),
        "bool": pa.bool_(),
    }[spec.dtype]
    t = leaf
    for _ in spec.dims if spec.column is not None else ():
        t = pa.list_(t)
    return t


@dataclass(frozen=True)
class InputError(Exception):
    """A request's input cannot be decoded (a 400 in the real-time scorer); names the input."""

    input: str
    message: str = field(default="")

    def __str__(self) -> str:
        return self.message


def tensor_to_columns(spec: InputSpec, array: np.ndarray) -> dict[str, pa.Array]:
    """A KServe v2 tensor ``[batch, *shape]`` as the Arrow column(s) of ``spec``, values kept exactly."""
    n = array.shape[0] if array.ndim else 0
    if spec.columns:
        flat = array.reshape(n, -1)
        if flat.shape[1] != len(spec.columns):
            raise InputError(
                spec.name,
                f"input {spec.name!r} has shape {list(array.shape)}; it takes [batch, {len(spec.columns)}]",
            )
        return {c: pa.array(flat[:, j]) for j, c in enumerate(spec.columns)}
    dims = spec.dims
    if array.ndim != len(dims) + 1 or any(
        d != -1 and d != s for d, s in zip(dims, array.shape[1:], strict=True)
    ):
        raise InputError(
            spec.name,
            f"input {spec.name!r} has shape {list(array.shape)}; it takes [batch, {', '.join(str(d) for d in dims)}]",
        )
    values: pa.Array = pa.array(np.ascontiguousarray(array).reshape(-1))
    for d in reversed(array.shape[1:]):
        values = pa.FixedSizeListArray.from_arrays(values, d)
    return {spec.column: values}  # type: ignore[dict-item]


# --- rows in column order (the real-time scorer's micro-batches) ----------------------------------


def _depth_ok(v: Any, depth: int) -> bool:
    """Whether ``v`` is nested exactly ``depth`` list levels deep, with numbers / bools / None at the
    bottom (a None anywhere is a per-row reason later, not a structure error)."""
    if v is None:
        return True
    if depth == 0:
        return isinstance(v, (int, float, bool))
    return isinstance(v, list) and all(_depth_ok(x, depth - 1) for x in v)


def row_from_inputs(sig: Signature, inputs: dict[str, Any]) -> tuple[Any, ...]:
    """A ``{input name: value}`` object (a ``/predict`` instance's ``inputs``, a stream event) as one
    value per data column, in :attr:`Signature.columns` order. A missing or unknown input name, or a
    value of the wrong nesting, raises :class:`InputError` naming the input; value problems (3.5 for
    an id, a wrong length) are left to :func:`decode_arrow`, which gives them a per-row reason."""
    fed = sig.fed
    names = [s.name for s in fed]
    unknown = sorted(set(inputs) - set(names))
    if unknown:
        raise InputError(unknown[0], f"inputs: unknown input {unknown[0]!r}; the model takes {names}")
    missing = [n for n in names if n not in inputs]
    if missing:
        raise InputError(missing[0], f"inputs: missing input {missing[0]!r}; the model takes {names}")
    row: list[Any] = []
    for spec in fed:
        v = inputs[spec.name]
        if spec.columns:
            k = len(spec.columns)
            if k == 1 and _depth_ok(v, 0):
                row.append(v)
                continue
            if v is None:
                row.extend([None] * k)
                continue
            if not (isinstance(v, list) and len(v) == k and _depth_ok(v, 1)):
                raise InputError(
                    spec.name, f"inputs.{spec.name}: expected a list of {k} numbers, got {v!r}"[:300]
                )
            row.extend(v)
        else:
            depth = len(spec.dims)
            if not _depth_ok(v, depth):
                what = "a number" if depth == 0 else f"a list nested {depth} deep (shape {_shape(spec.dims)})"
                raise InputError(spec.name, f"inputs.{spec.name}: expected {what}, got {v!r}"[:300])
            row.append(v)
    return tuple(row)


def column_specs(sig: Signature) -> list[InputSpec]:
    """The input each data column feeds, in :attr:`Signature.columns` order."""
    return [spec for spec in sig.fed for _ in spec.source_columns]


def _nested(t: pa.DataType, depth: int) -> pa.DataType:
    for _ in range(depth):
        t = pa.list_(t)
    return t


def rows_to_batch(sig: Signature, rows: list[tuple[Any, ...]]) -> pa.RecordBatch:
    """Rows of column values (from :func:`row_from_inputs` or KServe v2 tensors) as an Arrow batch.

    An int input's column is int64 (exact ids) when every value is an integer, else float64 (so 3.5
    reaches :func:`decode_arrow` and gets its reason)."""
    arrays = []
    specs = column_specs(sig)
    j = 0
    while j < len(specs):
        spec = specs[j]
        if spec.columns and len(spec.columns) > 1:
            # Several scalar columns of one input: one numpy matrix, then a column per slice.
            k = len(spec.columns)
            block = _scalar_block([r[j : j + k] for r in rows], spec)
            if block is not None:
                arrays.extend(block)
                j += k
                continue
        values = [r[j] for r in rows]
        depth = len(spec.dims) if spec.column is not None else 0
        array = None
        if spec.dtype in ("int64", "int32") and _all_ints(values):
            try:
                array = pa.array(values, _nested(pa.int64(), depth))
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
                array = None
        elif spec.dtype == "bool":
            try:
                array = pa.array(values, _nested(pa.bool_(), depth))
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
                array = None
        if array is None:
            array = pa.array(_clean_floats(values), _nested(pa.float64(), depth))
        arrays.append(array)
        j += 1
    return pa.RecordBatch.from_arrays(arrays, names=list(sig.columns))


def _scalar_block(values: list[Any], spec: InputSpec) -> list[pa.Array] | None:
    """Rows of ``k`` scalar values as ``k`` Arrow columns through one numpy matrix: int64 when every
    value is an int (an int input), else float64; None when a value is None or not a plain number."""
    try:
        matrix = np.array(values)
    except (ValueError, OverflowError):
        return None
    kind = matrix.dtype.kind
    if matrix.ndim != 2 or kind not in "if" or (kind == "i" and matrix.dtype != np.int64):
        return None
    if kind == "i" and spec.dtype not in ("int64", "int32"):
        matrix = matrix.astype(np.float64)
    return [pa.array(matrix[:, i]) for i in range(matrix.shape[1])]


def _all_ints(values: list[Any]) -> bool:
    """Whether every leaf is an int or None (pyarrow truncates 3.5 to 3 in an int64 array)."""
    for v in values:
        if isinstance(v, list):
            if not _all_ints(v):
                return False
        elif v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            return False
    return True


def _clean_floats(values: list[Any]) -> list[Any]:
    def fix(v: Any) -> Any:
        if isinstance(v, list):
            return [fix(x) for x in v]
        if isinstance(v, bool):
            return float(v)
        if isinstance(v, int):
            return float(v)
        return v

    return [fix(v) for v in values]


def zero_row(sig: Signature) -> tuple[Any, ...]:
    """One valid row of the lowest ids and zeros (variable lengths of 1): the scorer's warm-up."""
    row: list[Any] = []
    for spec in column_specs(sig):
        value: Any = int(spec.range[0]) if spec.range else 0
        if spec.dtype == "bool":
            value = False
        if spec.column is not None:
            for d in reversed(spec.dims):
                value = [value] * (1 if d == -1 else d)
        row.append(value)
    return tuple(row)
