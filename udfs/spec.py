"""The model spec: which model (or ensemble), which input columns, which output.

A :class:`ModelSpec` is what a user writes in the ``[model]`` table of any
config: either one model file (``path``) or an ensemble (``[[model.members]]``
with weights and a ``combiner``). :func:`resolve` turns it into a
:class:`ResolvedModel` on the driver: files are checked and hashed once and the
version is fixed, so what travels to executors is a small picklable record.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from udfs import model_store
from udfs.errors import ConfigError, ModelLoadError
from udfs.model_store import StoreRef
from udfs.signature import InputSpec, OutputSpec, Signature

OutputKind = Literal["score", "probabilities"]
Activation = Literal["none", "sigmoid", "softmax"]
Combiner = Literal["weighted_mean", "majority_vote"]
# "auto": from the file suffix (MODEL_SUFFIXES), else TorchScript then torch.export.
ModelFormat = Literal["auto", "torchscript", "export", "onnx"]

MODEL_SUFFIXES = {".pt": "torchscript", ".jit": "torchscript", ".pt2": "export", ".onnx": "onnx"}


@dataclass(frozen=True)
class MemberSpec:
    """One member of an ensemble (``[[model.members]]``)."""

    path: str
    name: str = ""  # default: the file's stem
    version: str | None = None
    weight: float = 1.0
    format: ModelFormat = "auto"  # default: the ensemble's format, else from the suffix

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(
                f"member {self.name or self.path!r} has weight {self.weight}; weights must be >= 0"
            )


@dataclass(frozen=True)
class ModelSpec:
    """One model or an ensemble, as configured by the user (``[model]`` in a TOML config).

    ``input_columns`` is either a single fixed-length ``array<float>`` column
    (then ``num_features`` says its length) or a list of numeric columns. ``path`` is a model
    file or a model URI (``models:/ctr@champion``, ``s3://...``: see :mod:`udfs.model_store`);
    an MLflow model's signature fills ``input_columns`` (and ``num_features``) when they are
    left out, and is checked against them when they are given.
    ``[[model.inputs]]`` / ``[[model.outputs]]`` instead give the model's typed signature
    (:mod:`udfs.signature`): several named inputs of their own dtype and shape, and several outputs.
    """

    input_columns: tuple[str, ...] = ()
    path: str | None = None
    name: str = "model"
    version: str | None = None
    format: ModelFormat = "auto"  # from the suffix; "onnx" scores with ONNX Runtime
    output: OutputKind = "score"
    activation: Activation = "none"
    num_features: int | None = None
    device: str = "auto"
    batch_size: int = 4096
    cache_size: int = 4
    # Ensembles: members instead of path.
    members: tuple[MemberSpec, ...] = ()
    combiner: Combiner = "weighted_mean"
    quorum: int | None = None  # members that must answer; default all
    member_timeout_ms: float | None = None  # per member, where members run in parallel
    member_outputs: bool = False  # add each member's prediction as its own column
    # Models from MLflow / object storage (udfs.model_store).
    registry_uri: str | None = (
        None  # default: MLFLOW_REGISTRY_URI / MLFLOW_TRACKING_URI / sqlite:///mlflow.db
    )
    cache_dir: str | None = None  # per-host download cache; default $SPARKSCORE_MODEL_CACHE or ~/.cache
    # The typed signature (instead of input_columns / num_features / output / activation).
    inputs: tuple[InputSpec, ...] = ()
    outputs: tuple[OutputSpec, ...] = ()
    call: Literal["positional", "keyword"] = "positional"  # how a torch model takes its inputs
    # When the model raises for a batch, the batch is bisected to find the failing rows; these are
    # the most extra model calls one batch may make (the rows still unresolved then get the error).
    max_bisect_calls: int = 64
    # Variable-length inputs: sort a batch's rows by length before cutting it into model calls,
    # so each call pads to its own longest row.
    bucket_by_length: bool = True

    def __post_init__(self) -> None:
        # Built once: the scoring core reads it for every batch.
        object.__setattr__(
            self,
            "_signature",
            Signature(self.inputs, self.outputs or (OutputSpec(name="prediction"),), self.call)
            if self.inputs
            else None,
        )
        if self.inputs:
            self._check_signature()
        elif self.outputs:
            raise ValueError("[[model.outputs]] goes with [[model.inputs]]; list the inputs too")
        elif not self.input_columns and not (self.path and model_store.is_store_uri(self.path)):
            raise ValueError(
                "input_columns must name at least one column (or give [[model.inputs]]; only an MLflow "
                "model's signature can fill input_columns)"
            )
        if self.max_bisect_calls < 0:
            raise ValueError(f"max_bisect_calls must be >= 0, got {self.max_bisect_calls}")
        if self.output == "score" and self.activation == "softmax":
            raise ValueError(
                "output = 'score' with activation = 'softmax' makes every prediction 1.0 (softmax over "
                "one value); use activation = 'sigmoid', or output = 'probabilities' for a classifier"
            )
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
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        self._check_ensemble()

    def _check_signature(self) -> None:
        if self.input_columns or self.num_features is not None:
            raise ValueError(
                "give either [[model.inputs]] or input_columns / num_features (the one-input shorthand), not both"
            )
        if self.output != "score" or self.activation != "none":
            raise ValueError(
                "with [[model.inputs]], set kind and activation on each [[model.outputs]] instead of "
                "output / activation"
            )
        if self.member_outputs:
            raise ValueError("member_outputs applies to input_columns models; drop it with [[model.inputs]]")
        sig = self.signature
        assert sig is not None
        if self.members and self.combiner == "majority_vote":
            voted = [o.name for o in sig.outputs if o.kind not in ("probabilities", "label")]
            if voted:
                raise ValueError(
                    f"combiner 'majority_vote' votes on labels; output(s) {voted} are scores or vectors "
                    "(use combiner = 'weighted_mean')"
                )

    @property
    def signature(self) -> Signature | None:
        """The typed signature, or None for the one-input shorthand."""
        return self._signature  # type: ignore[attr-defined, no-any-return]

    @property
    def columns(self) -> tuple[str, ...]:
        """Every data column the model reads, in order."""
        sig = self.signature
        return sig.columns if sig is not None else self.input_columns

    def _check_ensemble(self) -> None:
        if (self.path is None) == (not self.members):
            raise ValueError(
                "give either path (one model) or [[model.members]] (an ensemble), not both or neither"
            )
        if not self.members:
            for key in ("quorum", "member_timeout_ms"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} applies to ensembles only; add [[model.members]] or drop it")
            return
        if self.version is not None:
            raise ValueError(
                "an ensemble's version is derived from its members' versions and weights; drop version"
            )
        names = [m.name for m in self.member_specs]
        if len(set(names)) != len(names):
            raise ValueError(f"ensemble member names must be unique, got {names}")
        total = sum(m.weight for m in self.members)
        if total <= 0:
            raise ValueError(f"ensemble weights sum to {total}; the total weight must be positive")
        if self.quorum is not None and not 1 <= self.quorum <= len(self.members):
            raise ValueError(f"quorum must be between 1 and {len(self.members)} members, got {self.quorum}")
        if self.combiner == "majority_vote" and self.output != "probabilities" and not self.inputs:
            raise ValueError("combiner 'majority_vote' votes on labels: set output = 'probabilities'")
        if self.member_timeout_ms is not None and self.member_timeout_ms <= 0:
            raise ValueError(f"member_timeout_ms must be positive, got {self.member_timeout_ms}")

    @property
    def is_ensemble(self) -> bool:
        return bool(self.members)

    @property
    def member_specs(self) -> tuple[MemberSpec, ...]:
        """The members with names filled in; a single model is an ensemble of one."""
        if not self.members:
            return (
                MemberSpec(path=self.path or "", name=self.name, version=self.version, format=self.format),
            )
        return tuple(
            replace(
                m, name=m.name or Path(m.path).stem, format=m.format if m.format != "auto" else self.format
            )
            for m in self.members
        )

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(m.path for m in self.member_specs)


@dataclass(frozen=True)
class ResolvedMember:
    """A checked model file: its content hash, version and normalised weight."""

    name: str
    path: str
    content_hash: str
    version: str
    format: str
    weight: float
    store: StoreRef | None = None  # a model from MLflow / object storage: where executors fetch it
    # Every local file the model is made of: the model file, then an ONNX model's external data files.
    files: tuple[str, ...] = ()


@dataclass(frozen=True)
class ResolvedModel:
    """A checked model spec: small, picklable, safe to ship to executors."""

    spec: ModelSpec
    version: str
    members: tuple[ResolvedMember, ...]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def is_ensemble(self) -> bool:
        return self.spec.is_ensemble

    @property
    def content_hash(self) -> str:
        """The model file's hash (for an ensemble, a hash over its members' hashes)."""
        if len(self.members) == 1 and not self.is_ensemble:
            return self.members[0].content_hash
        return hashlib.sha256("".join(m.content_hash for m in self.members).encode()).hexdigest()

    @property
    def format(self) -> str:
        formats = {m.format for m in self.members}
        return formats.pop() if len(formats) == 1 else "mixed"

    @property
    def quorum(self) -> int:
        return self.spec.quorum or len(self.members)


def file_hash(path: str | Path) -> str:
    """SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def onnx_external_data(path: str | Path) -> tuple[str, ...]:
    """The external data files an ONNX model's tensors name (``save_as_external_data``: weights in
    ``model.onnx.data`` beside the graph), as paths beside the model; () when it keeps them inside."""
    try:
        import onnx
        from onnx.external_data_helper import _get_all_tensors, uses_external_data
    except ImportError:  # without onnx the weights cannot be listed; ONNX Runtime still loads them
        return ()
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a readable ONNX file: the loader says so in its own words
        return ()
    locations: dict[str, None] = {}
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            info = {e.key: e.value for e in tensor.external_data}
            if "location" in info:
                locations[info["location"]] = None
    base = Path(path).parent
    return tuple(str(base / loc) for loc in locations)


