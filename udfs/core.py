"""The scoring core: one Arrow batch of feature rows in, one of predictions out.

:func:`score_batch` is the only place a prediction is computed. The Spark UDF
(batch and streaming jobs) and the real-time scorer all call it, so a row gets
the same prediction, and a bad row the same error reason, on every path.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Executor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from udfs import engines, model_cache
from udfs.device import resolve_device, set_threads, task_threads
from udfs.errors import ModelLoadError, whole_sentences
from udfs.features import Features, check_columns, extract_features
from udfs.onnx_engine import OnnxModel
from udfs.pyfunc_engine import PyfuncModel
from udfs.signature import OutputSpec, Signature, check_schema, decode_arrow, lengths_of, take
from udfs.spec import ResolvedModel

PREDICTION = "prediction"
PROBABILITIES = "probabilities"
LABEL = "label"
MODEL_VERSION = "model_version"
ERROR = "error"
DEGRADED = "degraded"
MISSING_MEMBERS = "missing_members"
MEMBER_PREFIX = "member_"


MODEL_ERROR = "model error: "


class QuorumError(RuntimeError):
    """Fewer ensemble members answered than the quorum needs."""


class _Stats:
    """What this process's bisections cost: rows that got a model error, and the extra model calls
    made to find them (the Spark wrappers and the scorer's metrics report these)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.model_errors = 0
        self.bisect_calls = 0

    def add(self, model_errors: int, bisect_calls: int) -> None:
        with self._lock:
            self.model_errors += model_errors
            self.bisect_calls += bisect_calls

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.model_errors, self.bisect_calls


STATS = _Stats()


def short_reason(exc: BaseException) -> str:
    """One line for an exception; TorchScript puts the real error on the last line of a long trace."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = whole_sentences(lines[-1] if len(lines) > 1 and "Error" in lines[-1] else lines[0], 300)
    return line if "Error" in line else f"{type(exc).__name__}: {line}"


# The column type of each output kind (typed signatures).
OUTPUT_TYPES = {
    "score": pa.float64(),
    "probabilities": pa.list_(pa.float32()),
    "label": pa.int32(),
    "vector": pa.list_(pa.float32()),
}


def output_schema(model: ResolvedModel) -> pa.Schema:
    """The columns :func:`score_batch` adds, in order."""
    spec = model.spec
    sig = spec.signature
    if sig is not None:
        fields = [pa.field(o.name, OUTPUT_TYPES[o.kind]) for o in sig.outputs]
        fields += [pa.field(MODEL_VERSION, pa.string()), pa.field(ERROR, pa.string())]
        if model.is_ensemble:
            fields += [pa.field(DEGRADED, pa.bool_()), pa.field(MISSING_MEMBERS, pa.string())]
        return pa.schema(fields)
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


@dataclass(frozen=True)
class TypedPrediction:
    """A typed model's (or ensemble's) outputs for some good rows, by output name."""

    values: dict[str, np.ndarray]
    missing: tuple[str, ...] = ()


def typed_output(o: OutputSpec, y: np.ndarray, rows: int, model: str) -> np.ndarray:
    """One model output as ``o`` wants it: score (rows,) float64; probabilities / vector (rows, k)
    float32; label: the class scores (rows, k) float32, or the labels (rows,) when the model gives them."""
    where = f"model {model!r}, output {o.name!r}"
    if len(y) != rows:
        raise ValueError(f"{where}: the model returned {len(y)} rows for {rows}")
    if o.kind == "label" and (y.ndim == 1 or not np.issubdtype(y.dtype, np.floating)):
        return y.reshape(rows).astype(np.int64)
    y = np.asarray(y, dtype=np.float32) if y.dtype != np.float64 else y
    if o.activation != "none":
        from udfs.onnx_engine import apply_activation

        y = apply_activation(y, o.activation)
    if o.kind == "score":
        if o.index is not None:
            if y.ndim != 2 or o.index >= y.shape[1]:
                raise ValueError(
                    f"{where}: index {o.index} needs a [batch, classes] output, got shape {list(y.shape)}"
                )
            return y[:, o.index].astype(np.float64)
        if y.size != rows:
            raise ValueError(
                f"{where} is a score but the model returns shape {list(y.shape)}; use kind = 'vector' "
                "or 'probabilities', or index to take one column"
            )
        return y.reshape(rows).astype(np.float64)
    if y.ndim < 2:
        raise ValueError(f"{where} ({o.kind}) needs a [batch, n] output, got shape {list(y.shape)}")
    return np.ascontiguousarray(y.reshape(rows, -1), dtype=np.float32)


def combine_typed(model: ResolvedModel, outputs: dict[str, dict[str, np.ndarray]]) -> TypedPrediction:
    """Combine the answering members' outputs, output by output.

    ``weighted_mean``: the weighted mean (weights renormalised over the members that answered) of
    scores, probabilities, vectors (e.g. embeddings), and of the class scores a label is the argmax
    of. ``majority_vote``: each member's label (argmax) is a vote; a probabilities output becomes each
    class's share of the weighted votes (scores and vectors cannot be voted on: a config error).
    """
    sig = model.spec.signature
    assert sig is not None
    answered = [m for m in model.members if m.name in outputs]
    missing = tuple(m.name for m in model.members if m.name not in outputs)
    total = sum(m.weight for m in answered)
    weights = {m.name: (m.weight / total if total > 0 else 1 / len(answered)) for m in answered}
    combined: dict[str, np.ndarray] = {}
    for o in sig.outputs:
        arrays = {m.name: outputs[m.name][o.name] for m in answered}
        first = arrays[answered[0].name]
        if model.spec.combiner == "majority_vote":
            labels = {n: (a.argmax(axis=1) if a.ndim == 2 else a).astype(np.int64) for n, a in arrays.items()}
            classes = (
                first.shape[1]
                if first.ndim == 2
                else int(max(int(v.max(initial=0)) for v in labels.values())) + 1
            )
            rows = len(first)
            votes = np.zeros((rows, classes))
            share = np.zeros((rows, classes))
            idx = np.arange(rows)
            for n, lab in labels.items():
                votes[idx, lab] += 1
                share[idx, lab] += weights[n]
            combined[o.name] = (
                (votes + 0.5 * share).argmax(axis=1) if o.kind == "label" else share.astype(np.float32)
            )
        elif o.kind == "label" and first.ndim == 1:
            combined[o.name] = first  # labels given by the model: a mean of labels means nothing
        else:
            mean = sum(weights[n] * a.astype(np.float64) for n, a in arrays.items())
            combined[o.name] = np.asarray(mean, dtype=first.dtype)
    return TypedPrediction(combined, missing)


def finish_output(o: OutputSpec, y: np.ndarray) -> np.ndarray:
    """A combined output as its column holds it (a label is the argmax of class scores)."""
    if o.kind == "label":
        return (y.argmax(axis=1) if y.ndim == 2 else y).astype(np.int32)
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
                chunk = x[start : start + spec.batch_size]
                # A CPU tensor would share the caller's buffer (an Arrow column the output keeps, the
                # next member's input): a model that writes into its input gets its own copy.
                t = torch.from_numpy(chunk.copy() if self.device == "cpu" else chunk).to(self.device)
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
        if not self.model.is_ensemble:
            values = self.run_member(0, x)
            if self.model.spec.output == "score":
                return Prediction(values.astype(np.float64))
            return Prediction(values, values.argmax(axis=1).astype(np.int32))
        outputs = self.run_members(lambda i: self.run_member(i, x), pool)
        return combine(self.model, outputs)

    def run_members(self, fn: Any, pool: Executor | None) -> dict[str, Any]:
        """``fn(i)`` for every member: one after another, or in parallel on ``pool`` with
        ``member_timeout_ms``. Failing members are dropped while ``quorum`` still answer; below it
        this raises :class:`QuorumError`."""
        members = self.model.members
        outputs: dict[str, Any] = {}
        failures: dict[str, str] = {}
        if pool is None:
            for i, m in enumerate(members):
                try:
                    outputs[m.name] = fn(i)
                except Exception as exc:  # noqa: BLE001 - a failing member degrades, quorum decides
                    failures[m.name] = short_reason(exc)
        else:
            # The clock starts when the members are submitted: the timeout bounds the call, whether a
            # member waits for a thread or runs. A pool may supply a default (``timeout_ms``).
            timeout_ms = self.model.spec.member_timeout_ms or getattr(pool, "timeout_ms", None)
            end = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
            futures = {m.name: pool.submit(fn, i) for i, m in enumerate(members)}
            for name, fut in futures.items():
                try:
                    outputs[name] = fut.result(
                        timeout=None if end is None else max(0.0, end - time.monotonic())
                    )
                except FutureTimeout:
                    fut.cancel()  # still waiting for a thread: it never starts
                    failures[name] = f"timed out after {timeout_ms:g} ms"
                except Exception as exc:  # noqa: BLE001
                    failures[name] = short_reason(exc)
        if len(outputs) < self.model.quorum:
            detail = "; ".join(f"{n} ({why})" for n, why in failures.items())
            raise QuorumError(
                f"ensemble {self.model.name!r}: {len(outputs)} of {len(members)} members answered, "
                f"quorum is {self.model.quorum}; failing: {detail}"
            )
        return outputs

    # -- typed signatures ---------------------------------------------------------------------

    @property
    def bounds(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Id ranges checked before the model, from ``range`` or the embedding tables' sizes (the
        smallest table over the members)."""
        cached = getattr(self, "_bounds", None)
        if cached is None:
            sig = self.model.spec.signature
            cached = {}
            if sig is not None:
                for module, m in zip(self.modules, self.model.members, strict=True):
                    got = engines.id_bounds(module, model_cache.member_path(m), sig, f"model {m.name!r}")
                    for name, (lo, hi) in got.items():
                        if name in cached:
                            lo, hi = np.maximum(lo, cached[name][0]), np.minimum(hi, cached[name][1])
                        cached[name] = (lo, hi)
            self._bounds = cached
        return cached

    def run_typed(self, index: int, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One member's outputs for one call, by output name (labels still as class scores)."""
        sig = self.model.spec.signature
        assert sig is not None
        name = self.model.members[index].name
        raw = engines.call(self.modules[index], arrays, sig, self.device)
        rows = len(next(iter(arrays.values())))
        return {
            o.name: typed_output(o, raw.get(o.source if o.source is not None else pos, name), rows, name)
            for pos, o in enumerate(sig.outputs)
        }

    def predict_typed(
        self, arrays: dict[str, np.ndarray], *, pool: Executor | None = None
    ) -> TypedPrediction:
        if not self.model.is_ensemble:
            return TypedPrediction(self.run_typed(0, arrays))
        outputs = self.run_members(lambda i: self.run_typed(i, arrays), pool)
        return combine_typed(self.model, outputs)


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


@dataclass
class _Budget:
    """The extra model calls a batch may still make to bisect a failure."""

    left: int
    used: int = 0


def bisect(run: Any, rows: np.ndarray, budget: _Budget) -> list[tuple[np.ndarray, Any, str | None]]:
    """``run(rows)``; when it raises, split the rows in halves and retry each, down to single rows,
    within ``budget``. Returns (rows, result, None) for the parts that scored and (rows, None,
    reason) for the rows that fail (or that were left when the budget ran out). A
    :class:`QuorumError` (members down, not rows bad) is not bisected: it fails the batch."""
    try:
        return [(rows, run(rows), None)]
    except QuorumError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model's own error becomes the rows' reason
        # TorchScript names a raised Python exception builtins.RuntimeError: the type is enough.
        reason = MODEL_ERROR + short_reason(exc).removeprefix("builtins.")
        if len(rows) == 1 or budget.left < 2:
            return [(rows, None, reason)]
        budget.left -= 2
        budget.used += 2
        mid = len(rows) // 2
        return bisect(run, rows[:mid], budget) + bisect(run, rows[mid:], budget)


def chunks(
    sig: Signature, inputs: dict[str, Any], good: int, batch_size: int, bucket: bool
) -> list[np.ndarray]:
    """The model calls for ``good`` rows: ``batch_size`` rows each; with variable-length inputs and
    ``bucket``, the rows are sorted by length first so each call pads to its own longest row."""
    order = np.arange(good)
    if bucket:
        lengths = lengths_of(sig, inputs)
        if lengths is not None and len(lengths) > batch_size:
            order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, good, batch_size)]


