"""The prediction cache and the feature store.

* Prediction cache: a TTL cache keyed by model version plus entity ids or
  feature values. In Redis when a URL is configured, else an in-process LRU.
  A cache that fails never fails a request: the prediction is computed and the
  response says the cache was unavailable.
* Feature store: Redis hashes ``user:{id}`` and ``item:{id}``; a request
  without ``features`` is assembled from them in the model spec's column order.

Redis calls go through one pooled client with short socket timeouts. A call
that fails on a broken connection (a pooled connection left stale by a Redis
restart) is retried once on a fresh one; only then is it an error. After an
error, Redis is skipped for ``retry_after_s`` so a dead server costs one
timeout, not one per request, and a probe closes the breaker as soon as Redis answers. Every pooled connection in use is local
back-pressure, not a Redis failure: that call goes without Redis and the
breaker stays closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any, Protocol

import msgspec

from serving.config import CacheConfig, RedisConfig
from serving.errors import StoreUnavailable
from serving.metrics import Metrics

log = logging.getLogger("serving.store")

HIT, MISS, UNAVAILABLE, OFF = "hit", "miss", "unavailable", "off"


class PoolExhausted(Exception):
    """Every pooled Redis connection stayed in use for the pool's wait: local load, not a Redis failure."""


class PredictionCache(Protocol):
    async def get(self, key: str) -> tuple[dict[str, Any] | None, str]: ...

    async def set(self, key: str, value: dict[str, Any]) -> None: ...

    async def close(self) -> None: ...


class NoCache:
    async def get(self, key: str) -> tuple[dict[str, Any] | None, str]:
        return None, OFF

    async def set(self, key: str, value: dict[str, Any]) -> None:
        return None

    async def close(self) -> None:
        return None


class LocalCache:
    """In-process LRU with a TTL: the embedded default. Keys are any hashable (the service uses tuples)."""

    def __init__(self, cfg: CacheConfig) -> None:
        self.ttl = cfg.ttl_s
        self.max_entries = cfg.max_entries
        self._data: OrderedDict[Hashable, tuple[float, dict[str, Any]]] = OrderedDict()

    async def get(self, key: Hashable) -> tuple[dict[str, Any] | None, str]:
        return self.lookup(key)

    def lookup(self, key: Hashable) -> tuple[dict[str, Any] | None, str]:
        """:meth:`get` without the coroutine: the request path calls this directly."""
        entry = self._data.get(key)
        if entry is None:
            return None, MISS
        if entry[0] < time.monotonic():
            del self._data[key]
            return None, MISS
        self._data.move_to_end(key)
        return entry[1], HIT

    async def set(self, key: Hashable, value: dict[str, Any]) -> None:
        self.put(key, value)

    def put(self, key: Hashable, value: dict[str, Any]) -> None:
        self._data[key] = (time.monotonic() + self.ttl, value)
        self._data.move_to_end(key)
        if len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    async def close(self) -> None:
        self._data.clear()


class RedisConnection:
    """One pooled async client shared by the cache and the feature store, with a breaker."""

    def __init__(self, cfg: RedisConfig, metrics: Metrics) -> None:
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        class Pool(BlockingConnectionPool):
            async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
                try:
                    return await super().get_connection(*args, **kwargs)
                except RedisConnectionError as exc:
                    if isinstance(exc.__cause__, asyncio.TimeoutError):
                        raise PoolExhausted(
                            f"all {cfg.max_connections} Redis connections are in use"
                        ) from None
                    raise

        self.cfg = cfg
        self.metrics = metrics
        self.timeout = cfg.socket_timeout_ms / 1000
        # Once, on a broken connection only (reconnects it): a slow Redis (a timeout) is not retried.
        retry_once = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
        pool = Pool.from_url(
            cfg.url,
            max_connections=cfg.max_connections,
            timeout=self.timeout,
            socket_timeout=self.timeout,
            socket_connect_timeout=cfg.connect_timeout_ms / 1000,
            retry=retry_once,
        )
        self.client = Redis(connection_pool=pool, retry=retry_once)
        self._down_until = 0.0
        self.last_error = ""
        self._probe: asyncio.Task[None] | None = None

    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def failed(self, op: str, exc: BaseException) -> str:
        """Count a failure and open the breaker: Redis is skipped for up to ``retry_after_s``, while a
        probe (one PING every ``probe_interval_s``, off the request path) closes it as soon as Redis
        answers again (the half-open state: one call tries, requests do not)."""
        if isinstance(exc, PoolExhausted):
            self.metrics.redis_pool_busy.inc()
            return str(exc)
        self.metrics.redis_errors.inc(op)
        reason = f"{type(exc).__name__}: {exc}".strip().rstrip(":") if str(exc) else type(exc).__name__
        if self.available():
            log.warning(
                "redis %s failed (%s); skipping Redis for up to %.1f s", op, reason, self.cfg.retry_after_s
            )
        self._down_until = time.monotonic() + self.cfg.retry_after_s
        self.last_error = reason
        if self._probe is None or self._probe.done():
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to probe from
                self._probe = asyncio.get_running_loop().create_task(self._half_open(), name="redis-probe")
        return reason

    async def _half_open(self) -> None:
        while not self.available():
            await asyncio.sleep(min(self.cfg.probe_interval_s, max(0.0, self._down_until - time.monotonic())))
            if self.available():
                return
            try:
                await self.call("probe", self.client.ping)
            except Exception:  # noqa: BLE001 - still down: the breaker stays open
                self.metrics.redis_probes.inc("failure")
                continue
            self.metrics.redis_probes.inc("success")
            self._down_until = 0.0
            log.info("redis answers again; using it")
            return

    async def call(self, op: str, coro_fn: Any, *args: Any) -> Any:
        """Run one Redis call with a hard deadline (socket timeouts do not cover every wait; the
        pool wait, one retry and its reconnect are inside it)."""
        async with asyncio.timeout(self.timeout * 4 + self.cfg.connect_timeout_ms / 1000):
            return await coro_fn(*args)

    async def ping(self) -> bool:
        try:
            await self.call("ping", self.client.ping)
            return True
        except Exception as exc:  # noqa: BLE001 - any Redis failure means "not there"
            self.failed("ping", exc)
            return False

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        await self.client.aclose()


