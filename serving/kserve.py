"""The KServe v2 (Open Inference Protocol) wire format: request/response types, exact shape checks,
tensors to rows, rows to outputs (JSON or binary tensor data), and which method each route takes.

Pure functions of their arguments; :mod:`serving.app` calls them and speaks HTTP.

A tensor's shape is checked before anything is built from it: every dimension a non-negative
integer, at most :data:`MAX_RANK` of them, the first (rows) at most ``max_rows``, the inner ones
>= 1, and the exact (Python integer) product equal to the number of values sent. A shape cannot
make the server allocate or loop more than the body it came with.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import numpy as np

from serving.errors import BadRequest
from serving.model import ModelRunner, Row
from udfs.core import ERROR, MODEL_VERSION, PREDICTION, output_schema
from udfs.signature import V2_DATATYPE
from udfs.spec import ResolvedModel


class V2Tensor(msgspec.Struct):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = None  # absent when the values come as binary data
    parameters: dict[str, Any] | None = None


class V2Output(msgspec.Struct):
    name: str
    parameters: dict[str, Any] | None = None


class V2Request(msgspec.Struct):
    inputs: list[V2Tensor]
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[V2Output] | None = None


# The model reads floats: these are the datatypes an input accepts (the metadata says so);
# an integer or boolean tensor is refused rather than silently converted.
V2_FLOAT = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
V2_BINARY_OUT = {"FP64": "<f8", "FP32": "<f4", "INT32": "<i4", "INT64": "<i8", "BOOL": "?"}
# A typed model's inputs ([[model.inputs]]) each take exactly their declared datatype.
V2_TYPED = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4", "BOOL": "?"}
MAX_RANK = 8  # tensor dimensions (this model reads [N] or [N, width])
ARROW_TO_V2 = {
    "double": "FP64",
    "float": "FP32",
    "int32": "INT32",
    "int64": "INT64",
    "bool": "BOOL",
    "string": "BYTES",
}


# -- routes ---------------------------------------------------------------------------


def allowed_method(parts: list[str], model: str) -> str | None:
    """The method a KServe v2 path takes (``parts``: the path split on '/'), or None for no such route.

    Used to answer a known path with the wrong method 405 (with ``Allow``) rather than 404.
    """
    if parts == ["v2"] or parts in (["v2", "health", "live"], ["v2", "health", "ready"]):
        return "GET"
    if parts[:2] == ["v2", "repository"]:
        rest = parts[2:]
        if rest == ["index"] or (len(rest) == 3 and rest[0] == "models" and rest[2] in ("load", "unload")):
            return "POST"
        return None
    if len(parts) >= 3 and parts[1] == "models" and parts[2] == model:
        rest = parts[3:]
        if rest[:1] == ["versions"] and len(rest) >= 2:
            rest = rest[2:]
        if rest in ([], ["ready"]):
            return "GET"
        if rest == ["infer"]:
            return "POST"
    return None


# -- shapes and rows --------------------------------------------------------------------


def tensor_size(t: V2Tensor, max_rows: int) -> int:
    """The exact element count of ``t``'s shape, after checking the shape is one a request may send."""
    shape = t.shape
    if len(shape) > MAX_RANK or any(isinstance(d, bool) or d < 0 for d in shape):
        raise BadRequest(f"inputs[{t.name}].shape: {shape} has a negative dimension or more than {MAX_RANK}")
    if not shape:
        return 1
    if shape[0] > max_rows:
        raise BadRequest(
            f"inputs[{t.name}].shape: {shape} asks for {shape[0]} rows; at most {max_rows} rows per request"
        )
    if any(d < 1 for d in shape[1:]):
        raise BadRequest(f"inputs[{t.name}].shape: {shape} has an inner dimension below 1")
    return math.prod(shape)  # Python integers: no silent int64 overflow