def model_files(path: str, fmt: str) -> tuple[str, ...]:
    """The model file and, for ONNX, its external data files; one sentence when one is missing."""
    if fmt != "onnx":
        return (path,)
    data = onnx_external_data(path)
    for f in data:
        if not Path(f).is_file():
            raise ModelLoadError(
                f"model file {path!r} keeps its weights in the external data file {f!r}, which does "
                "not exist; keep it beside the .onnx file (and ship both with spark-submit --files)"
            )
    return (path, *data)


def files_hash(files: tuple[str, ...]) -> str:
    """A model's content hash: the file's own SHA-256, or, with external data, one over every file's
    name (relative to the model) and hash, so new weights make a new version."""
    if len(files) == 1:
        return file_hash(files[0])
    base = Path(files[0]).parent
    payload = [[os.path.relpath(f, base), file_hash(f)] for f in files]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def model_format(path: str | Path, configured: str = "auto") -> str:
    """The configured format, else 'torchscript', 'export' or 'onnx' from the file suffix; 'auto'
    lets the loader try TorchScript then torch.export."""
    if configured != "auto":
        return configured
    return MODEL_SUFFIXES.get(Path(path).suffix.lower(), "auto")


def _check_file(path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model file {path!r} does not exist")
    if not p.is_file():
        raise ModelLoadError(f"model path {path!r} is not a file")
    if not os.access(p, os.R_OK):
        raise ModelLoadError(f"model file {path!r} is not readable")


def ensemble_version(members: tuple[ResolvedMember, ...], combiner: str) -> str:
    """A version derived from the members' versions and weights: change either and it changes."""
    payload = json.dumps(
        {"combiner": combiner, "members": [[m.name, m.version, round(m.weight, 12)] for m in members]},
        sort_keys=True,
    )
    return "ens-" + hashlib.sha256(payload.encode()).hexdigest()[:12]


def resolve(spec: ModelSpec) -> ResolvedModel:
    """Check every model file exists, hash it and fix the versions (driver side).

    A model URI is resolved here, once: the registry is asked, an alias becomes a version, the
    artifacts are downloaded into this host's cache and hashed (:func:`udfs.model_store.resolve_ref`).
    """
    specs = spec.member_specs
    total = sum(m.weight for m in specs)
    members = []
    for m in specs:
        if model_store.is_store_uri(m.path):
            ref, _ = model_store.resolve_ref(m.path, registry_uri=spec.registry_uri, cache_dir=spec.cache_dir)
            members.append(
                ResolvedMember(
                    name=m.name,
                    path=m.path,
                    content_hash=ref.content_hash,
                    version=m.version or ref.version,
                    format=ref.format if m.format == "auto" else m.format,
                    weight=m.weight / total,
                    store=ref,
                )
            )
            continue
        _check_file(m.path)
        fmt = model_format(m.path, m.format)
        files = model_files(m.path, fmt)
        digest = files_hash(files)
        members.append(
            ResolvedMember(
                name=m.name,
                path=m.path,
                content_hash=digest,
                version=m.version or digest[:12],
                format=fmt,
                weight=m.weight / total,
                files=files,
            )
        )
    resolved = tuple(members)
    if not spec.is_ensemble and resolved[0].store is not None and not spec.inputs:
        spec = fill_from_signature(spec, resolved[0].store)
    elif not spec.input_columns and not spec.inputs:
        raise ConfigError("input_columns must name at least one column for an ensemble")
    version = ensemble_version(resolved, spec.combiner) if spec.is_ensemble else resolved[0].version
    return ResolvedModel(spec=spec, version=version, members=resolved)


_MLFLOW_DTYPES = {
    "float32": "float32",
    "float64": "float64",
    "int64": "int64",
    "int32": "int32",
    "bool": "bool",
}


def _typed(sig: model_store.Signature) -> bool:
    """Whether an MLflow tensor signature needs the typed form: several named tensors, or one that is
    not a [batch, N] float32 matrix (the input_columns shorthand covers that one)."""
    if not sig.tensors:
        return False
    if len(sig.tensors) > 1:
        return True
    _, dtype, shape = sig.tensors[0]
    return dtype != "float32" or len(shape) != 2


def typed_inputs(sig: model_store.Signature, where: str) -> tuple[InputSpec, ...]:
    """MLflow's named tensors as typed inputs ([[model.inputs]]): each read from the column of its
    name, with its dtype and per-row shape (a -1 after the batch dimension: a variable length)."""
    out = []
    for name, dtype, shape in sig.tensors:
        if dtype not in _MLFLOW_DTYPES:
            raise ModelLoadError(
                f"{where} takes tensor {name!r} of dtype {dtype} by its signature; sparkscore feeds "
                f"{', '.join(_MLFLOW_DTYPES)}: declare [[model.inputs]] yourself"
            )
        row = tuple(shape[1:])
        if -1 in row[1:]:
            raise ModelLoadError(
                f"{where} takes tensor {name!r} of shape {list(shape)}: only the first per-row dimension may "
                "vary; declare [[model.inputs]] yourself"
            )
        out.append(InputSpec(name=name, column=name, dtype=_MLFLOW_DTYPES[dtype], shape=row))  # type: ignore[arg-type]
    return tuple(out)


def fill_from_signature(spec: ModelSpec, ref: StoreRef) -> ModelSpec:
    """The spec with ``input_columns`` / ``num_features`` filled from the model's MLflow signature,
    or checked against it when the config gives them; one sentence when they do not fit."""
    sig = model_store.parse_signature(ref)
    where = f"model {ref.describe}"
    if sig is not None and not spec.input_columns and _typed(sig):
        return replace(spec, inputs=typed_inputs(sig, where))
    if sig is None:
        if not spec.input_columns:
            raise ModelLoadError(
                f"{where} was logged without a signature; set input_columns (and num_features for an "
                "array column) in [model], or log it with a signature"
            )
        return spec
    if sig.output_width is not None and sig.output_width > 1 and spec.output == "score":
        raise ModelLoadError(
            f"{where} returns {sig.output_width} values per row by its signature; set output = 'probabilities'"
        )
    if sig.columns:
        if not spec.input_columns:
            return replace(spec, input_columns=sig.columns)
        unknown = [c for c in spec.input_columns if c not in sig.columns]
        absent = [c for c in sig.columns if c not in spec.input_columns]
        if unknown or absent:
            raise ModelLoadError(
                f"{where} takes columns {list(sig.columns)} by its signature, but input_columns is "
                f"{list(spec.input_columns)}; drop input_columns to use the signature's, or match it"
            )
        return spec
    width = sig.tensor_width
    if width is None:
        if not spec.input_columns:
            raise ModelLoadError(
                f"{where} has a tensor signature without a fixed width; set input_columns (and num_features)"
            )
        return spec
    if not spec.input_columns:
        raise ModelLoadError(
            f"{where} takes one [batch, {width}] tensor by its signature, which names no columns; set "
            f"input_columns to one array column (num_features is filled from the signature) or {width} "
            "numeric columns"
        )
    if len(spec.input_columns) == 1 and width > 1:
        if spec.num_features not in (None, width):
            raise ModelLoadError(
                f"{where} takes {width} features by its signature, but num_features = {spec.num_features}"
            )
        return replace(spec, num_features=width)
    got = spec.num_features or len(spec.input_columns)
    if got != width:
        raise ModelLoadError(
            f"{where} takes {width} features by its signature, but the config gives {got} "
            f"(input_columns = {list(spec.input_columns)})"
        )
    return spec


def with_overrides(
    spec: ModelSpec, *, path: str | None = None, member_outputs: bool | None = None
) -> ModelSpec:
    """The spec with command-line overrides applied (a new model file drops the pinned version)."""
    if member_outputs is not None:
        if not spec.is_ensemble:
            raise ConfigError("--member-outputs applies to ensembles; this config has a single model")
        spec = replace(spec, member_outputs=member_outputs)
    if path is None:
        return spec
    if not path:
        raise ConfigError("--model must name a model file or URI")
    if spec.is_ensemble:
        raise ConfigError(
            "--model replaces a single model; this config is an ensemble, edit [[model.members]]"
        )
    if spec.path == path:
        return spec
    # A new file drops the pinned version; a known suffix decides its format again.
    # A URI's format comes from its MLflow flavor or suffix.
    fmt = spec.format if model_format(path) == "auto" and not model_store.is_store_uri(path) else "auto"
    return replace(spec, path=path, version=None, format=fmt)
