"""The ONNX Runtime engine: ``.onnx`` models (exported networks, scikit-learn, LightGBM, XGBoost).

A second engine behind the one scoring core: :func:`load` returns an
:class:`OnnxModel` that the model cache keeps like a torch module (one
``InferenceSession`` per worker process and device), and
:meth:`udfs.core.Scorer.run_member` calls :meth:`OnnxModel.run` instead of the
torch module. Feature extraction, bad-row reasons, activations, output kinds and
ensembles stay in the core, so an ONNX model behaves like a torch one on every path.

What it accepts:

* one float (or double) input of shape ``[batch, num_features]``, fed the feature
  matrix; or one input per column, named like ``input_columns`` (shape
  ``[batch, 1]`` or ``[batch]``), as ``skl2onnx`` writes for a list of columns;
* the model's only output, or, when there are several (the label plus probabilities of a
  converted classifier), the probabilities: a ``[batch, classes]`` tensor
  (``zipmap=False``) or the sequence of ``{class: probability}`` maps that converters
  write by default, read in the model's class order.

Sessions run with ``spark.task.cpus`` intra-op threads and spin-waiting off: ORT's
spinning threads would otherwise slow torch in the same process (and other tasks
on the same cores) many times over.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from udfs.device import task_threads
from udfs.errors import ModelLoadError

log = logging.getLogger(__name__)

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64}

Provider = str | tuple[str, dict[str, Any]]


class OnnxInputError(ModelLoadError):
    """The ONNX model's inputs do not fit the spec's ``input_columns`` / ``num_features``."""


def providers_for(device: str, available: Sequence[str]) -> list[Provider]:
    """The execution providers for a resolved device ('cpu', 'cuda', 'cuda:N').

    A GPU device gets the CUDA provider on that GPU (with the CPU one behind it, for the
    operators CUDA lacks); without the CUDA provider in this onnxruntime build the
    session runs on the CPU, as ONNX Runtime itself does, and a warning says so.
    """
    if not device.startswith("cuda"):
        return [CPU_EP]
    if CUDA_EP not in available:
        log.warning(
            "device %s: this onnxruntime build has no %s (pip install onnxruntime-gpu); "
            "the ONNX model runs on the CPU",
            device,
            CUDA_EP,
        )
        return [CPU_EP]
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    return [(CUDA_EP, {"device_id": index}), CPU_EP]


def session_options(threads: int) -> Any:
    """Session options: ``threads`` intra-op threads, one inter-op thread, no spin-waiting."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only: shape warnings on unused outputs are noise here
    return opts


@dataclass(frozen=True)
class _Input:
    """One session input: fed the whole matrix (``column`` None) or one column of it."""

    name: str
    dtype: Any
    column: int | None = None
    flat: bool = False  # a per-column input of shape [batch] rather than [batch, 1]

    def value(self, x: np.ndarray) -> np.ndarray:
        if self.column is None:
            return x if x.dtype == self.dtype else x.astype(self.dtype)
        col = x[:, self.column] if self.flat else x[:, self.column : self.column + 1]
        return np.ascontiguousarray(col, dtype=self.dtype)


@dataclass
class OnnxModel:
    """One ``InferenceSession`` and how to feed it and read it."""

    session: Any
    path: str
    providers: tuple[str, ...]
    output: str  # the output that is read (the probabilities of a classifier)
    output_is_map: bool  # a sequence of {class: probability} maps (converters' zipmap)
    _feeds: dict[tuple[tuple[str, ...], int], tuple[_Input, ...]] = field(default_factory=dict, repr=False)

    @property
    def inputs(self) -> list[Any]:
        return list(self.session.get_inputs())

    def describe_inputs(self) -> str:
        """What the model takes, in words: "1 input 'features' of shape [batch, 4] (float)"."""
        parts = [f"{a.name!r} of shape {_shape_text(a.shape)} ({_type_text(a.type)})" for a in self.inputs]
        return f"{len(parts)} input{'s' if len(parts) != 1 else ''} " + ", ".join(parts)

    def feed_for(self, columns: Sequence[str], width: int) -> tuple[_Input, ...]:
        """How to feed a ``width``-feature matrix read from ``columns``; one sentence when it cannot fit."""
        key = (tuple(columns), width)
        feed = self._feeds.get(key)
        if feed is None:
            feed = self._feeds[key] = self._plan(tuple(columns), width)
        return feed

    def _plan(self, columns: tuple[str, ...], width: int) -> tuple[_Input, ...]:
        inputs = self.inputs
        given = (
            f"input_columns = {list(columns)}, num_features = {width}"
            if len(columns) == 1
            else f"input_columns = {list(columns)}"
        )
        where = f"ONNX model {self.path!r} takes {self.describe_inputs()}"
        for arg in inputs:
            if arg.type not in _FLOAT_TYPES:
                raise OnnxInputError(
                    f"{where}, but sparkscore feeds float features; convert it with float inputs "
                    "(FloatTensorType)"
                )
        if len(inputs) == 1:
            arg = inputs[0]
            shape = list(arg.shape)
            if len(shape) != 2:
                raise OnnxInputError(f"{where}, but sparkscore feeds one [batch, features] matrix ({given})")
            if _fixed(shape[0]):
                raise OnnxInputError(
                    f"{where}: a fixed batch of {shape[0]} rows; export it with a dynamic batch dimension "
                    "(dynamic_axes / dynamic_shapes in torch.onnx.export, None in a converter's input type)"
                )
            if _fixed(shape[1], other_than=width):
                raise OnnxInputError(
                    f"{where}, but the config gives {width} features ({given}); "
                    f"list {shape[1]} input_columns or set num_features = {shape[1]}"
                )
            return (_Input(arg.name, _FLOAT_TYPES[arg.type]),)
        names = [a.name for a in inputs]
        if sorted(names) != sorted(columns):
            raise OnnxInputError(
                f"{where}, one per column, but the config gives {given}; set input_columns = {names}"
            )
        plan = []
        for arg in inputs:
            shape = list(arg.shape)
            if not (len(shape) == 1 or (len(shape) == 2 and not _fixed(shape[1], other_than=1))):
                raise OnnxInputError(f"{where}; each per-column input must be of shape [batch, 1] or [batch]")
            plan.append(
                _Input(arg.name, _FLOAT_TYPES[arg.type], columns.index(arg.name), flat=len(shape) == 1)
            )
        return tuple(plan)

    def run(self, x: np.ndarray, *, columns: Sequence[str], batch_size: int, activation: str) -> np.ndarray:
        """The chosen output for a float32 matrix, in chunks of ``batch_size`` rows, as float32."""
        feed = self.feed_for(columns, x.shape[1])
        outs = [
            self._run_chunk(x[start : start + batch_size], feed) for start in range(0, len(x), batch_size)
        ]
        y = np.concatenate(outs) if len(outs) > 1 else outs[0] if outs else np.empty((0, 1), np.float32)
        return apply_activation(y, activation)

    def _run_chunk(self, x: np.ndarray, feed: tuple[_Input, ...]) -> np.ndarray:
        (y,) = self.session.run([self.output], {i.name: i.value(x) for i in feed})
        if self.output_is_map:
            return maps_to_matrix(y)
        return np.asarray(y, dtype=np.float32)


