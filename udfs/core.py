"""The scoring core: one Arrow batch of feature rows in, one of predictions out.

:func:`score_batch` is the only place a prediction is computed. The Spark UDF
(batch and streaming jobs) and the real-time scorer all call it, so a row gets
the same prediction, and a bad row the same error reason, on every path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from udfs import model_cache
from udfs.errors import ModelLoadError
from udfs.device import resolve_device, set_threads, task_threads
from udfs.features import Features, extract_features
from udfs.spec import ResolvedModel

PREDICTION = "prediction"
PROBABILITIES = "probabilities"
LABEL = "label"
MODEL_VERSION = "model_version"
ERROR = "error"


def output_schema(model: ResolvedModel) -> pa.Schema:
    """The columns :func:`score_batch` adds, in order."""
    if model.spec.output == "score":
        fields = [pa.field(PREDICTION, pa.float64())]
    else:
        fields = [pa.field(PROBABILITIES, pa.list_(pa.float32())), pa.field(LABEL, pa.int32())]
    return pa.schema(fields + [pa.field(MODEL_VERSION, pa.string()), pa.field(ERROR, pa.string())])


@dataclass
class Scorer:
    """A loaded model bound to a device: what executors and the server hold."""

    model: ResolvedModel
    device: str
    module: Any

    @property
    def version(self) -> str:
        return self.model.version

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Model outputs for a float32 matrix, in chunks of ``batch_size`` rows.

        Returns shape (rows,) for ``score`` and (rows, classes) for ``probabilities``.
        """
        import torch

        spec = self.model.spec
        outs = []
        with torch.inference_mode():
            for start in range(0, len(x), spec.batch_size):
                # One host->device copy per chunk; the model never writes to its input.
                t = torch.from_numpy(x[start : start + spec.batch_size]).to(self.device)
                y = self.module(t)
                if isinstance(y, (tuple, list)):
                    y = y[0]
                if spec.activation == "sigmoid":
                    y = torch.sigmoid(y)
                elif spec.activation == "softmax":
                    y = torch.softmax(y, dim=-1)
                outs.append(y.detach().to("cpu", torch.float32).numpy())
        y_np = np.concatenate(outs) if outs else np.empty((0, 1), dtype=np.float32)
        if spec.output == "score":
            if y_np.ndim == 2 and y_np.shape[1] != 1:
                raise ValueError(
                    f"model {spec.name!r} returns {y_np.shape[1]} values per row; "
                    "set output = 'probabilities' for a classifier"
                )
            return y_np.reshape(-1)
        if y_np.ndim != 2:
            raise ValueError(
                f"model {spec.name!r} returns shape {tuple(y_np.shape)}; output = 'probabilities' "
                "needs one row of class scores per input row"
            )
        return y_np


def load_scorer(model: ResolvedModel, *, ctx: Any = None) -> Scorer:
    """The cached scorer for ``model`` on this task's device, with threads set for this task."""
    set_threads(task_threads(ctx))
    device = resolve_device(model.spec.device, ctx)
    return Scorer(model=model, device=device, module=model_cache.get_model(model, device))


def _scatter(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    if valid.all():
        return values
    full = np.zeros((len(valid),) + values.shape[1:], dtype=values.dtype)
    full[valid] = values
    return full


def assemble(model: ResolvedModel, feats: Features, outputs: np.ndarray) -> list[pa.Array]:
    """Prediction columns for every row: model outputs for good rows, null plus reason for bad ones."""
    n = feats.num_rows
    invalid = None if feats.errors is None else ~feats.valid
    cols: list[pa.Array] = []
    if model.spec.output == "score":
        cols.append(pa.array(_scatter(outputs.astype(np.float64), feats.valid), pa.float64(), mask=invalid))
    else:
        k = outputs.shape[1] if outputs.ndim == 2 and len(outputs) else 0
        probs = _scatter(outputs, feats.valid) if len(outputs) else np.zeros((n, k), np.float32)
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * k)
        values = pa.array(probs.reshape(-1), pa.float32())
        cols.append(pa.ListArray.from_arrays(offsets, values, mask=invalid))
        labels = probs.argmax(axis=1).astype(np.int32) if k else np.zeros(n, np.int32)
        cols.append(pa.array(labels, pa.int32(), mask=invalid))
    cols.append(pa.array(np.full(n, model.version, dtype=object), pa.string()))
    cols.append(pa.nulls(n, pa.string()) if feats.errors is None else pa.array(feats.errors, pa.string()))
    return cols


def score_batch(batch: pa.RecordBatch | pa.Table, scorer: Scorer) -> pa.RecordBatch:
    """Score one batch of feature rows; returns only the prediction columns, row for row.

    Bad rows (null, wrong length, non-numeric, NaN, infinite features) get null
    predictions and a reason in ``error``; the rest of the batch is scored.
    """
    spec = scorer.model.spec
    feats = extract_features(batch, spec.input_columns, spec.num_features)
    outputs = scorer.predict(feats.matrix) if len(feats.matrix) else np.empty((0,), np.float32)
    if spec.output == "probabilities" and outputs.ndim == 1:
        outputs = outputs.reshape(0, 0)
    return pa.RecordBatch.from_arrays(assemble(scorer.model, feats, outputs), schema=output_schema(scorer.model))


def check_model(model: ResolvedModel) -> None:
    """Load the model on the driver's CPU and score one row of zeros, so a corrupt file or an
    output that does not match ``output`` stops the job before any data is read."""
    spec = model.spec
    width = spec.num_features if spec.num_features is not None else len(spec.input_columns)
    module = model_cache.load_module(model_cache.locate(spec.path), model.format, "cpu")
    probe = Scorer(model=model, device="cpu", module=module)
    try:
        probe.predict(np.zeros((1, width), dtype=np.float32))
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any torch error here is a spec/model mismatch
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"model {spec.name!r} ({spec.path}) fails on a row of {width} features: {first}; "
            "check input_columns / num_features against what the model expects"
        ) from None
