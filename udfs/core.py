"""The scoring core: one Arrow batch of feature rows in, one of predictions out.

:func:`score_batch` is the only place a prediction is computed. The Spark UDF
(batch and streaming jobs) and the real-time scorer all call it, so a row gets
the same prediction, and a bad row the same error reason, on every path.
"""

from __future__ import annotations

import time
from concurrent.futures import Executor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from udfs import model_cache
from udfs.device import resolve_device, set_threads, task_threads
from udfs.errors import ModelLoadError, whole_sentences
from udfs.features import Features, extract_features
from udfs.onnx_engine import OnnxModel
from udfs.pyfunc_engine import PyfuncModel
from udfs.spec import ResolvedModel

PREDICTION = "prediction"
PROBABILITIES = "probabilities"
LABEL = "label"
MODEL_VERSION = "model_version"
ERROR = "error"
DEGRADED = "degraded"
MISSING_MEMBERS = "missing_members"
MEMBER_PREFIX = "member_"


class QuorumError(RuntimeError):
    """Fewer ensemble members answered than the quorum needs."""


def short_reason(exc: BaseException) -> str:
    """One line for an exception; TorchScript puts the real error on the last line of a long trace."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = whole_sentences(lines[-1] if len(lines) > 1 and "Error" in lines[-1] else lines[0], 300)
    return line if "Error" in line else f"{type(exc).__name__}: {line}"


def output_schema(model: ResolvedModel) -> pa.Schema:
    """The columns :func:`score_batch` adds, in order."""
    spec = model.spec
    if spec.output == "score":
        fields = [pa.field(PREDICTION, pa.float64())]
    else:
        fields = [pa.field(PROBABILITIES, pa.list_(pa.float32())), pa.field(LABEL, pa.int32())]
    fields += [pa.field(MODEL_VERSION, pa.string()), pa.field(ERROR, pa.string())]
    if model.is_ensemble:
        fields += [pa.field(DEGRADED, pa.bool_()), pa.field(MISSING_MEMBERS, pa.string())]
        if spec.member_outputs:
            member_type = pa.float64() if spec.output == "score" else pa.int32()
            fields += [pa.field(MEMBER_PREFIX + m.name, member_type) for m in model.members]
    return pa.schema(fields)


@dataclass(frozen=True)
class Prediction:
    """Model (or ensemble) outputs for the good rows of one batch."""

    values: np.ndarray  # score: (rows,) float64; probabilities: (rows, classes) float32
    labels: np.ndarray | None = None  # probabilities only: (rows,) int32
    missing: tuple[str, ...] = ()  # ensemble members that did not answer (degraded when non-empty)
    members: dict[str, np.ndarray] = field(default_factory=dict)  # per member: score or label


def combine(model: ResolvedModel, outputs: dict[str, np.ndarray]) -> Prediction:
    """Combine the answering members' outputs; weights are renormalised over those that answered."""
    spec = model.spec
    answered = [m for m in model.members if m.name in outputs]
    missing = tuple(m.name for m in model.members if m.name not in outputs)
    total = sum(m.weight for m in answered)
    weights = (
        {m.name: m.weight / total for m in answered}
        if total > 0
        else {m.name: 1 / len(answered) for m in answered}
    )
    per_member: dict[str, np.ndarray] = {}
    if spec.output == "score":
        values = sum(weights[m.name] * outputs[m.name].astype(np.float64) for m in answered)
        per_member = {m.name: outputs[m.name].astype(np.float64) for m in answered}
        return Prediction(np.asarray(values, dtype=np.float64), None, missing, per_member)
    member_labels = {m.name: outputs[m.name].argmax(axis=1).astype(np.int32) for m in answered}
    if spec.combiner == "weighted_mean":
        probs = sum(weights[m.name] * outputs[m.name].astype(np.float64) for m in answered)
        probs = np.asarray(probs, dtype=np.float32)
        return Prediction(probs, probs.argmax(axis=1).astype(np.int32), missing, member_labels)
    # majority_vote: most votes wins; ties go to the highest summed weight, then the lowest label.
    classes = outputs[answered[0].name].shape[1]
    rows = len(outputs[answered[0].name])
    votes = np.zeros((rows, classes), np.float64)
    weight_share = np.zeros((rows, classes), np.float64)
    idx = np.arange(rows)
    for m in answered:
        votes[idx, member_labels[m.name]] += 1
        weight_share[idx, member_labels[m.name]] += weights[m.name]
    # Shares sum to 1, so half a share never outweighs one vote; argmax takes the lowest label on exact ties.
    winner = (votes + 0.5 * weight_share).argmax(axis=1).astype(np.int32)
    return Prediction(weight_share.astype(np.float32), winner, missing, member_labels)


