"""MLflow registry and tracking-store lookups, made on the driver only.

:func:`lookup` turns ``models:/name/3``, ``models:/name@alias``, ``models:/<model_id>`` and
``runs:/<run>/<path>`` into the artifacts' concrete location plus the registry version (an alias
becomes the version it points at now). Every failure is one sentence naming the URI, the registry
and what to do: unreachable, unknown model, version or alias.

The registry is the one named by ``[model] registry_uri`` (used as the tracking URI too: MLflow's
default sqlite store keeps both in one database), else MLflow's own default:
``MLFLOW_REGISTRY_URI`` / ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from udfs.model_store import ModelStoreError, ParsedUri

if TYPE_CHECKING:
    from mlflow import MlflowClient

# A registry that is down should cost seconds, not MLflow's default minutes of retries.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


class RegistryUnreachable(ModelStoreError):
    """The registry / tracking server could not be asked (down, wrong URI, missing database)."""


@dataclass(frozen=True)
class Found:
    location: str  # the artifacts' concrete URI
    name: str = ""  # registered model name
    version: str = ""  # registry version


def registry_uri_of(configured: str | None) -> str:
    """The registry URI lookups use, for messages and the start-up line."""
    if configured:
        return configured
    import mlflow

    return mlflow.get_registry_uri()


def client(registry_uri: str | None) -> MlflowClient:
    """A client for ``registry_uri`` (None: MLflow's defaults), with short HTTP retries."""
    for key, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    uri = registry_uri_of(registry_uri)
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///") :]
        if db != ":memory:" and not os.path.isfile(db):
            raise RegistryUnreachable(
                f"MLflow registry database {db!r} ({uri}) does not exist; run `make demo` to create the demo "
                "registry, or set [model] registry_uri (or MLFLOW_TRACKING_URI) to your registry"
            )
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=registry_uri, registry_uri=registry_uri)


def _is_missing(exc: BaseException) -> bool:
    code = getattr(exc, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND") or (
        type(exc).__name__ == "MlflowException" and "not found" in str(exc).lower()
    )


def _unreachable(uri: str, registry: str, exc: BaseException) -> RegistryUnreachable:
    text = " ".join(str(exc).split())
    return RegistryUnreachable(
        f"MLflow registry {registry} is unreachable for {uri} ({type(exc).__name__}: {text[:160]}); check that "
        "the tracking server is up and [model] registry_uri / MLFLOW_TRACKING_URI point at it"
    )


def _call(uri: str, registry: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)``, with transport failures turned into RegistryUnreachable (a missing resource
    is re-raised as is for the caller to name)."""
    try:
        return fn(*args)
    except Exception as exc:
        if _is_missing(exc):
            raise
        raise _unreachable(uri, registry, exc) from None


def lookup(parsed: ParsedUri, registry_uri: str | None) -> Found:
    """The concrete location (and registry version) of a models:/ or runs:/ URI."""
    registry = registry_uri_of(registry_uri)
    c = client(registry_uri)
    uri = parsed.uri
    if parsed.kind == "registry":
        version = _version(c, parsed, registry)
        try:
            location = _call(uri, registry, c.get_model_version_download_uri, parsed.name, version)
        except ModelStoreError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ModelStoreError(
                f"{uri}: version {version} of {parsed.name!r} has no artifacts in {registry} ({exc})"
            ) from None
        return Found(location=location, name=parsed.name, version=version)
    if parsed.kind == "model_id":
        try:
            logged = _call(uri, registry, c.get_logged_model, parsed.model_id)
        except ModelStoreError:
            raise
        except Exception:  # noqa: BLE001
            raise ModelStoreError(
                f"no logged model {parsed.model_id!r} in the tracking store {registry} ({uri}); check the id, "
                "or name a registered version: models:/<name>/<version>"
            ) from None
        return Found(location=logged.artifact_location)
    # runs:/<run>/<path>: the run's artifact, or (MLflow 3) the model logged in that run under that name.
    try:
        run = _call(uri, registry, c.get_run, parsed.run_id)
    except ModelStoreError:
        raise
    except Exception:  # noqa: BLE001
        raise ModelStoreError(f"no run {parsed.run_id!r} in the tracking store {registry} ({uri})") from None
    for model in _call(uri, registry, _logged_models_of_run, c, run):
        if model.name == parsed.artifact_path:
            return Found(location=model.artifact_location)
    return Found(location=f"{run.info.artifact_uri.rstrip('/')}/{parsed.artifact_path}")


def _logged_models_of_run(c: MlflowClient, run: Any) -> list[Any]:
    models = c.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    return list(models)


def _version(c: MlflowClient, parsed: ParsedUri, registry: str) -> str:
    """The concrete version of models:/name/N or models:/name@alias; one sentence when unknown."""
    uri = parsed.uri
    try:
        if parsed.alias:
            return str(_call(uri, registry, c.get_model_version_by_alias, parsed.name, parsed.alias).version)
        return str(_call(uri, registry, c.get_model_version, parsed.name, parsed.version).version)
    except ModelStoreError:
        raise
    except Exception:  # noqa: BLE001 - the model, version or alias does not exist: say which
        pass
    try:
        model = _call(uri, registry, c.get_registered_model, parsed.name)
    except ModelStoreError:
        raise
    except Exception:  # noqa: BLE001
        raise ModelStoreError(
            f"no registered model {parsed.name!r} in the MLflow registry {registry} ({uri}); register it "
            "(mlflow.register_model) or check the name"
        ) from None
    if parsed.alias:
        aliases = ", ".join(f"@{a} -> {v}" for a, v in sorted((model.aliases or {}).items())) or "none"
        raise ModelStoreError(
            f"registered model {parsed.name!r} has no alias {parsed.alias!r} in {registry} ({uri}); its "
            f"aliases: {aliases}; set one with MlflowClient().set_registered_model_alias"
        )
    versions = sorted(
        int(v.version) for v in _call(uri, registry, c.search_model_versions, f"name = '{parsed.name}'")
    )
    raise ModelStoreError(
        f"registered model {parsed.name!r} has no version {parsed.version} in {registry} ({uri}); its "
        f"versions: {', '.join(map(str, versions)) or 'none'}"
    )


def aliases(name: str, registry_uri: str | None, uri: str) -> dict[str, str] | None:
    """Every alias of registered model ``name`` and the version it points at, in ONE registry call
    (what a poll asks, however many of the model's aliases it follows); None when no model of that
    name is registered. ``uri`` names the followed URI in a message when the registry is unreachable."""
    registry = registry_uri_of(registry_uri)
    c = client(registry_uri)
    try:
        model = _call(uri, registry, c.get_registered_model, name)
    except ModelStoreError:
        raise
    except Exception:  # noqa: BLE001 - not registered (any more)
        return None
    return {str(alias): str(version) for alias, version in (model.aliases or {}).items()}
