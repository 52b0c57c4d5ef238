"""Models kept elsewhere: the MLflow registry, MLflow model directories and object storage.

``[model] path`` (and ``--model``) may name, besides a local model file:

* ``models:/name/3``, ``models:/name@alias``, ``models:/<model_id>`` (MLflow 3's ``m-...`` ids) and
  ``runs:/<run_id>/<path>``: looked up in the MLflow registry / tracking store;
* a local MLflow model directory (one holding an ``MLmodel`` file);
* ``s3://``, ``gs://``, ``hdfs://`` and ``file://`` URIs of a model file or an MLflow model directory.

:func:`resolve_ref` runs ON THE DRIVER, once: it asks the registry (an alias becomes a concrete
version), downloads the artifacts once into this host's cache, hashes them and reads the MLflow
flavor and signature. The result is a :class:`StoreRef`: small, picklable, and holding the
artifacts' concrete location (``s3://...``, ``file:///...``), never the registry URI, so what
executors and scorer workers do with it (:func:`fetch`) never calls the registry: they download
from the concrete location once per host (a lock and an atomic rename make concurrent workers
wait for one download), check the hash, and memoise the local path once per Python worker.

The per-host cache is ``[model] cache_dir``, else ``$SPARKSCORE_MODEL_CACHE``, else
``~/.cache/sparkscore/models``: a private directory (mode 0700) with one sub-directory per content
hash. Entries are never changed in place, so a finished entry is safe to read without the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from udfs.errors import ModelLoadError

log = logging.getLogger(__name__)

# Schemes whose URIs are fetched through MLflow's artifact repositories.
OBJECT_SCHEMES = ("s3", "gs", "hdfs", "file")
RefKind = Literal["registry", "model_id", "runs", "mlflow_dir", "object"]
COMPLETE = ".sparkscore-complete"  # written last into a cache entry: the download finished

_MODEL_ID = re.compile(r"m-[0-9a-f]{16,}")
_VERSION = re.compile(r"\d+")


class ModelStoreError(ModelLoadError):
    """A model URI is malformed, unknown, unreachable, or its artifacts cannot be fetched or scored."""


@dataclass(frozen=True)
class ParsedUri:
    """What a model URI names, before anything is asked."""

    kind: RefKind
    uri: str
    name: str = ""  # registered model name
    version: str = ""  # registry version (models:/name/3)
    alias: str = ""  # registry alias (models:/name@champion)
    model_id: str = ""  # MLflow 3 logged model id
    run_id: str = ""
    artifact_path: str = ""


@dataclass(frozen=True)
class StoreRef:
    """A resolved model in a store: where its bytes are and what they are (picklable, no client)."""

    uri: str  # as configured: models:/ctr@champion
    location: str  # the artifacts' concrete URI (file:///..., s3://...): executors download this
    content_hash: str  # sha256 over the artifacts (a single file: its sha256, as for a local path)
    format: str  # torchscript, export, pytorch (pickled module), onnx, pyfunc, auto
    model_file: str = ""  # inside the download: the file the engine loads ("" = the download itself)
    is_dir: bool = False  # the location is a directory (an MLflow model) rather than one file
    registry_name: str = ""
    registry_version: str = ""  # the concrete version an alias resolved to
    alias: str = ""
    flavors: tuple[str, ...] = ()
    signature_inputs: str = ""  # the MLflow signature's JSON (MLmodel signature.inputs), if any
    signature_outputs: str = ""
    code_paths: tuple[str, ...] = ()  # inside the download: code the pickled model imports
    cache_dir: str | None = None  # the configured per-host cache (None: the host's default)

    @property
    def version(self) -> str:
        """The model_version every prediction carries: registry version plus hash, else the hash."""
        short = self.content_hash[:12]
        return f"{self.registry_version}+{short}" if self.registry_version else short

    @property
    def describe(self) -> str:
        """``models:/ctr@champion (version 3, pytorch)`` for start-up lines and errors."""
        parts = []
        if self.registry_version:
            parts.append(f"version {self.registry_version}")
        if self.flavors:
            parts.append("/".join(self.flavors))
        return f"{self.uri} ({', '.join(parts)})" if parts else self.uri


def scheme(path: str) -> str:
    m = re.match(r"([a-zA-Z][a-zA-Z0-9+.-]*):", path)
    return m.group(1).lower() if m else ""


def is_store_uri(path: str) -> bool:
    """Whether ``path`` needs the store (a URI or an MLflow model directory) rather than a plain file."""
    if scheme(path) in ("models", "runs", *OBJECT_SCHEMES):
        return True
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "MLmodel"))


def parse_uri(uri: str) -> ParsedUri:
    """Parse a model URI; one sentence when it is malformed."""
    s = scheme(uri)
    if s == "models":
        rest = uri[len("models:") :].lstrip("/")
        if "@" in rest:
            name, _, alias = rest.partition("@")
            if not name or not alias or "/" in alias:
                raise ModelStoreError(f"model URI {uri!r} is malformed; write models:/<name>@<alias>")
            return ParsedUri("registry", uri, name=name, alias=alias)
        if "/" in rest:
            name, _, version = rest.rpartition("/")
            if not name or not _VERSION.fullmatch(version):
                raise ModelStoreError(
                    f"model URI {uri!r} is malformed; write models:/<name>/<version number> or "
                    "models:/<name>@<alias>"
                )
            return ParsedUri("registry", uri, name=name, version=version)
        if _MODEL_ID.fullmatch(rest):
            return ParsedUri("model_id", uri, model_id=rest)
        raise ModelStoreError(
            f"model URI {uri!r} names no version; write models:/{rest or '<name>'}/<version> or "
            f"models:/{rest or '<name>'}@<alias> (or models:/<model_id> for a logged model)"
        )
    if s == "runs":
        rest = uri[len("runs:") :].lstrip("/")
        run_id, _, path = rest.partition("/")
        if not run_id or not path:
            raise ModelStoreError(f"model URI {uri!r} is malformed; write runs:/<run_id>/<artifact path>")
        return ParsedUri("runs", uri, run_id=run_id, artifact_path=path.strip("/"))
    if s in OBJECT_SCHEMES:
        return ParsedUri("object", uri)
    if is_store_uri(uri):
        return ParsedUri("mlflow_dir", uri)
    raise ModelStoreError(f"model path {uri!r} is not a model URI")


# --- hashing ---------------------------------------------------------------------------------------


def _file_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_hash(path: str | Path) -> str:
    """sha256 of a file; for a directory, sha256 over its files' relative paths and hashes."""
    p = Path(path)
    if p.is_file():
        return _file_sha(p)
    digest = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file() and q.name != COMPLETE):
        digest.update(f"{f.relative_to(p).as_posix()}\0{_file_sha(f)}\n".encode())
    return digest.hexdigest()