def rows_from_request(
    runner: ModelRunner, req: V2Request, binary: memoryview | None, max_rows: int
) -> list[Row]:
    """Rows in input-column order from named tensors (or one [N, width] tensor).

    Values come from ``data`` (flat or nested to the tensor's rank) or, with the binary
    tensor data extension, from ``binary`` in input order (``parameters.binary_data_size``).
    """
    if runner.signature is not None:
        return typed_rows(runner, req, binary, max_rows)
    cols = runner.columns
    tensors: dict[str, tuple[list[int], list[Any]]] = {}
    offset = 0
    for t in req.inputs:
        if t.datatype not in V2_FLOAT:
            raise BadRequest(
                f"inputs[{t.name}].datatype: {t.datatype!r} is not accepted; "
                f"this model reads floats: {', '.join(sorted(V2_FLOAT))}"
            )
        size = tensor_size(t, max_rows)
        nbytes = (t.parameters or {}).get("binary_data_size")
        if nbytes is not None:
            if binary is None or t.data is not None:
                raise BadRequest(
                    f"inputs[{t.name}]: binary_data_size needs the Inference-Header-Content-Length "
                    "header and no data field"
                )
            itemsize = np.dtype(V2_FLOAT[t.datatype]).itemsize
            if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes != size * itemsize:
                raise BadRequest(
                    f"inputs[{t.name}]: shape {t.shape} of {t.datatype} needs {size * itemsize} bytes, "
                    f"binary_data_size says {nbytes!r}"
                )
            chunk = binary[offset : offset + nbytes]
            if len(chunk) != nbytes:
                raise BadRequest(f"inputs[{t.name}]: the body ends before its {nbytes} bytes of binary data")
            offset += nbytes
            flat = np.frombuffer(chunk, dtype=V2_FLOAT[t.datatype]).astype(np.float64).tolist()
        else:
            if t.data is None:
                raise BadRequest(f"inputs[{t.name}]: no data (and no parameters.binary_data_size)")
            flat = flatten(t.data, max(1, len(t.shape)), t.name)
            if size != len(flat):
                raise BadRequest(f"inputs[{t.name}]: shape {t.shape} needs {size} values, got {len(flat)}")
            for v in flat:
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise BadRequest(f"inputs[{t.name}].data: expected numbers, got {v!r}")
        tensors[t.name] = (t.shape, flat)
    if binary is not None and offset != len(binary):
        raise BadRequest(f"the body has {len(binary) - offset} bytes of binary data that no input claims")
    if runner.array_layout or (len(tensors) == 1 and set(tensors) - set(cols)):
        if len(tensors) != 1:
            raise BadRequest(f"inputs: expected one tensor {cols[0]!r} of shape [N, {runner.width}]")
        ((name, (shape, flat)),) = tensors.items()
        if len(shape) != 2:
            raise BadRequest(f"inputs[{name}]: expected shape [N, {runner.width}], got {shape}")
        n, d = shape
        if runner.array_layout:
            return [(flat[i * d : (i + 1) * d],) for i in range(n)]
        if d != len(cols):
            raise BadRequest(f"inputs[{name}]: expected {len(cols)} columns ({', '.join(cols)}), got {d}")
        return [tuple(flat[i * d : (i + 1) * d]) for i in range(n)]
    missing = [c for c in cols if c not in tensors]
    unknown = sorted(set(tensors) - set(cols))
    if missing or unknown:
        raise BadRequest(f"inputs: missing {missing}, unknown {unknown}; the model reads {list(cols)}")
    lengths = {c: len(tensors[c][1]) for c in cols}
    if len(set(lengths.values())) != 1:
        raise BadRequest(f"inputs: every input needs the same number of rows, got {lengths}")
    columns = [tensors[c][1] for c in cols]
    return list(zip(*columns, strict=True))