_encode = msgspec.json.encode
_decode = msgspec.json.Decoder(dict[str, Any]).decode


class RedisCache:
    """Predictions in Redis (``SET key value EX ttl``), skipped while Redis is failing."""

    def __init__(self, conn: RedisConnection, cfg: CacheConfig, prefix: str = "sparkscore:pred:") -> None:
        self.conn = conn
        self.ttl = max(1, int(round(cfg.ttl_s)))
        self.prefix = prefix

    async def get(self, key: str) -> tuple[dict[str, Any] | None, str]:
        if not self.conn.available():
            return None, UNAVAILABLE
        try:
            raw = await self.conn.call("cache_get", self.conn.client.get, self.prefix + key)
        except Exception as exc:  # noqa: BLE001 - a cache failure must never fail the request
            self.conn.failed("cache_get", exc)
            return None, UNAVAILABLE
        if raw is None:
            return None, MISS
        try:
            return _decode(raw), HIT
        except msgspec.DecodeError:
            return None, MISS

    async def set(self, key: str, value: dict[str, Any]) -> None:
        if not self.conn.available():
            return
        try:
            await self.conn.call(
                "cache_set", self.conn.client.set, self.prefix + key, _encode(value), self.ttl
            )
        except Exception as exc:  # noqa: BLE001
            self.conn.failed("cache_set", exc)

    async def close(self) -> None:
        return None


class FeatureStore(Protocol):
    async def fetch(self, user_id: str, item_id: str) -> tuple[dict[str, bytes], dict[str, bytes]]: ...


class NoFeatureStore:
    async def fetch(self, user_id: str, item_id: str) -> tuple[dict[str, bytes], dict[str, bytes]]:
        from serving.errors import BadRequest

        raise BadRequest(
            "features: required, because no feature store is configured "
            "(start the scorer with --redis-url to assemble features from Redis user:/item: hashes)"
        )


class RedisFeatureStore:
    """``HGETALL user:{id}`` and ``item:{id}`` in one round trip."""

    def __init__(self, conn: RedisConnection) -> None:
        self.conn = conn

    async def fetch(self, user_id: str, item_id: str) -> tuple[dict[str, bytes], dict[str, bytes]]:
        if not self.conn.available():
            raise StoreUnavailable(f"the feature store (Redis) is unavailable: {self.conn.last_error}")
        try:
            async with self.conn.client.pipeline(transaction=False) as pipe:
                pipe.hgetall(f"user:{user_id}")
                pipe.hgetall(f"item:{item_id}")
                user, item = await self.conn.call("features", pipe.execute)
        except Exception as exc:  # noqa: BLE001 - reported as 503, never a 500
            reason = self.conn.failed("features", exc)
            raise StoreUnavailable(f"the feature store (Redis) is unavailable: {reason}") from None
        return _text_keys(user), _text_keys(item)


def _text_keys(h: dict[Any, bytes]) -> dict[str, bytes]:
    return {(k.decode() if isinstance(k, bytes) else str(k)): v for k, v in h.items()}
