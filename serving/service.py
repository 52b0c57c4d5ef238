"""One instance in, one prediction out: features, cache, batcher and readiness.

The HTTP layer (:mod:`serving.app`) parses requests into :class:`Instance` and
calls :meth:`Service.predict`. Features come from the request or from the
feature store; the prediction cache is checked first (keyed by model version
plus entity ids or feature values); a miss goes through the dynamic batcher to
the model. Every failure is a :class:`~serving.errors.RequestError` carrying its
HTTP status.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Hashable
from typing import Any

import msgspec

from serving.batcher import Batcher
from serving.config import ServeConfig
from serving.errors import BadRequest, DeadlineExceeded, NotFound, NotReady
from serving.metrics import Metrics
from serving.model import ModelRunner, Row
from serving.store import (
    HIT,
    MISS,
    OFF,
    UNAVAILABLE,
    FeatureStore,
    LocalCache,
    NoCache,
    NoFeatureStore,
    PredictionCache,
    RedisCache,
    RedisConnection,
    RedisFeatureStore,
)
from udfs.core import ERROR, PREDICTION, short_reason

log = logging.getLogger("serving")

FeatureValue = float | list[float | None] | None


class Instance(msgspec.Struct, forbid_unknown_fields=True):
    """One thing to score: entity ids, and optionally the feature values themselves.

    ``features`` is a list in the model's input-column order (for an array-column
    model: the vector) or an object keyed by column name. Without it, features
    are read from the feature store; ``context`` then supplies or overrides
    request-time values by column name.
    """

    user_id: str | int | None = None
    item_id: str | int | None = None
    features: list[float | None] | dict[str, FeatureValue] | None = None
    context: dict[str, float | None] | None = None


class Service:
    """The scorer behind the HTTP layer; ``runner.score`` is what micro-batches are sent to."""

    def __init__(self, cfg: ServeConfig, runner: ModelRunner, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.runner = runner
        self.version = runner.version
        self.name = runner.model.name
        self.metrics = metrics or Metrics(self.name, self.version)
        self.batcher = Batcher(runner.score, cfg.batcher, self.metrics)
        self.columns = runner.columns
        self.cache: PredictionCache = NoCache()
        self.store: FeatureStore = NoFeatureStore()
        self.redis: RedisConnection | None = None
        self.ready = False
        self.load_error: str | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._load_task: asyncio.Task[None] | None = None
        # Cache-key prefixes: by feature values, or by entity ids (plus context).
        self._fkey = f"{self.version}|f|"
        self._ekey = f"{self.version}|e|"
        self.metrics.gauge(
            "sparkscore_ready", "1 once the model is loaded and warmed up", lambda: float(self.ready)
        )

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Start the batcher and load the model in the background (readiness stays false until done)."""
        if self.cfg.redis.url:
            self.redis = RedisConnection(self.cfg.redis, self.metrics)
            self.store = RedisFeatureStore(self.redis)
        if self.cfg.cache.enabled:
            self.cache = RedisCache(self.redis, self.cfg.cache) if self.redis else LocalCache(self.cfg.cache)
        await self.batcher.start()
        self._load_task = asyncio.get_running_loop().create_task(self._load(), name="model-load")

    async def _load(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.runner.load)
        except Exception as exc:  # reported by readiness and the log, not a crash
            self.load_error = f"the model failed to load: {short_reason(exc)}"
            log.error(self.load_error, exc_info=exc)
            return
        # Move the model, torch and everything loaded so far out of the collector's sight:
        # otherwise each full collection rescans ~10^5 long-lived objects on the request path.
        gc.freeze()
        if self.redis is not None and not await self.redis.ping():
            log.warning("Redis at %s does not answer; serving without it until it does", self.cfg.redis.url)
        self.ready = True
        log.info("ready: model %s version %s", self.name, self.version)

    async def stop(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        await self.batcher.stop()
        self.runner.close()
        for task in list(self._background):
            task.cancel()
        await self.cache.close()
        if self.redis is not None:
            await self.redis.close()

    def check_ready(self) -> None:
        if not self.ready:
            raise NotReady(self.load_error or "the model is still loading; retry shortly")

    # -- features -------------------------------------------------------------------

    def row_from_features(self, features: list[float | None] | dict[str, FeatureValue]) -> Row:
        """The request's feature values in input-column order (shape problems are 422s)."""
        cols = self.columns
        if self.runner.array_layout:
            if isinstance(features, list):
                return (features,)
            vec = features.get(cols[0], _ABSENT)
            extra = sorted(set(features) - {cols[0]})
            if vec is _ABSENT or extra:
                raise BadRequest(
                    f"features: give the list directly or as {{{cols[0]!r}: [...]}}; got keys {sorted(features)}"
                )
            if not isinstance(vec, list):
                raise BadRequest(f"features.{cols[0]}: expected a list of {self.runner.width} numbers")
            return (vec,)
        if isinstance(features, list):
            if len(features) != len(cols):
                raise BadRequest(
                    f"features: expected {len(cols)} values ({', '.join(cols)}), got {len(features)}"
                )
            return tuple(features)
        missing = [c for c in cols if c not in features]
        if missing:
            raise BadRequest(f"features: missing {missing}; the model reads {list(cols)}")
        unknown = sorted(set(features) - set(cols))
        if unknown:
            raise BadRequest(f"features: unknown {unknown}; the model reads {list(cols)}")
        row = tuple(features[c] for c in cols)
        for c, v in zip(cols, row, strict=True):
            if isinstance(v, list):
                raise BadRequest(f"features.{c}: expected a number or null, got a list")
        return row

    async def row_from_store(self, inst: Instance) -> Row:
        """Assemble features from ``context``, then ``user:{id}``, then ``item:{id}``, per column."""
        uid, iid = str(inst.user_id), str(inst.item_id)
        user, item = await self.store.fetch(uid, iid)
        if not user or not item:
            absent = [
                f"{kind} {eid!r} (no hash at {kind}:{eid})"
                for kind, eid, h in (("user", uid, user), ("item", iid, item))
                if not h
            ]
            raise NotFound(f"not in the feature store: {' and '.join(absent)}")
        context = inst.context or {}
        values: list[Any] = []
        for col in self.columns:
            if col in context:
                values.append(context[col])
                continue
            for where, h in ((f"user:{uid}", user), (f"item:{iid}", item)):
                if col in h:
                    values.append(self._parse_stored(col, where, h[col]))
                    break
            else:
                raise BadRequest(
                    f"feature {col!r} is in none of context, user:{uid} and item:{iid}; "
                    f"the model reads {list(self.columns)}"
                )
        return tuple(values)

    def _parse_stored(self, col: str, where: str, raw: bytes) -> Any:
        text = raw.decode(errors="replace").strip()
        if self.runner.array_layout:
            try:
                return msgspec.json.decode(raw, type=list[float | None])
            except msgspec.DecodeError:
                raise BadRequest(
                    f"feature {col!r} in {where} is not a JSON list of numbers: {text[:80]!r}"
                ) from None
        try:
            return float(text)
        except ValueError:
            raise BadRequest(f"feature {col!r} in {where} is not a number: {text[:80]!r}") from None

    # -- prediction -----------------------------------------------------------------

    async def predict(self, inst: Instance, deadline: float) -> dict[str, Any]:
        """Score one instance before ``deadline`` (time.monotonic()); the response fields, or a RequestError."""
        if not self.ready:
            self.check_ready()
        key, row = self.key_of(inst)
        out, status = self.lookup(key)
        if out is not None:
            return out
        return await self.compute(key, deadline, row, inst, status)

    async def predict_row(self, row: Row, deadline: float) -> dict[str, Any]:
        """Score one row of feature values (the KServe v2 path)."""
        self.check_ready()
        key = self._row_key(row)
        out, status = self.lookup(key)
        if out is not None:
            return out
        return await self.compute(key, deadline, row, None, status)

    def key_of(self, inst: Instance) -> tuple[Hashable, Row | None]:
        """The instance's cache key, and its row when it carries its features (else None: the store has them)."""
        features = inst.features
        if features is not None:
            row = self.row_from_features(features)
            return self._row_key(row), row
        for name in ("user_id", "item_id"):
            if getattr(inst, name) is None:
                raise BadRequest(f"{name}: required when features is absent")
        ctx = tuple(sorted(inst.context.items())) if inst.context else ()
        ids = (str(inst.user_id), str(inst.item_id), ctx)
        return (self._ekey + repr(ids) if self._string_keys() else ("e", *ids)), None

    def _string_keys(self) -> bool:
        """Whether cache keys must be strings (Redis); in-process keys are tuples, hashed without repr()."""
        cache = type(self.cache)
        return cache is not LocalCache and cache is not NoCache

    def _row_key(self, row: Row) -> Hashable:
        """The cache (and in-flight coalescing) key of a row of feature values."""
        if self._string_keys():
            return self._fkey + repr(row)
        # repr() of the floats was ~1 us of a cache hit; a tuple of them hashes in a tenth of that.
        return ("f", tuple(row[0])) if self.runner.array_layout else ("f", row)

    def lookup(self, key: Hashable) -> tuple[dict[str, Any] | None, str | None]:
        """The cache without awaiting: ``(fields, HIT)`` on an in-process hit, ``(None, status)`` when the
        model is needed, ``(None, None)`` when the cache (Redis) must be awaited by :meth:`compute`."""
        cache = self.cache
        if type(cache) is LocalCache:
            cached, status = cache.lookup(key)
        elif type(cache) is NoCache:
            return None, OFF
        else:
            return None, None
        if cached is not None:
            self.metrics.cache_hits.inc()
            return {**cached, "cache_hit": True}, status
        return None, status

    async def compute(
        self, key: Hashable, deadline: float, row: Row | None, inst: Instance | None, status: str | None
    ) -> dict[str, Any]:
        """Everything after a :meth:`lookup` that did not answer: the awaited cache, the store, the model."""
        metrics = self.metrics
        if status is None:
            assert isinstance(key, str)
            cached, status = await self.cache.get(key)
            if status == HIT:
                metrics.cache_hits.inc()
                return {**cached, "cache_hit": True}  # type: ignore[dict-item]
        if status != OFF:
            metrics.cache_misses.inc()
            if status == UNAVAILABLE:
                metrics.cache_unavailable.inc()
        if row is None:
            assert inst is not None
            row = await self.row_from_store(inst)
        remaining_ms = (deadline - time.monotonic()) * 1000
        if remaining_ms <= 0:
            raise DeadlineExceeded("the deadline passed before the request reached the model")
        result = await self.batcher.submit(row, remaining_ms, key)
        error = result.get(ERROR)
        if error is not None:
            raise BadRequest(error)
        public = {("score" if k == PREDICTION else k): v for k, v in result.items() if k != ERROR}
        if status == OFF:
            public["cache_hit"] = False
            return public
        if status == MISS:
            self._cache_set(key, public)
        out = {**public, "cache_hit": False}
        if status == UNAVAILABLE:
            out["cache"] = UNAVAILABLE
        return out

    def _cache_set(self, key: Hashable, value: dict[str, Any]) -> None:
        if isinstance(self.cache, LocalCache):
            self.cache.put(key, value)
            return
        assert isinstance(key, str)
        # Redis: written after the response, off the request's latency.
        task = asyncio.get_running_loop().create_task(self.cache.set(key, value))
        self._background.add(task)
        task.add_done_callback(self._background.discard)


_ABSENT: Any = object()