def typed_rows(runner: ModelRunner, req: V2Request, binary: memoryview | None, max_rows: int) -> list[Row]:
    """Rows (one value per data column) from a typed model's named tensors, each of its input's own
    datatype and shape ``[N, *shape]`` (a variable dimension: any length, the same for the N rows of
    one tensor). A missing or unknown input, another datatype or shape is a 400 naming the input."""
    sig = runner.signature
    assert sig is not None
    fed = {spec.name: spec for spec in sig.fed}
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for t in req.inputs:
        spec = fed.get(t.name)
        if spec is None:
            raise BadRequest(f"inputs[{t.name}]: unknown input; the model takes {list(fed)}", status=400)
        want = V2_DATATYPE[spec.dtype]
        if t.datatype != want:
            raise BadRequest(
                f"inputs[{t.name}].datatype: {t.datatype!r}, but input {t.name!r} is {want}", status=400
            )
        dims = sig.dims(spec)
        if spec.columns and len(spec.columns) == 1 and len(t.shape) == 1:
            dims = ()
        if len(t.shape) != len(dims) + 1 or any(
            d not in (-1, s) for d, s in zip(dims, t.shape[1:], strict=False)
        ):
            shape = "[N" + "".join(", " + ("L" if d == -1 else str(d)) for d in dims) + "]"
            raise BadRequest(
                f"inputs[{t.name}].shape: {t.shape}, but input {t.name!r} takes {shape}", status=400
            )
        size = tensor_size(t, max_rows)
        dtype = np.dtype(V2_TYPED[want])
        nbytes = (t.parameters or {}).get("binary_data_size")
        if nbytes is not None:
            if binary is None or t.data is not None:
                raise BadRequest(
                    f"inputs[{t.name}]: binary_data_size needs the Inference-Header-Content-Length "
                    "header and no data field",
                    status=400,
                )
            if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes != size * dtype.itemsize:
                raise BadRequest(
                    f"inputs[{t.name}]: shape {t.shape} of {want} needs {size * dtype.itemsize} bytes, "
                    f"binary_data_size says {nbytes!r}",
                    status=400,
                )
            chunk = binary[offset : offset + nbytes]
            if len(chunk) != nbytes:
                raise BadRequest(
                    f"inputs[{t.name}]: the body ends before its {nbytes} bytes of binary data", status=400
                )
            offset += nbytes
            arr = np.frombuffer(chunk, dtype=dtype)
        else:
            if t.data is None:
                raise BadRequest(
                    f"inputs[{t.name}]: no data (and no parameters.binary_data_size)", status=400
                )
            flat = flatten(t.data, max(1, len(t.shape)), t.name)
            if size != len(flat):
                raise BadRequest(
                    f"inputs[{t.name}]: shape {t.shape} needs {size} values, got {len(flat)}", status=400
                )
            ints = want in ("INT64", "INT32")
            for v in flat:
                ok = (
                    isinstance(v, bool)
                    if want == "BOOL"
                    else (
                        isinstance(v, int) and not isinstance(v, bool)
                        if ints
                        else isinstance(v, (int, float)) and not isinstance(v, bool)
                    )
                )
                if not ok:
                    raise BadRequest(f"inputs[{t.name}].data: {v!r} is not a {want} value", status=400)
            try:
                arr = np.asarray(flat, dtype=dtype)
            except OverflowError:
                raise BadRequest(f"inputs[{t.name}].data: a value does not fit {want}", status=400) from None
        tensors[t.name] = arr.reshape(t.shape)
    if binary is not None and offset != len(binary):
        raise BadRequest(
            f"the body has {len(binary) - offset} bytes of binary data that no input claims", status=400
        )
    missing = [n for n in fed if n not in tensors]
    if missing:
        raise BadRequest(f"inputs[{missing[0]}]: missing; the model takes {list(fed)}", status=400)
    counts = {n: a.shape[0] for n, a in tensors.items()}
    if len(set(counts.values())) != 1:
        raise BadRequest(f"inputs: every input needs the same number of rows, got {counts}", status=400)
    n = next(iter(counts.values()))
    per_input = []
    for spec in sig.fed:
        a = tensors[spec.name]
        if spec.columns:
            per_input.append(a.reshape(n, -1).tolist())
        else:
            per_input.append(a.tolist())
    rows = []
    for i in range(n):
        row: list[Any] = []
        for spec, values in zip(sig.fed, per_input, strict=True):
            if spec.columns:
                row.extend(values[i])
            else:
                row.append(values[i])
        rows.append(tuple(row))
    return rows


def flatten(data: list[Any], rank: int, name: str) -> list[Any]:
    """Row-major values of a tensor given flat or nested up to ``rank`` levels (deeper is a 422)."""
    if not any(isinstance(v, list) for v in data):
        return data
    if rank <= 1:
        raise BadRequest(f"{name}: data is nested deeper than the tensor's {rank} dimension(s)")
    out: list[Any] = []
    for v in data:
        if isinstance(v, list):
            out.extend(flatten(v, rank - 1, name))
        else:
            out.append(v)
    return out