def score_batch(
    batch: pa.RecordBatch | pa.Table, scorer: Scorer, *, pool: Executor | None = None
) -> pa.RecordBatch:
    """Score one batch of rows; returns only the prediction columns, row for row.

    Bad rows (null, wrong length or shape, a value the dtype cannot hold, NaN, infinite, an id out
    of range) get null predictions and a reason in ``error``; the rest of the batch is scored. When
    the model itself raises, the batch is bisected (at most ``max_bisect_calls`` extra calls) and
    each failing row gets ``model error: <the model's message>``.
    ``pool`` runs ensemble members in parallel (see :meth:`Scorer.predict`).
    """
    spec = scorer.model.spec
    sig = spec.signature
    if sig is not None:
        return _score_typed(batch, scorer, sig, pool)
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
    pred = None
    if len(feats.matrix):
        budget = _Budget(spec.max_bisect_calls)
        parts = bisect(
            lambda r: scorer.predict(feats.matrix[r], pool=pool), np.arange(len(feats.matrix)), budget
        )
        if len(parts) == 1 and parts[0][2] is None:
            pred = parts[0][1]
        else:
            feats, pred = _merge_parts(feats, parts, budget)
    return pa.RecordBatch.from_arrays(assemble(scorer.model, feats, pred), schema=output_schema(scorer.model))


