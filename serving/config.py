"""The scorer's TOML config (``conf/serve.toml``) as frozen dataclasses.

Unknown keys and wrong types are :class:`~udfs.errors.ConfigError`; command-line
flags (``--host``, ``--port``, ``--redis-url``, ``--model``) override the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

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

    def __post_init__(self) -> None:
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

    def __post_init__(self) -> None:
        if self.url and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"url must start with redis://, rediss:// or unix://, got {self.url!r}")
        if self.socket_timeout_ms <= 0 or self.connect_timeout_ms <= 0:
            raise ValueError("socket_timeout_ms and connect_timeout_ms must be positive")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0, got {self.retry_after_s}")


@dataclass(frozen=True)
class ServeConfig:
    model: ModelSpec
    server: ServerConfig = ServerConfig()
    batcher: BatcherConfig = BatcherConfig()
    cache: CacheConfig = CacheConfig()
    redis: RedisConfig = RedisConfig()

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


def from_mapping(data: dict[str, Any]) -> ServeConfig:
    return from_dict(ServeConfig, data, where="serve config")


def load_config(
    path: str,
    *,
    host: str | None = None,
    port: int | None = None,
    redis_url: str | None = None,
    model_path: str | None = None,
) -> ServeConfig:
    """The config file with command-line overrides applied."""
    cfg = from_mapping(load_toml(path))
    try:
        server = replace(
            cfg.server, host=host or cfg.server.host, port=cfg.server.port if port is None else port
        )
        redis = replace(cfg.redis, url=cfg.redis.url if redis_url is None else redis_url)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return replace(cfg, model=with_overrides(cfg.model, path=model_path), server=server, redis=redis)