def member_output(y: np.ndarray, name: str, output: str) -> np.ndarray:
    """One member's outputs checked against ``output``: (rows,) for a score, (rows, classes) else."""
    if output == "score":
        if y.ndim == 2 and y.shape[1] != 1:
            raise ValueError(
                f"model {name!r} returns {y.shape[1]} values per row; "
                "set output = 'probabilities' for a classifier"
            )
        return y.reshape(-1)
    if y.ndim != 2:
        raise ValueError(
            f"model {name!r} returns shape {tuple(y.shape)}; output = 'probabilities' "
            "needs one row of class scores per input row"
        )
    return y


@dataclass
class Scorer:
    """Loaded model(s) bound to a device: what executors and the server hold."""

    model: ResolvedModel
    device: str
    modules: tuple[Any, ...]

    @property
    def version(self) -> str:
        return self.model.version

    def run_member(self, index: int, x: np.ndarray) -> np.ndarray:
        """One member's outputs for a float32 matrix, in chunks of ``batch_size`` rows.

        Returns shape (rows,) for ``score`` and (rows, classes) for ``probabilities``.
        """
        spec = self.model.spec
        module = self.modules[index]
        name = self.model.members[index].name
        if isinstance(module, OnnxModel):
            scores = module.run(
                x, columns=spec.input_columns, batch_size=spec.batch_size, activation=spec.activation
            )
            return member_output(scores, name, spec.output)
        if isinstance(module, PyfuncModel):
            scores = module.run(
                x, columns=spec.input_columns, batch_size=spec.batch_size, activation=spec.activation
            )
            return member_output(scores, name, spec.output)
        import torch

        outs = []
        with torch.inference_mode():
            for start in range(0, len(x), spec.batch_size):
                # One host->device copy per chunk; the model never writes to its input.
                t = torch.from_numpy(x[start : start + spec.batch_size]).to(self.device)
                y = module(t)
                if isinstance(y, (tuple, list)):
                    y = y[0]
                if spec.activation == "sigmoid":
                    y = torch.sigmoid(y)
                elif spec.activation == "softmax":
                    y = torch.softmax(y, dim=-1)
                outs.append(y.detach().to("cpu", torch.float32).numpy())
        y_np = np.concatenate(outs) if outs else np.empty((0, 1), dtype=np.float32)
        return member_output(y_np, name, spec.output)

    def predict(self, x: np.ndarray, *, pool: Executor | None = None) -> Prediction:
        """Score a float32 matrix with the model, or with every ensemble member and combine.

        With ``pool`` the members run in parallel (torch releases the GIL) and
        ``member_timeout_ms`` applies; without it they run one after another.
        A member that fails or times out is dropped while ``quorum`` members
        still answer; below quorum this raises :class:`QuorumError`.
        """
        members = self.model.members
        if not self.model.is_ensemble:
            values = self.run_member(0, x)
            if self.model.spec.output == "score":
                return Prediction(values.astype(np.float64))
            return Prediction(values, values.argmax(axis=1).astype(np.int32))
        outputs: dict[str, np.ndarray] = {}
        failures: dict[str, str] = {}
        if pool is None:
            for i, m in enumerate(members):
                try:
                    outputs[m.name] = self.run_member(i, x)
                except Exception as exc:  # noqa: BLE001 - a failing member degrades, quorum decides
                    failures[m.name] = short_reason(exc)
        else:
            timeout_ms = self.model.spec.member_timeout_ms
            # Each member's clock starts when it starts running, not while it waits for a pool thread.
            started: list[float | None] = [None] * len(members)

            def run(i: int) -> np.ndarray:
                started[i] = time.monotonic()
                return self.run_member(i, x)

            futures = {m.name: pool.submit(run, i) for i, m in enumerate(members)}
            for i, (name, fut) in enumerate(futures.items()):
                try:
                    while timeout_ms is not None and started[i] is None and not fut.done():
                        wait([fut], timeout=timeout_ms / 1000)
                    begun = started[i]
                    left = None if timeout_ms is None or begun is None else begun + timeout_ms / 1000
                    outputs[name] = fut.result(
                        timeout=None if left is None else max(0.0, left - time.monotonic())
                    )
                except FutureTimeout:
                    failures[name] = f"timed out after {timeout_ms:g} ms"
                except Exception as exc:  # noqa: BLE001
                    failures[name] = short_reason(exc)
        if len(outputs) < self.model.quorum:
            detail = "; ".join(f"{n} ({why})" for n, why in failures.items())
            raise QuorumError(
                f"ensemble {self.model.name!r}: {len(outputs)} of {len(members)} members answered, "
                f"quorum is {self.model.quorum}; failing: {detail}"
            )
        return combine(self.model, outputs)