def _merge_parts(
    feats: Features, parts: list[tuple[np.ndarray, Any, str | None]], budget: _Budget
) -> tuple[Features, Prediction | None]:
    """The scored parts of a bisected batch as one prediction, the failed rows as errors."""
    good_rows = np.flatnonzero(feats.valid)
    valid = feats.valid.copy()
    errors: list[str | None] = list(feats.errors) if feats.errors is not None else [None] * len(valid)
    failed = 0
    for rows, _, reason in parts:
        if reason is not None:
            for r in good_rows[rows]:
                valid[r] = False
                errors[r] = reason
            failed += len(rows)
    STATS.add(failed, budget.used)
    scored = [(rows, p) for rows, p, reason in parts if reason is None]
    matrix = feats.matrix[np.concatenate([r for r, _ in scored])] if scored else feats.matrix[:0]
    new_feats = Features(matrix, valid, errors)
    if not scored:
        return new_feats, None
    order = np.argsort(np.concatenate([r for r, _ in scored]), kind="stable")
    preds = [p for _, p in scored]
    values = np.concatenate([p.values for p in preds])[order]
    labels = None if preds[0].labels is None else np.concatenate([p.labels for p in preds])[order]
    members = {k: np.concatenate([p.members[k] for p in preds])[order] for k in preds[0].members}
    missing = tuple(dict.fromkeys(m for p in preds for m in p.missing))
    return new_feats, Prediction(values, labels, missing, members)