# --- the per-host cache ----------------------------------------------------------------------------


def cache_root(configured: str | None = None) -> Path:
    """The per-host download cache, created private (0700) and checked to be this user's."""
    root = Path(
        configured
        or os.environ.get("SPARKSCORE_MODEL_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparkscore" / "models"
    ).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = root.stat()
    except OSError as exc:
        raise ModelStoreError(
            f"model cache {str(root)!r} cannot be created ({exc.strerror}); set [model] cache_dir or "
            "SPARKSCORE_MODEL_CACHE to a writable directory"
        ) from None
    if st.st_uid != os.getuid():
        raise ModelStoreError(
            f"model cache {str(root)!r} belongs to another user; set [model] cache_dir or "
            "SPARKSCORE_MODEL_CACHE to a directory of your own"
        )
    if st.st_mode & 0o077:
        os.chmod(root, 0o700)
    return root


@contextlib.contextmanager
def _host_lock(path: Path) -> Iterator[None]:
    """An exclusive lock shared by every process on this host (flock on a lock file)."""
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _entry_ready(entry: Path) -> bool:
    return (entry / COMPLETE).is_file()


def download(location: str, dest: Path) -> Path:
    """Copy ``location`` (a file or directory URI, or a local path) under ``dest``; the local copy."""
    if not scheme(location):
        src = Path(location)
        target = dest / src.name
        if src.is_dir():
            shutil.copytree(src, target)
        else:
            shutil.copy2(src, target)
        return target
    import mlflow.artifacts

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(dest)))
    except Exception as exc:  # noqa: BLE001 - boto, gcs, hdfs and MLflow raise their own types
        raise ModelStoreError(_download_reason(location, exc)) from None


