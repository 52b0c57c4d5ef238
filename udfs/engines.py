"""Calling a model with a typed signature, and reading the signature a model file declares.

TorchScript and ``torch.export`` programs are called positionally (in the order of
``[[model.inputs]]``) or by keyword (``call = "keyword"``); ONNX models by input name. A
model's outputs come back as :class:`Raw`: by position, and by name where the model names
them (a dict output, an ONNX graph's output names).

Where the file declares its inputs (an ONNX graph, a ``torch.export`` program), they are
checked against the config before any data is read: :func:`check_declared` raises one
sentence saying what the model expects. :func:`id_bounds` reads the sizes of the embedding
tables that ``embedding = ...`` names, so ids are range-checked before the model sees them
(on CUDA an out-of-range index is a device-side assert that leaves the process unusable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from udfs.errors import ModelLoadError
from udfs.onnx_engine import OnnxModel
from udfs.signature import InputSpec, Signature

ONNX_DTYPE = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(bool)": "bool",
}
TORCH_DTYPE = {
    "torch.float32": "float32",
    "torch.float64": "float64",
    "torch.int64": "int64",
    "torch.int32": "int32",
    "torch.bool": "bool",
}


@dataclass(frozen=True)
class Raw:
    """A model's outputs for one call: by position, and by name where it names them."""

    values: list[np.ndarray]
    names: list[str] | None = None

    def get(self, source: str | int, model: str) -> np.ndarray:
        if isinstance(source, int) or (isinstance(source, str) and source.isdigit()):
            i = int(source)
            if i >= len(self.values):
                raise ValueError(
                    f"model {model!r} returns {len(self.values)} output(s); an output reads position {i}"
                )
            return self.values[i]
        if self.names is None or source not in self.names:
            raise ValueError(
                f"model {model!r} has no output named {source!r}; its outputs are "
                f"{self.names if self.names else f'{len(self.values)} unnamed (use positions)'}"
            )
        return self.values[self.names.index(source)]


def _to_numpy(y: Any) -> np.ndarray:
    import torch

    if isinstance(y, torch.Tensor):
        y = y.detach().to("cpu")
        if y.dtype in (torch.float16, torch.bfloat16):
            y = y.float()
        return y.numpy()
    return np.asarray(y)


def call_torch(module: Any, arrays: dict[str, np.ndarray], sig: Signature, device: str) -> Raw:
    """One call of a torch module on ``arrays`` (by input name); each array is copied, so a model that
    writes into its input never changes the caller's data or another member's input."""
    import torch

    with torch.inference_mode():
        # On CPU a tensor shares the array's memory: each call gets its own copy.
        tensors = {
            name: torch.from_numpy(a.copy() if device == "cpu" else a).to(device)
            for name, a in arrays.items()
        }
        y = module(**tensors) if sig.call == "keyword" else module(*(tensors[i.name] for i in sig.inputs))
        if isinstance(y, dict):
            return Raw([_to_numpy(v) for v in y.values()], [str(k) for k in y])
        if isinstance(y, (tuple, list)):
            return Raw([_to_numpy(v) for v in y])
        return Raw([_to_numpy(y)])


def call_onnx(model: OnnxModel, arrays: dict[str, np.ndarray]) -> Raw:
    """One call of an ONNX session, every input fed by name in the graph's dtype."""
    feeds = {}
    for arg in model.session.get_inputs():
        a = arrays[arg.name]
        want = ONNX_DTYPE.get(arg.type)
        feeds[arg.name] = a if want is None or a.dtype == np.dtype(want) else a.astype(want)
    names = [o.name for o in model.session.get_outputs()]
    values = model.session.run(names, feeds)
    return Raw([np.asarray(v) for v in values], names)


def call(module: Any, arrays: dict[str, np.ndarray], sig: Signature, device: str) -> Raw:
    if isinstance(module, OnnxModel):
        return call_onnx(module, arrays)
    return call_torch(module, arrays, sig, device)


@dataclass(frozen=True)
class Declared:
    """One input as the model file declares it."""

    name: str
    dtype: str | None
    rank: int | None  # with the batch dimension