def _score_typed(
    batch: pa.RecordBatch | pa.Table, scorer: Scorer, sig: Signature, pool: Executor | None
) -> pa.RecordBatch:
    spec = scorer.model.spec
    dec = decode_arrow(batch, sig, scorer.bounds)
    good_rows = np.flatnonzero(dec.valid)
    g = len(good_rows)
    results: dict[str, np.ndarray] = {}
    errors = list(dec.errors) if dec.errors is not None else None
    scored = np.zeros(g, dtype=bool)
    missing: dict[str, None] = {}
    budget = _Budget(spec.max_bisect_calls)
    failed = 0
    for chunk in chunks(sig, dec.inputs, g, spec.batch_size, spec.bucket_by_length):
        parts = bisect(lambda r: scorer.predict_typed(take(sig, dec.inputs, r), pool=pool), chunk, budget)
        for rows, pred, reason in parts:
            if reason is not None:
                errors = errors if errors is not None else [None] * dec.num_rows
                for r in good_rows[rows]:
                    errors[r] = reason
                failed += len(rows)
                continue
            scored[rows] = True
            missing.update(dict.fromkeys(pred.missing))
            for o in sig.outputs:
                y = finish_output(o, pred.values[o.name])
                if o.name not in results:
                    results[o.name] = np.zeros((g, *y.shape[1:]), dtype=y.dtype)
                elif results[o.name].shape[1:] != y.shape[1:]:
                    raise ValueError(
                        f"output {o.name!r} is {list(y.shape[1:])} wide for some rows and "
                        f"{list(results[o.name].shape[1:])} for others; a vector output needs a fixed width"
                    )
                results[o.name][rows] = y
    if failed or budget.used:
        STATS.add(failed, budget.used)
    n = dec.num_rows
    ok = np.zeros(n, dtype=bool)
    ok[good_rows[scored]] = True
    invalid = None if ok.all() else ~ok
    cols: list[pa.Array] = []
    for o in sig.outputs:
        t = OUTPUT_TYPES[o.kind]
        got = results.get(o.name)
        if o.kind in ("score", "label"):
            full = np.zeros(n, dtype=np.float64 if o.kind == "score" else np.int32)
            if got is not None:
                full[good_rows] = got
            cols.append(pa.array(full, t, mask=invalid))
        else:
            k = got.shape[1] if got is not None else 0
            full2 = np.zeros((n, k), dtype=np.float32)
            if got is not None:
                full2[good_rows] = got
            offsets = pa.array(np.arange(n + 1, dtype=np.int32) * k)
            cols.append(
                pa.ListArray.from_arrays(
                    offsets,
                    pa.array(full2.reshape(-1), pa.float32()),
                    mask=None if invalid is None else pa.array(invalid),
                )
            )
    cols.append(pa.repeat(pa.scalar(scorer.model.version, pa.string()), n))
    cols.append(pa.nulls(n, pa.string()) if errors is None else pa.array(errors, pa.string()))
    if scorer.model.is_ensemble:
        lost = tuple(missing)
        cols.append(pa.array(np.full(n, bool(lost)), pa.bool_(), mask=invalid))
        cols.append(pa.array([",".join(lost) if lost else None] * n, pa.string(), mask=invalid))
    return pa.RecordBatch.from_arrays(cols, schema=output_schema(scorer.model))