def load_scorer(model: ResolvedModel, *, ctx: Any = None) -> Scorer:
    """The cached scorer for ``model`` on this task's device, with threads set for this task."""
    set_threads(task_threads(ctx))
    device = resolve_device(model.spec.device, ctx)
    # Every member of the model in use stays cached, whatever cache_size says: an ensemble larger
    # than the cache would otherwise evict and reload its members on every task.
    size = max(model.spec.cache_size, len(model.members))
    modules = tuple(model_cache.get_model(m, device, cache_size=size) for m in model.members)
    return Scorer(model=model, device=device, modules=modules)


def _scatter(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    if valid.all():
        return values
    full = np.zeros((len(valid),) + values.shape[1:], dtype=values.dtype)
    full[valid] = values
    return full


def assemble(model: ResolvedModel, feats: Features, pred: Prediction | None) -> list[pa.Array]:
    """Prediction columns for every row: outputs for good rows, null plus a reason for bad ones."""
    spec = model.spec
    n = feats.num_rows
    invalid = None if feats.errors is None else ~feats.valid
    good = pred is not None and len(pred.values) > 0
    cols: list[pa.Array] = []
    if spec.output == "score":
        values = _scatter(pred.values, feats.valid) if good else np.zeros(n)  # type: ignore[union-attr]
        cols.append(pa.array(values, pa.float64(), mask=invalid))
    else:
        k = pred.values.shape[1] if good else 0  # type: ignore[union-attr]
        probs = _scatter(pred.values, feats.valid) if good else np.zeros((n, 0), np.float32)  # type: ignore[union-attr]
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * k)
        cols.append(
            # ListArray.from_arrays takes only an Arrow mask (a numpy one raises TypeError).
            pa.ListArray.from_arrays(
                offsets,
                pa.array(probs.reshape(-1), pa.float32()),
                mask=None if invalid is None else pa.array(invalid),
            )
        )
        labels = _scatter(pred.labels, feats.valid) if good else np.zeros(n, np.int32)  # type: ignore[arg-type, union-attr]
        cols.append(pa.array(labels, pa.int32(), mask=invalid))
    cols.append(pa.repeat(pa.scalar(model.version, pa.string()), n))
    cols.append(pa.nulls(n, pa.string()) if feats.errors is None else pa.array(feats.errors, pa.string()))
    if model.is_ensemble:
        missing = pred.missing if pred is not None else ()
        cols.append(pa.array(np.full(n, bool(missing)), pa.bool_(), mask=invalid))
        missing_text = ",".join(missing) if missing else None
        cols.append(pa.array([missing_text] * n, pa.string(), mask=invalid))
        if spec.member_outputs:
            member_type = pa.float64() if spec.output == "score" else pa.int32()
            for m in model.members:
                got = pred.members.get(m.name) if good else None  # type: ignore[union-attr]
                if got is None:
                    cols.append(pa.nulls(n, member_type))
                else:
                    cols.append(pa.array(_scatter(got, feats.valid), member_type, mask=invalid))
    return cols


