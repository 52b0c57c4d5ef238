"""The scorer's TOML config (``conf/serve.toml``) as frozen dataclasses.

Unknown keys and wrong types are :class:`~udfs.errors.ConfigError`; command-line
flags (``--host``, ``--port``, ``--redis-url``, ``--model``, ``--workers``) override the file.
An optional ``[candidate]`` table is a second model spec (its keys override
``[model]``'s) plus ``traffic`` (canary share) or ``shadow = true``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from udfs.config import from_dict, load_toml
from udfs.errors import ConfigError
from udfs.spec import ModelSpec, with_overrides


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 1 << 20
    max_instances: int = 1024  # per request
    # Name of an environment variable that holds a bearer token; empty: no auth.
    auth_token_env: str = ""
    log_level: str = "info"
    # Server processes on the one port, each with its own model and batcher; "auto": one per core.
    workers: int | Literal["auto"] = 1
    # A request body that has not fully arrived after this long: 408 and the connection is closed.
    body_timeout_s: float = 10.0
    # On SIGTERM: in-flight requests get this long to finish before they are cancelled.
    drain_timeout_s: float = 30.0
    # On SIGTERM: readiness turns false at once, but the listener stays open this long first (a load
    # balancer polling readiness deregisters the instance before it stops accepting). 0: no delay.
    drain_delay_s: float = 0.0
    # A request's headers not complete after this long (or a new connection that sends nothing): 408, closed.
    header_timeout_s: float = 10.0
    # Open connections per worker; one more gets 503 with Retry-After and is closed.
    max_connections: int = 4096
    # Requests being handled per worker; one more is shed at the door: 503 with Retry-After.
    max_concurrency: int = 1024

    def __post_init__(self) -> None:
        if isinstance(self.workers, int) and self.workers < 1:
            raise ValueError(f"workers must be >= 1 or 'auto', got {self.workers}")
        if self.body_timeout_s <= 0 or self.drain_timeout_s <= 0 or self.header_timeout_s <= 0:
            raise ValueError("body_timeout_s, header_timeout_s and drain_timeout_s must be positive")
        if self.drain_delay_s < 0:
            raise ValueError(f"drain_delay_s must be >= 0, got {self.drain_delay_s}")
        if self.max_connections < 1 or self.max_concurrency < 1:
            raise ValueError("max_connections and max_concurrency must be >= 1")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be between 0 and 65535, got {self.port}")
        if self.max_body_bytes < 64:
            raise ValueError(f"max_body_bytes must be at least 64, got {self.max_body_bytes}")
        if self.max_instances < 1:
            raise ValueError(f"max_instances must be >= 1, got {self.max_instances}")


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_size: int = 64
    # Counted from each request's arrival: no request waits longer than this for company.
    max_wait_ms: float = 2.0
    max_queue: int = 2048  # queued requests; beyond it: 429
    default_timeout_ms: float = 1000.0  # deadline for a request that sets no timeout_ms
    max_timeout_ms: float = 60_000.0
    workers: int = 2  # inference threads = micro-batches computing at once
    # Ensembles: run the members of one micro-batch in parallel threads (torch releases the GIL;
    # member_timeout_ms applies only then). false: one after another on the inference thread.
    parallel_members: bool = True
    # Ensembles: member calls hung past their timeout whose threads are set aside (replaced) at once;
    # at this many, new member calls fail at once and readiness says not ready until they return.
    max_hung_member_calls: int = 16

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if not 0 < self.default_timeout_ms <= self.max_timeout_ms:
            raise ValueError(
                f"default_timeout_ms must be > 0 and <= max_timeout_ms ({self.max_timeout_ms}), "
                f"got {self.default_timeout_ms}"
            )
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.max_hung_member_calls < 1:
            raise ValueError(f"max_hung_member_calls must be >= 1, got {self.max_hung_member_calls}")


@dataclass(frozen=True)
class CacheConfig:
    enabled: bool = True
    ttl_s: float = 300.0
    max_entries: int = 100_000  # in-process LRU, used when no Redis is configured

    def __post_init__(self) -> None:
        if self.ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {self.ttl_s}")
        if self.max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {self.max_entries}")


@dataclass(frozen=True)
class RedisConfig:
    url: str = ""  # empty: embedded mode (in-process cache; requests carry their features)
    socket_timeout_ms: float = 50.0
    connect_timeout_ms: float = 100.0
    max_connections: int = 32
    # After a Redis error, skip Redis this long instead of paying a timeout on every request.
    retry_after_s: float = 2.0
    # While skipped, one PING this often (off the request path) brings Redis back as soon as it answers.
    probe_interval_s: float = 0.1

    def __post_init__(self) -> None:
        if self.url and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"url must start with redis://, rediss:// or unix://, got {self.url!r}")
        if self.socket_timeout_ms <= 0 or self.connect_timeout_ms <= 0:
            raise ValueError("socket_timeout_ms and connect_timeout_ms must be positive")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0, got {self.retry_after_s}")
        if self.probe_interval_s <= 0:
            raise ValueError(f"probe_interval_s must be positive, got {self.probe_interval_s}")


@dataclass(frozen=True)
class ReloadConfig:
    """Zero-downtime model updates: ``POST /v2/repository/models/{name}/load`` always; a file watch opt-in."""

    watch: bool = False  # poll the model file(s) and load a changed file in the background
    poll_s: float = 2.0
    # parameters.path on the load endpoint must name a file under this directory (default: the
    # configured model file's directory); anything else is refused before the file is looked at.
    load_dir: str = ""
    # Whether parameters.path may be a model URI (models:/..., runs:/..., s3://...).
    load_uris: bool = False
    # A registry alias to follow (models:/ctr@champion): polled every poll_s; when it moves, the new
    # version loads and warms up in the background and is swapped in (every worker).
    follow: str = ""

    def __post_init__(self) -> None:
        if self.poll_s <= 0:
            raise ValueError(f"poll_s must be positive, got {self.poll_s}")
        if self.follow and not self.follow.startswith("models:/"):
            raise ValueError(
                f"follow must be a registry URI such as models:/ctr@champion, got {self.follow!r}"
            )


@dataclass(frozen=True)
class CandidateConfig:
    """A second model version on live traffic: a canary share (sticky by user_id) or a shadow."""

    model: ModelSpec
    traffic: float = 0.0  # share of requests the candidate answers (sticky by user_id)
    shadow: bool = False  # score a copy of every micro-batch off the response path; answer from the primary
    # Shadow: micro-batches waiting for the candidate beyond this are skipped (never slows the primary).
    max_pending_batches: int = 4
    # A registry alias to follow (models:/ctr@challenger), polled with [reload] follow's (every
    # [reload] poll_s, one registry call for both aliases of one model): a moved alias loads, warms up
    # and replaces the candidate in every worker. Without a path, the candidate starts from it.
    follow: str = ""

    def __post_init__(self) -> None:
        if self.follow and not self.follow.startswith("models:/"):
            raise ValueError(
                f"follow must be a registry URI such as models:/ctr@challenger, got {self.follow!r}"
            )
        if not 0 <= self.traffic <= 1:
            raise ValueError(f"traffic must be between 0 and 1, got {self.traffic}")
        if self.shadow == (self.traffic > 0):
            raise ValueError("set either traffic = <share> (canary) or shadow = true, not both or neither")
        if self.max_pending_batches < 1:
            raise ValueError(f"max_pending_batches must be >= 1, got {self.max_pending_batches}")


@dataclass(frozen=True)
class ServeConfig:
    model: ModelSpec
    server: ServerConfig = ServerConfig()
    batcher: BatcherConfig = BatcherConfig()
    cache: CacheConfig = CacheConfig()
    redis: RedisConfig = RedisConfig()
    reload: ReloadConfig = ReloadConfig()
    candidate: CandidateConfig | None = None

    def worker_count(self) -> int:
        """``[server] workers`` with ``auto`` resolved to the cores this process may run on."""
        w = self.server.workers
        return len(os.sched_getaffinity(0)) if w == "auto" else int(w)

    def auth_token(self) -> str | None:
        """The bearer token from the environment variable the config names, if any."""
        name = self.server.auth_token_env
        if not name:
            return None
        token = os.environ.get(name, "")
        if not token:
            raise ConfigError(
                f"[server] auth_token_env names ${name}, but that environment variable is empty"
            )
        return token


CANDIDATE_KEYS = {f.name for f in fields(CandidateConfig)} - {"model"}
# What the candidate must share with the primary: it answers the same requests with the same fields.
SAME_AS_PRIMARY = ("input_columns", "num_features", "output", "inputs", "outputs")


def from_mapping(data: dict[str, Any]) -> ServeConfig:
    data = dict(data)
    candidate = data.pop("candidate", None)
    cfg = from_dict(ServeConfig, data, where="serve config")
    if candidate is None:
        return cfg
    if not isinstance(candidate, dict):
        raise ConfigError("[serve config.candidate] must be a table")
    options = {k: v for k, v in candidate.items() if k in CANDIDATE_KEYS}
    spec = dict(data.get("model", {}))
    given = {k: v for k, v in candidate.items() if k not in CANDIDATE_KEYS}
    if isinstance(options.get("follow"), str) and "path" not in given and "members" not in given:
        given["path"] = options["follow"]  # a followed alias is where the candidate starts
    # The candidate's own file or members replace the primary's; everything else is inherited.
    if "path" in given or "members" in given:
        for key in ("path", "members", "version"):
            spec.pop(key, None)
    spec.update(given)
    spec.setdefault("name", cfg.model.name)
    model = from_dict(ModelSpec, spec, where="serve config.candidate")
    for key in SAME_AS_PRIMARY:
        if getattr(model, key) != getattr(cfg.model, key):
            raise ConfigError(
                f"[candidate] {key} = {getattr(model, key)!r} differs from [model]'s "
                f"{getattr(cfg.model, key)!r}; a candidate answers the same requests, so they must match"
            )
    if model.name != cfg.model.name:
        raise ConfigError(f"[candidate] name must be the served model's, {cfg.model.name!r} (or left out)")
    try:
        parsed = CandidateConfig(model=model, **_candidate_options(options))
    except ValueError as exc:
        raise ConfigError(f"[serve config.candidate]: {exc}") from None
    return replace(cfg, candidate=parsed)


def _candidate_options(options: dict[str, Any]) -> dict[str, Any]:
    """traffic / shadow / max_pending_batches / follow, type-checked like any config key."""
    out: dict[str, Any] = {}
    types = {"traffic": (int, float), "shadow": (bool,), "max_pending_batches": (int,), "follow": (str,)}
    for key, value in options.items():
        ok = isinstance(value, types[key]) and (key == "shadow" or not isinstance(value, bool))
        if not ok:
            raise ConfigError(f"serve config.candidate.{key} has the wrong type: {value!r}")
        out[key] = float(value) if key == "traffic" else value
    return out


def load_config(
    path: str,
    *,
    host: str | None = None,
    port: int | None = None,
    redis_url: str | None = None,
    model_path: str | None = None,
    workers: int | Literal["auto"] | None = None,
) -> ServeConfig:
    """The config file with command-line overrides applied."""
    cfg = from_mapping(load_toml(path))
    try:
        server = replace(
            cfg.server,
            host=host or cfg.server.host,
            port=cfg.server.port if port is None else port,
            workers=cfg.server.workers if workers is None else workers,
        )
        redis = replace(cfg.redis, url=cfg.redis.url if redis_url is None else redis_url)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return replace(cfg, model=with_overrides(cfg.model, path=model_path), server=server, redis=redis)