def _download_reason(location: str, exc: BaseException) -> str:
    name = type(exc).__name__
    text = " ".join(str(exc).split())
    if name == "NoCredentialsError" or "Unable to locate credentials" in text:
        return (
            f"no credentials for {location!r}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE) where the job runs"
        )
    if name in ("ClientError", "NoSuchKey", "NoSuchBucket") or "Not Found" in text or "404" in text:
        return f"model artifacts {location!r} do not exist (or cannot be listed): {text[:160]}"
    if name in ("EndpointConnectionError", "ConnectionError", "ConnectTimeoutError"):
        return f"object storage for {location!r} is unreachable: {text[:160]}"
    if isinstance(exc, FileNotFoundError | OSError) and "No such file" in text:
        return f"model artifacts {location!r} do not exist"
    return f"model artifacts {location!r} could not be downloaded: {name}: {text[:200]}"


def store(local: Path, root: Path) -> tuple[str, Path]:
    """Move a fresh download into the cache under its content hash; (hash, cache entry)."""
    digest = content_hash(local)
    entry = root / digest
    with _host_lock(root / f"{digest}.lock"):
        if not _entry_ready(entry):
            staging = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=root))
            os.replace(local, staging / local.name)
            (staging / COMPLETE).write_text(local.name)
            if entry.exists():  # a half-made entry from a killed process
                shutil.rmtree(entry, ignore_errors=True)
            os.replace(staging, entry)
    return digest, entry


def entry_path(entry: Path) -> Path:
    """The downloaded file or directory inside a finished cache entry."""
    return entry / (entry / COMPLETE).read_text().strip()


_memo_lock = threading.Lock()
_memo: dict[str, Path] = {}  # content hash -> local path, for this Python worker
_fetches: dict[str, int] = {}  # downloads this process made, per content hash (tests, benches)


def fetch(ref: StoreRef) -> Path:
    """The local copy of ``ref``'s artifacts (executor / scorer worker side): downloaded from the
    concrete location at most once per host, checked against the driver's hash, memoised per
    process. Never calls the registry."""
    with _memo_lock:
        hit = _memo.get(ref.content_hash)
        if hit is not None:
            return hit
        root = cache_root(ref.cache_dir)
        entry = root / ref.content_hash
        if not _entry_ready(entry):
            with _host_lock(root / f"{ref.content_hash}.lock"):
                if not _entry_ready(entry):
                    _download_into(ref, root, entry)
        local = entry_path(entry)
        _memo[ref.content_hash] = local
        return local


def _download_into(ref: StoreRef, root: Path, entry: Path) -> None:
    """Download, verify and publish one cache entry (call with the entry's lock held)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{ref.content_hash[:12]}-", dir=root))
    try:
        local = download(ref.location, staging)
        got = content_hash(local)
        if got != ref.content_hash:
            raise ModelStoreError(
                f"model artifacts at {ref.location!r} ({ref.uri}) changed after the driver resolved them "
                f"(sha256 {ref.content_hash[:12]} expected, {got[:12]} found); restart the job to pick "
                "up the new artifacts"
            )
        (staging / COMPLETE).write_text(local.name)
        if entry.exists():
            shutil.rmtree(entry, ignore_errors=True)
        os.replace(staging, entry)
        _fetches[ref.content_hash] = _fetches.get(ref.content_hash, 0) + 1
        log.info("downloaded %s (%s) into %s (pid %s)", ref.uri, ref.location, entry, os.getpid())
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def downloads() -> dict[str, int]:
    """Downloads made by this process, per content hash."""
    with _memo_lock:
        return dict(_fetches)


def forget() -> None:
    """Drop this process's memo (tests)."""
    with _memo_lock:
        _memo.clear()
        _fetches.clear()


# --- reading an MLflow model -----------------------------------------------------------------------


SUFFIX_FORMATS = {".pt": "torchscript", ".jit": "torchscript", ".pt2": "export", ".onnx": "onnx"}