def maps_to_matrix(maps: list[dict[Any, float]]) -> np.ndarray:
    """A sequence of {class: probability} maps as a [rows, classes] float32 matrix, in the maps' order.

    Converters write every map with the classes in the model's order (the order of a
    scikit-learn ``classes_``), the same order as the ``zipmap=False`` tensor.
    """
    if not maps:
        return np.empty((0, 0), np.float32)
    k = len(maps[0])
    flat = np.fromiter(itertools.chain.from_iterable(m.values() for m in maps), np.float32, len(maps) * k)
    return flat.reshape(len(maps), k)


def apply_activation(y: np.ndarray, activation: str) -> np.ndarray:
    """The spec's activation on raw outputs (float32), as the torch engine applies it."""
    if activation == "sigmoid":
        # tanh form: no overflow warning for large negative logits.
        return (0.5 * (np.tanh(0.5 * y) + 1.0)).astype(np.float32, copy=False)
    if activation == "softmax":
        e = np.exp(y - y.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32, copy=False)
    return y


def choose_output(outputs: Sequence[Any]) -> tuple[str, bool]:
    """The output to read and whether it is a sequence of maps.

    One output: that one. Several (a converted classifier's label and probabilities): the
    first whose name says probabilities, else the first 2-d float tensor, else the first
    sequence of maps, else the first output.
    """
    if len(outputs) == 1:
        chosen = outputs[0]
    else:
        by_name = [o for o in outputs if "prob" in o.name.lower()]
        float_2d = [o for o in outputs if o.type in _FLOAT_TYPES and len(o.shape or ()) == 2]
        maps = [o for o in outputs if o.type.startswith("seq(map(")]
        chosen = (by_name or float_2d or maps or list(outputs))[0]
    is_map = chosen.type.startswith("seq(map(")
    if not (is_map or chosen.type.startswith("tensor(")):
        raise ModelLoadError(
            f"the ONNX model's output {chosen.name!r} is of type {chosen.type}; sparkscore reads tensors "
            "or the sequence of {class: probability} maps that scikit-learn converters write"
        )
    return chosen.name, is_map


def load(path: str, device: str = "cpu", *, threads: int | None = None) -> OnnxModel:
    """An ``InferenceSession`` for the ``.onnx`` file at ``path`` on ``device`` (a resolved device).

    ``threads`` defaults to this task's ``spark.task.cpus`` (1 outside Spark), as torch's.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelLoadError(
            f"model file {path!r} is an ONNX model but onnxruntime is not installed; pip install onnxruntime"
        ) from None
    providers = providers_for(device, ort.get_available_providers())
    opts = session_options(threads if threads is not None else task_threads())
    try:
        session = ort.InferenceSession(path, sess_options=opts, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own Fail / InvalidProtobuf / ... types
        reason = " ".join(str(exc).split())[:200]
        raise ModelLoadError(
            f"model file {path!r} could not be loaded as an ONNX model (is it corrupt or of another "
            f"format?): {reason}"
        ) from None
    name, is_map = choose_output(session.get_outputs())
    return OnnxModel(
        session=session,
        path=path,
        providers=tuple(session.get_providers()),
        output=name,
        output_is_map=is_map,
    )


def _fixed(dim: Any, *, other_than: int | None = None) -> bool:
    """Whether a dimension is a fixed size (other than ``other_than``); symbolic and unknown ones are not."""
    return isinstance(dim, int) and dim > 0 and dim != other_than


def _shape_text(shape: Sequence[Any] | None) -> str:
    """[batch, 4] for (None, 4) or ('N', 4); unknown later dimensions show as ?."""
    dims = []
    for i, d in enumerate(shape or ()):
        if _fixed(d):
            dims.append(str(d))
        else:
            dims.append("batch" if i == 0 else "?")
    return "[" + ", ".join(dims) + "]"


def _type_text(onnx_type: str) -> str:
    return onnx_type.removeprefix("tensor(").removesuffix(")")
