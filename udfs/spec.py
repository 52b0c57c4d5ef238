"""The model spec: which model, which input columns, which output.

A :class:`ModelSpec` is what a user writes in the ``[model]`` table of any
config. :func:`resolve` turns it into a :class:`ResolvedModel` on the driver:
the file is checked and hashed once, so what travels to executors is a small
picklable record with the version already decided.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from udfs.errors import ConfigError, ModelLoadError

OutputKind = Literal["score", "probabilities"]
Activation = Literal["none", "sigmoid", "softmax"]

MODEL_SUFFIXES = {".pt": "torchscript", ".jit": "torchscript", ".pt2": "export"}


@dataclass(frozen=True)
class ModelSpec:
    """One model as configured by the user (``[model]`` in a TOML config).

    ``input_columns`` is either a single fixed-length ``array<float>`` column
    (then ``num_features`` says its length) or a list of numeric columns.
    """

    path: str
    input_columns: tuple[str, ...]
    name: str = "model"
    version: str | None = None
    output: OutputKind = "score"
    activation: Activation = "none"
    num_features: int | None = None
    device: str = "auto"
    batch_size: int = 4096
    cache_size: int = 4

    def __post_init__(self) -> None:
        if not self.input_columns:
            raise ValueError("input_columns must name at least one column")
        if len(set(self.input_columns)) != len(self.input_columns):
            raise ValueError(f"input_columns has duplicates: {list(self.input_columns)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {self.cache_size}")
        if self.num_features is not None and self.num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {self.num_features}")
        if (
            self.num_features is not None
            and len(self.input_columns) > 1
            and self.num_features != len(self.input_columns)
        ):
            raise ValueError(
                f"num_features={self.num_features} but {len(self.input_columns)} input "
                "columns are listed; drop num_features for a list of numeric columns"
            )
        if self.device != "auto" and not (
            self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")
        ):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")


@dataclass(frozen=True)
class ResolvedModel:
    """A checked model spec: small, picklable, safe to ship to executors."""

    spec: ModelSpec
    content_hash: str
    version: str
    format: str

    @property
    def name(self) -> str:
        return self.spec.name


def file_hash(path: str | Path) -> str:
    """SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_format(path: str | Path) -> str:
    """'torchscript' or 'export' from the file suffix; 'auto' lets the loader try both."""
    return MODEL_SUFFIXES.get(Path(path).suffix.lower(), "auto")


def resolve(spec: ModelSpec) -> ResolvedModel:
    """Check the model file exists, hash it and fix the version (driver side)."""
    path = Path(spec.path)
    if not path.exists():
        raise ModelLoadError(f"model file {spec.path!r} does not exist")
    if not path.is_file():
        raise ModelLoadError(f"model path {spec.path!r} is not a file")
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"model file {spec.path!r} is not readable")
    digest = file_hash(path)
    version = spec.version or digest[:12]
    return ResolvedModel(spec=spec, content_hash=digest, version=version, format=model_format(path))


def with_overrides(spec: ModelSpec, *, path: str | None = None) -> ModelSpec:
    """The spec with command-line overrides applied (a new model file drops the pinned version)."""
    if path is None:
        return spec
    if not path:
        raise ConfigError("--model must name a file")
    return replace(spec, path=path, version=None if spec.path != path else spec.version)
