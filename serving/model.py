"""The scorer's model: rows of feature values in, per-row prediction dicts out.

:meth:`ModelRunner.score` is the function the batcher calls on a worker
thread. It builds one Arrow batch per micro-batch in the model spec's input
layout (named numeric columns, or one fixed-length array column) and scores it
with :func:`udfs.core.score_batch`, the same function the Spark jobs call, so a
row gets the same prediction and a bad row the same error reason on every path.
Results are generic: every column that :func:`udfs.core.output_schema` lists
(an ensemble adds ``degraded`` and ``missing_members``) comes back by name.

An ensemble's members run in parallel on a thread pool of the runner's own,
one thread per member for each micro-batch that may compute at once (``[batcher]
workers`` x members, so a batch's members never queue behind another batch's and
``member_timeout_ms`` measures the member, not the queue) unless ``[batcher] parallel_members = false``: then
there is no pool and the members run one after another on the inference thread.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from serving.config import ServeConfig
from udfs.core import Scorer, load_scorer, output_schema, score_batch
from udfs.signature import rows_to_batch, zero_row
from udfs.spec import ResolvedModel, resolve

log = logging.getLogger("serving.model")

Row = tuple[Any, ...]  # one value per input column (a list of floats for an array column)


class ModelRunner:
    """Loads the model once, warms it up, and scores micro-batches through the core."""

    def __init__(
        self,
        model: ResolvedModel,
        *,
        warmup_sizes: tuple[int, ...] = (1, 8),
        parallel_members: bool = True,
        concurrent_batches: int = 2,
    ) -> None:
        spec = model.spec
        self.model = model
        # A typed signature ([[model.inputs]]): a row holds one value per data column the inputs read.
        self.signature = spec.signature
        self.columns = spec.columns
        # One array column of num_features values, or one scalar column per feature.
        self.array_layout = (
            self.signature is None and len(spec.input_columns) == 1 and spec.num_features is not None
        )
        value_type = pa.list_(pa.float64()) if self.array_layout else pa.float64()
        self.input_schema = pa.schema([pa.field(c, value_type) for c in self.columns])
        self.output_names = output_schema(model).names
        self.warmup_sizes = warmup_sizes
        self.parallel_members = parallel_members
        self.concurrent_batches = concurrent_batches
        self.scorer: Scorer | None = None
        self._member_pool: ThreadPoolExecutor | None = None

    @classmethod
    def from_config(cls, cfg: ServeConfig, model: ResolvedModel | None = None) -> ModelRunner:
        """The runner ``cfg`` describes: warm-up sizes and member parallelism from ``[batcher]``."""
        return cls(
            model or resolve(cfg.model),
            warmup_sizes=(1, cfg.batcher.max_batch_size),
            parallel_members=cfg.batcher.parallel_members,
            concurrent_batches=cfg.batcher.workers,
        )

    @property
    def version(self) -> str:
        return self.model.version

    @property
    def width(self) -> int:
        return self.model.spec.num_features or len(self.columns)

    def load(self) -> None:
        """Load (per-process cached) and warm up: the first real request pays no first-call cost."""
        self.scorer = load_scorer(self.model)
        if self.model.is_ensemble and self.parallel_members and self._member_pool is None:
            # Members of one micro-batch run in parallel (torch releases the GIL); every batch
            # computing at once gets a thread per member.
            self._member_pool = ThreadPoolExecutor(
                len(self.model.members) * self.concurrent_batches, thread_name_prefix="member"
            )
        if self.signature is not None:
            zero: Row = zero_row(self.signature)
        else:
            zero = ([0.0] * self.width,) if self.array_layout else (0.0,) * self.width
        # TorchScript's profiling executor specialises a graph over its first few calls: make them here.
        for _ in range(3):
            for n in self.warmup_sizes:
                self.score([zero] * n)
        log.info("model %s version %s loaded and warmed up", self.model.name, self.version)

    def close(self) -> None:
        if self._member_pool is not None:
            self._member_pool.shutdown(wait=False)

    def to_batch(self, rows: list[Row]) -> pa.RecordBatch:
        if self.signature is not None:
            return rows_to_batch(self.signature, rows)
        arrays = [
            pa.array([r[j] for r in rows], type=field.type) for j, field in enumerate(self.input_schema)
        ]
        return pa.RecordBatch.from_arrays(arrays, schema=self.input_schema)

    def score(self, rows: list[Row]) -> list[dict[str, Any]]:
        """One dict of output columns per row; a bad row has its reason in ``error``."""
        if self.scorer is None:
            raise RuntimeError("the model is not loaded")
        out = score_batch(self.to_batch(rows), self.scorer, pool=self._member_pool)
        names = out.schema.names
        columns = [col.to_pylist() for col in out.columns]
        return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]
