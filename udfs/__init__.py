"""sparkscore's scoring core: one function scores a batch for every path (batch, stream, real-time)."""

from udfs.core import Scorer, load_scorer, output_schema, score_batch
from udfs.spec import ModelSpec, ResolvedModel, resolve

__all__ = ["ModelSpec", "ResolvedModel", "Scorer", "load_scorer", "output_schema", "resolve", "score_batch"]