def declared_inputs(module: Any) -> list[Declared] | None:
    """The inputs an ONNX graph or a torch.export program declares; None for TorchScript."""
    if isinstance(module, OnnxModel):
        return [
            Declared(a.name, ONNX_DTYPE.get(a.type, a.type), len(a.shape) if a.shape is not None else None)
            for a in module.session.get_inputs()
        ]
    from torch.fx import GraphModule

    if not isinstance(module, GraphModule):
        return None
    params = set(dict(module.named_parameters()).keys()) | set(dict(module.named_buffers()).keys())
    out = []
    for node in module.graph.nodes:
        if node.op != "placeholder" or node.target in params:
            continue
        val = node.meta.get("val")
        dtype = TORCH_DTYPE.get(str(getattr(val, "dtype", "")))
        shape = getattr(val, "shape", None)
        out.append(Declared(str(node.target), dtype, len(shape) if shape is not None else None))
    return out


def _expected(decl: list[Declared]) -> str:
    return ", ".join(
        f"{d.name!r} ({d.dtype or '?'}, rank {d.rank if d.rank is not None else '?'})" for d in decl
    )


def check_declared(module: Any, sig: Signature, what: str) -> None:
    """Raise one sentence when the model file's declared inputs do not match ``[[model.inputs]]``."""
    decl = declared_inputs(module)
    if decl is None:
        return
    given = list(sig.inputs)
    expects = f"{what} expects {len(decl)} input(s): {_expected(decl)}"
    if len(decl) != len(given):
        raise ModelLoadError(
            f"{expects}; the config lists {len(given)} ({[i.name for i in given]}): make [[model.inputs]] match"
        )
    if isinstance(module, OnnxModel) or sig.call == "keyword":
        by_name = {d.name: d for d in decl}
        unknown = [i.name for i in given if i.name not in by_name]
        if unknown:
            raise ModelLoadError(
                f"{expects}; the config's input(s) {unknown} are not among them: name [[model.inputs]] as the model does"
            )
        pairs = [(i, by_name[i.name]) for i in given]
    else:
        pairs = list(zip(given, decl, strict=True))
    for spec, d in pairs:
        rank = len(sig.dims(spec)) + 1
        if d.dtype is not None and d.dtype != spec.dtype:
            raise ModelLoadError(
                f"{expects}; input {spec.name!r} is configured as {spec.dtype}: set dtype = {d.dtype!r}"
            )
        if d.rank is not None and d.rank != rank:
            raise ModelLoadError(
                f"{expects}; input {spec.name!r} is configured with rank {rank} (shape "
                f"{list(sig.dims(spec))} plus the batch): fix its shape"
            )


def _tables(module: Any, path: str) -> dict[str, int]:
    """Embedding table sizes by name: ``name.weight`` rows (torch) or initializers (ONNX)."""
    if isinstance(module, OnnxModel):
        import onnx

        graph = onnx.load(path, load_external_data=False).graph
        return {
            init.name.removesuffix(".weight"): int(init.dims[0])
            for init in graph.initializer
            if init.name.endswith(".weight") and len(init.dims) == 2
        }
    state = module.state_dict()
    return {
        k.removesuffix(".weight"): int(v.shape[0])
        for k, v in state.items()
        if k.endswith(".weight") and v.dim() == 2
    }


def id_bounds(module: Any, path: str, sig: Signature, what: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``[lo, hi)`` per input (one pair, or one per position of the last dimension): from ``range``, or
    from the sizes of the embedding tables ``embedding`` names."""
    bounds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    tables: dict[str, int] | None = None
    for spec in sig.fed:
        if spec.range:
            bounds[spec.name] = (np.array([spec.range[0]]), np.array([spec.range[1]]))
        elif spec.embedding is not None:
            tables = _tables(module, path) if tables is None else tables
            names = (spec.embedding,) if isinstance(spec.embedding, str) else tuple(spec.embedding)
            width = _last_dim(sig, spec)
            if len(names) not in (1, width):
                raise ModelLoadError(
                    f"input {spec.name!r} names {len(names)} embedding tables; give one, or one per position ({width})"
                )
            missing = [n for n in names if n not in tables]
            if missing:
                raise ModelLoadError(
                    f"{what} has no embedding table {missing[0]!r} (input {spec.name!r}); its tables are "
                    f"{sorted(tables)[:20]}"
                )
            hi = np.array([tables[n] for n in names], dtype=np.float64)
            bounds[spec.name] = (np.zeros(len(names)), hi)
    return bounds


def _last_dim(sig: Signature, spec: InputSpec) -> int:
    dims = sig.dims(spec)
    return dims[-1] if dims and dims[-1] != -1 else 1
