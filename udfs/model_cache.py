"""Per-process model cache: load each model file once per Python worker.

Spark reuses Python workers across tasks when ``spark.python.worker.reuse`` is
true (the default), so a module-level cache lives as long as the worker and the
model is loaded once per worker process, not once per task or per batch. The
key is (content hash, device): a new file under the same path is a new entry,
and the same file on two GPUs is two entries. The cache is a bounded LRU.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from udfs import model_store
from udfs.errors import ModelLoadError, whole_sentences
from udfs.spec import ResolvedMember, files_hash

log = logging.getLogger(__name__)

_lock = threading.Lock()
_cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
# Loads done by this process, per content hash: the "loaded once" evidence that
# the Spark wrapper reports back to the driver through an accumulator.
_load_counts: dict[str, int] = {}


@dataclass(frozen=True)
class CacheStats:
    entries: int
    loads: dict[str, int]


def stats() -> CacheStats:
    with _lock:
        return CacheStats(entries=len(_cache), loads=dict(_load_counts))


def clear() -> None:
    """Drop every cached model (tests and hot reloads)."""
    with _lock:
        _cache.clear()
        _load_counts.clear()


def locate(path: str) -> str:
    """The local path of a model file, falling back to files shipped with ``--files``."""
    if os.path.exists(path):
        return path
    try:
        from pyspark import SparkFiles

        shipped = SparkFiles.get(Path(path).name)
    except Exception:  # noqa: BLE001 - no SparkContext / no root dir: not shipped
        shipped = ""
    if shipped and os.path.exists(shipped):
        return shipped
    raise ModelLoadError(
        f"model file {path!r} does not exist on this host; on a cluster put it on shared "
        "storage or ship it with spark-submit --files"
    )


def member_path(member: ResolvedMember) -> str:
    """The local path to load ``member`` from: a model from a store is fetched into this host's cache
    (once per host, checked against the driver's hash); a file is located as given."""
    if member.store is None:
        return locate(member.path)
    local = model_store.fetch(member.store)
    for code in member.store.code_paths:
        _add_code_path(str(local / code))
    return model_store.model_path(member.store, local)


def _add_code_path(path: str) -> None:
    """Put the code an MLflow model was logged with (code_paths) on sys.path, once."""
    import sys

    if os.path.isdir(path) and path not in sys.path:
        sys.path.insert(0, path)


def load_module(path: str, fmt: str, device: str) -> Any:
    """Load a TorchScript or torch.export program onto ``device`` in eval mode (an ONNX model as an
    ONNX Runtime session, an MLflow pyfunc model as a :class:`udfs.pyfunc_engine.PyfuncModel`, a
    pickled PyTorch ``nn.Module`` from MLflow's pytorch flavor with ``fmt='pytorch'``)."""
    if fmt == "onnx":
        from udfs import onnx_engine

        return onnx_engine.load(path, device)
    if fmt == "pyfunc":
        from udfs import pyfunc_engine

        return pyfunc_engine.load(path)
    if fmt == "pytorch":
        return load_pickled(path, device)
    import torch

    def _jit() -> Any:
        return torch.jit.load(path, map_location=device)

    def _export() -> Any:
        # torch logs the whole deserialisation traceback before it falls back; the reason is kept below.
        export_log = logging.getLogger("torch.export")
        level = export_log.level
        export_log.setLevel(logging.ERROR)
        try:
            return torch.export.load(path).module().to(device)
        finally:
            export_log.setLevel(level)

    loaders = {"torchscript": [_jit], "export": [_export], "auto": [_jit, _export]}[fmt]
    reasons = []
    for loader in loaders:
        try:
            module = loader()
            break
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError and friends
            reasons.append(whole_sentences(str(exc)) or type(exc).__name__)
    else:
        kind = {"export": "torch.export", "auto": "TorchScript or torch.export"}
        raise ModelLoadError(
            f"model file {path!r} could not be loaded as a {kind.get(fmt, fmt)} program "
            f"(is it corrupt or of another format?): {reasons[-1]}"
        )
    if hasattr(module, "eval") and fmt != "export":
        module.eval()
    return module


def load_pickled(path: str, device: str) -> Any:
    """A PyTorch model MLflow saved with ``serialization_format='pickle'``: a TorchScript module
    (torch.save writes a TorchScript archive: loaded with ``torch.jit.load``, no pickle) or a pickled
    ``nn.Module``, whose class must be importable here. Unpickling runs code from the file, so it
    follows MLflow's own switch, ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` (MLflow 3.17 allows it by
    default; set it to false to refuse pickles)."""
    import torch

    try:
        module = torch.jit.load(path, map_location=device)
        module.eval()
        return module
    except Exception:  # noqa: BLE001 - not a TorchScript archive: a pickled module
        pass
    from mlflow.environment_variables import MLFLOW_ALLOW_PICKLE_DESERIALIZATION

    if not MLFLOW_ALLOW_PICKLE_DESERIALIZATION.get():
        raise ModelLoadError(
            f"model {path!r} is a pickled PyTorch nn.Module (MLflow serialization_format='pickle') and "
            "MLFLOW_ALLOW_PICKLE_DESERIALIZATION is false; log it with serialization_format='pt2' "
            "(torch.export), or set MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true where the job runs if you trust it"
        )
    from mlflow.pytorch import pickle_module

    try:
        module = torch.load(path, map_location=device, weights_only=False, pickle_module=pickle_module)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise ModelLoadError(
            f"pickled PyTorch model {path!r} needs code that is not importable here ({exc}); log it with "
            "code_paths=[...] or install the package that defines its nn.Module on every node"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, ...
        reason = whole_sentences(str(exc)) or type(exc).__name__
        raise ModelLoadError(f"pickled PyTorch model {path!r} could not be loaded: {reason}") from None
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(
            f"pickled PyTorch model {path!r} holds a {type(module).__name__}, not an nn.Module; log the "
            "module itself, or export it with torch.export (serialization_format='pt2')"
        )
    module.eval()
    return module


def located_files(member: ResolvedMember, path: str) -> tuple[str, ...]:
    """The member's files as found on this host: the model at ``path``, its external data beside it
    at the same relative places as on the driver."""
    if len(member.files) <= 1:
        return (path,)
    base = Path(member.files[0]).parent
    here = Path(path).parent
    return (path, *(str(here / os.path.relpath(f, base)) for f in member.files[1:]))


def get_model(member: ResolvedMember, device: str, *, cache_size: int = 4) -> Any:
    """The loaded torch module for one model file on ``device``, loading it at most once."""
    key = (member.content_hash, device)
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        path = member_path(member)
        # The driver hashed the file; a different file on this host would give
        # predictions under the wrong version, so refuse it (a store's fetch checked its own).
        if member.store is None and files_hash(located_files(member, path)) != member.content_hash:
            raise ModelLoadError(
                f"model file {path!r} on this host differs from the one the driver checked "
                f"(version {member.version}); ship the same file to every node"
            )
        if device.startswith("cuda"):
            _drop_other_gpus(device)
        module = load_module(path, member.format, device)
        _cache[key] = module
        _load_counts[member.content_hash] = _load_counts.get(member.content_hash, 0) + 1
        log.info(
            "loaded model %s version %s on %s (pid %s)", member.name, member.version, device, os.getpid()
        )
        while len(_cache) > cache_size:
            _cache.popitem(last=False)
        return module


def _drop_other_gpus(device: str) -> None:
    """A reused worker can be handed another GPU by a later task: keep models on that one GPU only,
    so no GPU holds copies for a task it no longer serves (call with the lock held)."""
    stale = [key for key in _cache if key[1].startswith("cuda") and key[1] != device]
    for key in stale:
        del _cache[key]
    if stale:
        import torch

        torch.cuda.empty_cache()


def total_loads() -> int:
    """Model loads done by this process so far (all files)."""
    with _lock:
        return sum(_load_counts.values())