# -- outputs and metadata ---------------------------------------------------------------


def output_fields(model: ResolvedModel) -> list[tuple[str, Any]]:
    """(output name, Arrow type) of every output a request may ask for."""
    return [
        ("score" if f.name == PREDICTION else f.name, f.type)
        for f in output_schema(model)
        if f.name not in (ERROR, MODEL_VERSION)
    ]


def outputs_of(
    req: V2Request, fields: list[tuple[str, Any]], results: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[bytes]]:
    """The outputs asked for (all by default) and their binary chunks, in order.

    An output is binary when its own ``parameters.binary_data`` says so, else when the request's
    ``parameters.binary_data_output`` does.
    """
    n = len(results)
    all_binary = bool((req.parameters or {}).get("binary_data_output", False))
    wanted: dict[str, bool] | None = None
    if req.outputs:
        wanted = {o.name: bool((o.parameters or {}).get("binary_data", all_binary)) for o in req.outputs}
        unknown = sorted(set(wanted) - {name for name, _ in fields})
        if unknown:
            raise BadRequest(f"outputs: unknown {unknown}; this model has {[n for n, _ in fields]}")
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, t in fields:
        if wanted is not None and name not in wanted:
            continue
        values = [r.get(name) for r in results]
        if hasattr(t, "value_type"):
            k = len(values[0]) if values and values[0] is not None else 0
            dtype, shape, flat = ARROW_TO_V2[str(t.value_type)], [n, k], flatten(values, 2, name)
        else:
            dtype, shape, flat = ARROW_TO_V2.get(str(t), "BYTES"), [n], values
            if dtype == "BYTES":
                flat = ["" if v is None else str(v) for v in flat]
        out: dict[str, Any] = {"name": name, "datatype": dtype, "shape": shape}
        if wanted[name] if wanted is not None else all_binary:
            data = to_binary(flat, dtype)
            out["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            out["data"] = flat
        outputs.append(out)
    return outputs, chunks


def to_binary(values: list[Any], dtype: str) -> bytes:
    """Tensor values in the binary tensor data encoding (little-endian; BYTES length-prefixed)."""
    if dtype == "BYTES":
        parts = []
        for v in values:
            b = str(v).encode()
            parts.append(len(b).to_bytes(4, "little") + b)
        return b"".join(parts)
    return np.asarray([0 if v is None else v for v in values], dtype=V2_BINARY_OUT[dtype]).tobytes()


def metadata(
    name: str, versions: list[str], runner: ModelRunner, fields: list[tuple[str, Any]]
) -> dict[str, Any]:
    """``GET /v2/models/{name}``: inputs (with the datatypes accepted), outputs, versions."""
    model = runner.model
    accepted = {"accepted_datatypes": sorted(V2_FLOAT)}
    sig = runner.signature
    inputs: list[dict[str, Any]]
    if sig is not None:
        inputs = [
            {"name": spec.name, "datatype": V2_DATATYPE[spec.dtype], "shape": [-1, *sig.dims(spec)]}
            for spec in sig.fed
        ]
    elif runner.array_layout:
        inputs = [
            {
                "name": runner.columns[0],
                "datatype": "FP32",
                "shape": [-1, runner.width],
                "parameters": accepted,
            }
        ]
    else:
        inputs = [
            {"name": c, "datatype": "FP64", "shape": [-1], "parameters": accepted} for c in runner.columns
        ]
    outputs = []
    for out, t in fields:
        if hasattr(t, "value_type"):
            outputs.append({"name": out, "datatype": ARROW_TO_V2[str(t.value_type)], "shape": [-1, -1]})
        else:
            outputs.append({"name": out, "datatype": ARROW_TO_V2.get(str(t), "BYTES"), "shape": [-1]})
    return {
        "name": name,
        "versions": versions,
        "platform": f"pytorch_{model.format}",
        "inputs": inputs,
        "outputs": outputs,
    }