def check_input(schema: pa.Schema, model: ResolvedModel) -> None:
    """Fail before scoring when data of this Arrow schema cannot feed the model (one sentence)."""
    spec = model.spec
    if spec.signature is not None:
        check_schema(schema, spec.signature)
    else:
        check_columns(schema, spec.input_columns, spec.num_features)


def check_model(model: ResolvedModel) -> None:
    """Load every model file on the driver's CPU and score one row of zeros, so a corrupt file or
    an output that does not match ``output`` stops the job before any data is read."""
    spec = model.spec
    modules = tuple(
        model_cache.load_module(model_cache.member_path(m), m.format, "cpu") for m in model.members
    )
    probe = Scorer(model=model, device="cpu", modules=modules)
    if spec.signature is not None:
        _check_typed(probe, spec.signature)
        return
    width = spec.num_features if spec.num_features is not None else len(spec.input_columns)
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


def probe_inputs(
    sig: Signature, bounds: dict[str, tuple[np.ndarray, np.ndarray]], rows: int = 1
) -> dict[str, np.ndarray]:
    """``rows`` rows of the lowest valid value of every input (length 2 for a variable one)."""
    from udfs.signature import NUMPY

    out: dict[str, np.ndarray] = {}
    for spec in sig.inputs:
        dims = tuple(2 if d == -1 else d for d in sig.dims(spec))
        if spec.mask_of is not None:
            out[spec.name] = np.ones((rows, *dims), dtype=NUMPY[spec.dtype])
            continue
        lo = bounds.get(spec.name, (np.zeros(1), None))[0]
        out[spec.name] = np.full((rows, *dims), max(0, int(lo.max())), dtype=NUMPY[spec.dtype])
    return out


def _check_typed(probe: Scorer, sig: Signature) -> None:
    for i, m in enumerate(probe.model.members):
        what = f"model {m.name!r} ({m.path})"
        fixed = fixed_batch_size(probe.modules[i])
        if fixed is not None:
            raise ModelLoadError(
                f"{what} was exported with a fixed batch size of {fixed}; export it with a dynamic batch "
                "dimension (dynamic_shapes with torch.export.Dim('batch') for every input)"
            )
        engines.check_declared(probe.modules[i], sig, what)
    bounds = probe.bounds  # raises for an embedding table the model does not have
    arrays = probe_inputs(sig, bounds)
    for i, m in enumerate(probe.model.members):
        try:
            probe.run_typed(i, arrays)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - any engine error here is a signature/model mismatch
            raise ModelLoadError(
                f"model {m.name!r} ({m.path}) fails on a row of zeros shaped as [[model.inputs]] says: "
                f"{short_reason(exc)}; check the inputs' order, dtype and shape against the model"
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