def score_batch(
    batch: pa.RecordBatch | pa.Table, scorer: Scorer, *, pool: Executor | None = None
) -> pa.RecordBatch:
    """Score one batch of feature rows; returns only the prediction columns, row for row.

    Bad rows (null, wrong length, non-numeric, NaN, infinite features) get null
    predictions and a reason in ``error``; the rest of the batch is scored.
    ``pool`` runs ensemble members in parallel (see :meth:`Scorer.predict`).
    """
    spec = scorer.model.spec
    engine = scorer.modules[0]
    if isinstance(engine, PyfuncModel) and not scorer.model.is_ensemble:
        # pandas in, pandas out: string columns reach the model as they are (udfs.pyfunc_engine).
        feats, data = engine.extract(batch, spec.input_columns, spec.num_features)
        pred = None
        if len(data):
            y = engine.run_input(data, batch_size=spec.batch_size, activation=spec.activation)
            values = member_output(y, scorer.model.members[0].name, spec.output)
            pred = (
                Prediction(values.astype(np.float64))
                if spec.output == "score"
                else Prediction(values, values.argmax(axis=1).astype(np.int32))
            )
        return pa.RecordBatch.from_arrays(
            assemble(scorer.model, feats, pred), schema=output_schema(scorer.model)
        )
    feats = extract_features(batch, spec.input_columns, spec.num_features)
    pred = scorer.predict(feats.matrix, pool=pool) if len(feats.matrix) else None
    return pa.RecordBatch.from_arrays(assemble(scorer.model, feats, pred), schema=output_schema(scorer.model))


def check_model(model: ResolvedModel) -> None:
    """Load every model file on the driver's CPU and score one row of zeros, so a corrupt file or
    an output that does not match ``output`` stops the job before any data is read."""
    spec = model.spec
    width = spec.num_features if spec.num_features is not None else len(spec.input_columns)
    modules = tuple(
        model_cache.load_module(model_cache.member_path(m), m.format, "cpu") for m in model.members
    )
    probe = Scorer(model=model, device="cpu", modules=modules)
    for i, m in enumerate(model.members):
        fixed = fixed_batch_size(modules[i])
        if fixed is not None:
            raise ModelLoadError(
                f"model {m.name!r} ({m.path}) was exported with a fixed batch size of {fixed}; export it "
                "with a dynamic batch dimension: torch.export.export(model, (x,), "
                "dynamic_shapes=({0: torch.export.Dim('batch')},))"
            )
        try:
            module = modules[i]
            if isinstance(module, PyfuncModel) and not model.is_ensemble:
                probe_input = module.probe(spec.input_columns, width)
                member_output(
                    module.run_input(probe_input, batch_size=1, activation=spec.activation),
                    m.name,
                    spec.output,
                )
            else:
                probe.run_member(i, np.zeros((1, width), dtype=np.float32))
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - any torch error here is a spec/model mismatch
            hint = "check input_columns / num_features against what the model expects"
            if spec.num_features is None and len(spec.input_columns) == 1:
                hint = (
                    f"if {spec.input_columns[0]!r} is an array column, set num_features in [model] to its "
                    f"length, else {hint}"
                )
            feature = "feature" if width == 1 else "features"
            raise ModelLoadError(
                f"model {m.name!r} ({m.path}) fails on a row of {width} {feature}: {short_reason(exc)}; {hint}"
            ) from None


def fixed_batch_size(module: Any) -> int | None:
    """The batch size a torch.export program was specialised to, or None when its batch is dynamic."""
    from torch.fx import GraphModule

    if not isinstance(module, GraphModule):  # TorchScript and other engines batch dynamically
        return None
    for node in module.graph.nodes:
        if node.op == "placeholder":
            shape = getattr(node.meta.get("val"), "shape", None)
            # A dynamic dimension is a SymInt; an int means the export fixed it.
            return shape[0] if shape and type(shape[0]) is int else None
    return None
