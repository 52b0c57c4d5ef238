"""The MLflow pyfunc engine: any model MLflow can load (scikit-learn pipelines, XGBoost, LightGBM...).

A third engine behind :func:`udfs.core.score_batch`, for MLflow models that are neither pytorch
nor onnx flavored. ``mlflow.pyfunc`` is pandas in, pandas out, so this engine pays what the other
two avoid: each batch becomes a pandas DataFrame (one Python object per string cell) and the
result comes back through numpy. That is the price of running a model whose own code does the
preprocessing (a scikit-learn ``ColumnTransformer`` one-hot encoding a string column); a model
that can be exported to ONNX or TorchScript scores without it (bench/results/batch.json,
``pyfunc``).

Columns and bad rows: the model's column-based MLflow signature says which input columns are
strings. String columns are passed as they are (a null one is a bad row, ``null feature: 'city'``);
numeric columns get the same checks and reasons as on the torch and ONNX engines (null,
non-numeric, NaN, infinite) and reach the model as the signature's type (double by default), read
from the Arrow data, not from the float32 matrix. A model with a tensor signature gets the float32
matrix as a numpy array.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from udfs.errors import ModelLoadError, whole_sentences
from udfs.features import Features, _scalar_columns, extract_features
from udfs.onnx_engine import apply_activation

# MLflow column types -> numpy dtypes for the frame (strings stay objects).
_DTYPES = {
    "double": np.float64,
    "float": np.float32,
    "long": np.int64,
    "integer": np.int32,
    "boolean": np.bool_,
}


@dataclass
class PyfuncModel:
    """An ``mlflow.pyfunc.PyFuncModel`` and the column types its signature declares."""

    model: Any
    path: str
    column_types: dict[str, str] = field(default_factory=dict)  # column-based signature: name -> type
    tensor_input: bool = False  # a tensor signature: feed the float32 matrix

    def string_columns(self, columns: Sequence[str]) -> list[str]:
        return [c for c in columns if self.column_types.get(c) == "string"]

    def extract(
        self, batch: pa.RecordBatch | pa.Table, columns: tuple[str, ...], num_features: int | None
    ) -> tuple[Features, Any]:
        """The batch's good rows as the model's input (a DataFrame, or the matrix for a tensor
        signature), and a reason for each bad row (the core's reasons)."""
        import pandas as pd

        if self.tensor_input or (len(columns) == 1 and num_features is not None):
            feats = extract_features(batch, columns, num_features)
            return feats, feats.matrix
        strings = self.string_columns(columns)
        numeric = [c for c in columns if c not in strings]
        n = batch.num_rows
        if numeric:
            feats = _scalar_columns(batch, tuple(numeric))
            valid = feats.valid.copy()
            reasons = list(feats.errors) if feats.errors is not None else None
        else:
            valid, reasons = np.ones(n, dtype=bool), None
        for name in strings:
            nulls = np.asarray(batch.column(name).is_null(), dtype=bool)
            new = nulls & valid
            if new.any():
                reasons = reasons if reasons is not None else [None] * n
                for i in np.flatnonzero(new):
                    reasons[i] = f"null feature: {name!r}"
                valid &= ~nulls
        keep = pa.array(valid)
        data: dict[str, Any] = {}
        for name in columns:
            col = batch.column(name)
            if not valid.all():
                col = pc.filter(col, keep)
            if name in strings:
                data[name] = col.to_numpy(zero_copy_only=False)
                continue
            t = col.type
            if pa.types.is_string(t) or pa.types.is_large_string(t):
                values = pd.to_numeric(
                    pd.Series(col.to_numpy(zero_copy_only=False)), errors="coerce"
                ).to_numpy()
            else:
                values = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
            data[name] = values.astype(_DTYPES.get(self.column_types.get(name, "double"), np.float64))
        return Features(np.empty((int(valid.sum()), 0), np.float32), valid, reasons), pd.DataFrame(data)

    def run(self, x: np.ndarray, *, columns: Sequence[str], batch_size: int, activation: str) -> np.ndarray:
        """Scores for a float32 matrix (ensemble members, the driver's probe): columns named
        ``columns`` in a DataFrame, or the matrix itself for a tensor signature."""
        import pandas as pd

        if self.tensor_input:
            return self.run_input(x, batch_size=batch_size, activation=activation)
        if self.string_columns(columns):
            raise ModelLoadError(
                f"MLflow model {self.path!r} takes string columns {self.string_columns(columns)}, which only "
                "a single model (not an ensemble member) can be fed"
            )
        frame = pd.DataFrame(
            {
                c: x[:, j].astype(_DTYPES.get(self.column_types.get(c, "double"), np.float64))
                for j, c in enumerate(columns)
            }
        )
        return self.run_input(frame, batch_size=batch_size, activation=activation)

    def probe(self, columns: Sequence[str], width: int) -> Any:
        """One row of zeros (empty strings for string columns) in the model's input layout."""
        import pandas as pd

        if self.tensor_input or len(columns) != width:
            return np.zeros((1, width), np.float32)
        return pd.DataFrame(
            {
                c: np.array([""], dtype=object)
                if self.column_types.get(c) == "string"
                else np.zeros(1, _DTYPES.get(self.column_types.get(c, "double"), np.float64))
                for c in columns
            }
        )

    def run_input(self, data: Any, *, batch_size: int, activation: str) -> np.ndarray:
        """The model's predictions for a DataFrame (or matrix), in chunks of ``batch_size`` rows, as
        float32: (rows,) for one value per row, (rows, k) for several."""
        outs = [self._predict(data[start : start + batch_size]) for start in range(0, len(data), batch_size)]
        y = np.concatenate(outs) if len(outs) > 1 else outs[0] if outs else np.empty((0,), np.float32)
        return apply_activation(y, activation)

    def _predict(self, data: Any) -> np.ndarray:
        import pandas as pd

        out = self.model.predict(data)
        if isinstance(out, pd.DataFrame):
            arr = out.to_numpy()
            arr = arr.reshape(-1) if arr.shape[1] == 1 else arr
        elif isinstance(out, pd.Series):
            arr = out.to_numpy()
        elif isinstance(out, dict):
            raise ValueError(
                f"MLflow model {self.path!r} returns named outputs {sorted(out)}; sparkscore reads one "
                "score or one row of class scores per input row"
            )
        else:
            arr = np.asarray(out)
        if arr.dtype == object:
            raise ValueError(
                f"MLflow model {self.path!r} returns non-numeric predictions (e.g. {arr.reshape(-1)[:1]!r}); "
                "log a model that returns numbers (class indices or probabilities)"
            )
        return arr.astype(np.float32, copy=False)


def load(path: str) -> PyfuncModel:
    """An MLflow model directory loaded with ``mlflow.pyfunc.load_model`` (this process's packages;
    no separate environment is built)."""
    import mlflow.pyfunc

    try:
        model = mlflow.pyfunc.load_model(path)
    except Exception as exc:  # noqa: BLE001 - each flavor's loader raises its own types
        raise ModelLoadError(
            f"MLflow model {path!r} could not be loaded with mlflow.pyfunc (is its flavor's package "
            f"installed here?): {whole_sentences(str(exc)) or type(exc).__name__}"
        ) from None
    column_types: dict[str, str] = {}
    tensor_input = False
    schema = model.metadata.get_input_schema()
    if schema is not None:
        if schema.is_tensor_spec():
            tensor_input = True
        else:
            for col in schema.inputs:
                if col.name:
                    column_types[col.name] = str(getattr(col.type, "name", col.type)).lower()
    return PyfuncModel(model=model, path=path, column_types=column_types, tensor_input=tensor_input)