@dataclass(frozen=True)
class Flavor:
    format: str
    model_file: str
    flavors: tuple[str, ...]
    signature_inputs: str
    signature_outputs: str
    code_paths: tuple[str, ...]


def read_mlmodel(model_dir: Path, uri: str) -> Flavor:
    """The engine an MLflow model directory is scored with, and its signature."""
    import yaml

    try:
        meta = yaml.safe_load((model_dir / "MLmodel").read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ModelStoreError(f"{uri}: its MLmodel file cannot be read: {exc}") from None
    flavors = meta.get("flavors") or {}
    names = tuple(flavors)
    sig = meta.get("signature") or {}
    inputs, outputs = sig.get("inputs") or "", sig.get("outputs") or ""
    if "onnx" in flavors:
        data = flavors["onnx"].get("data") or "model.onnx"
        return Flavor("onnx", data, names, inputs, outputs, ())
    if "pytorch" in flavors:
        conf = flavors["pytorch"]
        data = model_dir / (conf.get("model_data") or "data")
        code = tuple(c for c in [conf.get("code")] if c)
        rel = data.relative_to(model_dir).as_posix()
        if (data / "model.pt2").is_file():
            return Flavor("export", f"{rel}/model.pt2", names, inputs, outputs, code)
        if (data / "model.pth").is_file():
            return Flavor("pytorch", f"{rel}/model.pth", names, inputs, outputs, code)
        if data.is_file():
            return Flavor("pytorch", rel, names, inputs, outputs, code)
        raise ModelStoreError(f"{uri}: its pytorch flavor has no model.pt2 or model.pth under {rel}/")
    if "python_function" in flavors:
        return Flavor("pyfunc", "", names, inputs, outputs, ())
    raise ModelStoreError(
        f"{uri} has flavor(s) {list(names)}, none of which sparkscore can score; log it with the pytorch, "
        "onnx or a python_function flavor"
    )


def describe_local(local: Path, uri: str) -> Flavor:
    """What a downloaded file or directory is: an MLflow model, else a model file by suffix."""
    if local.is_dir():
        if not (local / "MLmodel").is_file():
            raise ModelStoreError(
                f"{uri} is a directory without an MLmodel file; point at an MLflow model or a model file"
            )
        return read_mlmodel(local, uri)
    return Flavor(SUFFIX_FORMATS.get(local.suffix.lower(), "auto"), "", (), "", "", ())


def resolve_ref(
    uri: str, *, registry_uri: str | None = None, cache_dir: str | None = None
) -> tuple[StoreRef, Path]:
    """Resolve ``uri`` on the driver: registry lookup, one download into the host cache, hash,
    flavor. Returns the ref for executors and the driver's local copy."""
    parsed = parse_uri(uri)
    registry_name = registry_version = ""
    if parsed.kind in ("registry", "model_id", "runs"):
        from udfs import model_registry

        found = model_registry.lookup(parsed, registry_uri)
        location, registry_name, registry_version = found.location, found.name, found.version
    elif parsed.kind == "mlflow_dir":
        location = str(Path(uri).resolve())
    else:
        location = uri
        if scheme(uri) == "file":
            local_path = uri[len("file:") :]
            local_path = "/" + local_path.lstrip("/") if local_path.startswith("//") else local_path
            if not os.path.exists(local_path):
                raise ModelStoreError(f"model file {uri!r} does not exist")
    root = cache_root(cache_dir)
    staging = Path(tempfile.mkdtemp(prefix=".resolve-", dir=root))
    try:
        local = download(location, staging)
        digest, entry = store(local, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    local = entry_path(entry)
    flavor = describe_local(local, uri)
    ref = StoreRef(
        uri=uri,
        location=location,
        content_hash=digest,
        format=flavor.format,
        model_file=flavor.model_file,
        is_dir=local.is_dir(),
        registry_name=registry_name,
        registry_version=registry_version,
        alias=parsed.alias,
        flavors=flavor.flavors,
        signature_inputs=flavor.signature_inputs,
        signature_outputs=flavor.signature_outputs,
        code_paths=flavor.code_paths,
        cache_dir=cache_dir,
    )
    with _memo_lock:
        _memo[digest] = local
    return ref, local


def peek(uri: str, registry_uri: str | None = None) -> tuple[str, str]:
    """Where a ``models:/`` or ``runs:/`` URI points now, without downloading: (registry version,
    artifact location). What a poll for a moved alias asks (one registry call or two)."""
    parsed = parse_uri(uri)
    if parsed.kind not in ("registry", "model_id", "runs"):
        raise ModelStoreError(f"{uri} is not a registry URI; only models:/ and runs:/ URIs can be followed")
    from udfs import model_registry

    found = model_registry.lookup(parsed, registry_uri)
    return found.version, found.location


def peek_all(uris: list[str], registry_uri: str | None = None) -> dict[str, tuple[str, str] | None]:
    """Where each followed URI points now, without downloading: (registry version, artifact location),
    the location "" where only the version was asked; None for an alias that is not set (deleted) or
    a model that is not registered. Aliases of one registered model cost ONE registry call together
    (the registered model lists its aliases: a primary's @champion and a candidate's @challenger in
    one poll); any other URI is a :func:`peek`. Raises when the registry cannot be asked."""
    out: dict[str, tuple[str, str] | None] = {}
    by_name: dict[str, list[ParsedUri]] = {}
    for uri in uris:
        parsed = parse_uri(uri)
        if parsed.kind == "registry" and parsed.alias:
            by_name.setdefault(parsed.name, []).append(parsed)
        else:
            out[uri] = peek(uri, registry_uri)
    if by_name:
        from udfs import model_registry

        for name, followed in by_name.items():
            found = model_registry.aliases(name, registry_uri, followed[0].uri)
            for p in followed:
                version = None if found is None else found.get(p.alias)
                out[p.uri] = None if version is None else (version, "")
    return out


def model_path(ref: StoreRef, local: Path) -> str:
    """The path an engine loads: the model file inside an MLflow model, else the download itself."""
    return str(local / ref.model_file) if ref.model_file else str(local)


# --- signatures ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    """An MLflow signature's inputs, in sparkscore's terms."""

    columns: tuple[str, ...] = ()  # column-based: the names, in order
    types: tuple[str, ...] = ()  # their MLflow types (double, long, string, ...)
    tensor_width: int | None = None  # tensor-based [-1, N]: N
    output_width: int | None = None  # tensor-based output [-1, K]: K
    # Tensor-based, every tensor named: (name, numpy dtype, shape with the batch dimension).
    tensors: tuple[tuple[str, str, tuple[int, ...]], ...] = ()


def parse_signature(ref: StoreRef) -> Signature | None:
    """The ref's MLflow signature, or None when the model was logged without one."""
    if not ref.signature_inputs:
        return None
    try:
        inputs = json.loads(ref.signature_inputs)
        outputs = json.loads(ref.signature_outputs) if ref.signature_outputs else []
    except json.JSONDecodeError:
        return None
    out_width = None
    if len(outputs) == 1 and outputs[0].get("type") == "tensor":
        shape = outputs[0].get("tensor-spec", {}).get("shape") or []
        out_width = shape[1] if len(shape) == 2 and shape[1] > 0 else (1 if len(shape) == 1 else None)
    if inputs and all(i.get("type") == "tensor" for i in inputs):
        specs = [i.get("tensor-spec", {}) for i in inputs]
        named = tuple(
            (str(i.get("name")), str(t.get("dtype")), tuple(int(d) for d in t.get("shape") or ()))
            for i, t in zip(inputs, specs, strict=True)
            if i.get("name")
        )
        tensors = named if len(named) == len(inputs) else ()
        if len(inputs) == 1:
            shape = specs[0].get("shape") or []
            width = shape[1] if len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 0 else None
            return Signature(tensor_width=width, output_width=out_width, tensors=tensors)
        return Signature(output_width=out_width, tensors=tensors)
    names = tuple(i.get("name") or "" for i in inputs)
    if not all(names):
        return Signature(output_width=out_width)
    return Signature(columns=names, types=tuple(str(i.get("type")) for i in inputs), output_width=out_width)
