"""sparkscore's scoring core: one function scores a batch for every path (batch, stream, real-time)."""

from typing import Any

from udfs.core import Scorer, load_scorer, output_schema, score_batch
from udfs.spec import ModelSpec, ResolvedModel, resolve

__all__ = [
    "ModelSpec",
    "ResolvedModel",
    "Scorer",
    "load_scorer",
    "output_schema",
    "predict_udf",
    "resolve",
    "score_batch",
    "with_predictions",
]

# The Spark API imports pyspark; the real-time scorer, which only needs the core, does not pay for it.
_SPARK_API = ("predict_udf", "with_predictions")


def __getattr__(name: str) -> Any:
    if name in _SPARK_API:
        from udfs import spark

        return getattr(spark, name)
    raise AttributeError(f"module 'udfs' has no attribute {name!r}")
