"""One instance in, one prediction out: features, cache, batcher and readiness.

The HTTP layer (:mod:`serving.app`) parses requests into :class:`Instance` and
calls :meth:`Service.predict`. Features come from the request or from the
feature store; the prediction cache is checked first (keyed by model version
plus entity ids or feature values); a miss goes through the dynamic batcher to
the model. Every failure is a :class:`~serving.errors.RequestError` carrying its
HTTP status.

Model versions (:mod:`serving.versions`): a new version loads and warms up in the
background and then replaces the primary in one assignment (:meth:`Service.reload`,
from ``POST /v2/repository/models/{name}/load`` or the opt-in file watch); cache
keys start with the version, so no answer of the old version is served after the
swap. A ``[candidate]`` answers a sticky share of users (canary) or shadows every
micro-batch. ``[reload] follow`` and ``[candidate] follow`` name registry aliases polled
together (:meth:`Service._follow`): a moved alias loads the primary or the candidate anew.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import time
import zlib
from collections.abc import Callable, Hashable
from dataclasses import replace
from typing import Any

import msgspec

from serving.config import ServeConfig
from serving.errors import BadRequest, DeadlineExceeded, LoadFailed, NotFound, NotReady
from serving.metrics import InfoGauge, Metrics
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
from serving.versions import CANARY, PRIMARY, SHADOW, ModelVersion, Shadow, ShadowMetrics
from udfs import model_store
from udfs.core import DEGRADED, ERROR, PREDICTION, check_model, short_reason
from udfs.errors import SparkscoreError
from udfs.signature import InputError, row_from_inputs
from udfs.spec import ModelSpec, ResolvedModel, resolve, with_overrides

log = logging.getLogger("serving")

FeatureValue = float | list[float | None] | None
OUTAGE_LOG_INTERVAL_S = 60.0  # a registry outage is logged at most this often (and always counted)
CANDIDATE = "candidate"  # the followed role of the [candidate] (a canary or a shadow)


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
    # A model with [[model.inputs]]: each input's value by name (numbers, nested lists of numbers).
    inputs: dict[str, Any] | None = None


class Service:
    """The scorer behind the HTTP layer: the primary model version, an optional candidate, cache, store."""

    def __init__(
        self,
        cfg: ServeConfig,
        runner: ModelRunner,
        metrics: Metrics | None = None,
        *,
        candidate_runner: ModelRunner | None = None,
        runner_factory: Callable[[ResolvedModel], ModelRunner] | None = None,
        worker: str | None = None,
        follow_leader: bool = True,
    ) -> None:
        self.cfg = cfg
        self.name = runner.model.name
        self.worker = worker
        self.metrics = metrics or Metrics(self.name, worker=worker)
        self.runner_factory = runner_factory or (lambda model: ModelRunner.from_config(cfg, model))
        self.primary = self._version(runner, PRIMARY)
        self.spec: ModelSpec = runner.model.spec
        self.columns = runner.columns
        self.array_layout = runner.array_layout
        self.candidate: ModelVersion | None = None
        self.traffic = 0.0  # canary share, once the candidate is loaded
        self.shadow: Shadow | None = None
        self.candidate_reload: dict[str, Any] = {}
        if cfg.candidate is not None:
            try:
                cand = candidate_runner or self.runner_factory(resolve(cfg.candidate.model))
            except SparkscoreError as exc:
                # A followed alias deleted (or a registry down) when a worker (re)starts: serve without
                # the candidate; the rollout state or the alias's next move brings it back.
                if not cfg.candidate.follow:
                    raise
                reason = f"the candidate {cfg.candidate.follow} could not be resolved: {exc}"
                self.candidate_reload = {"state": "FAILED", "reason": reason, "serving": "no candidate"}
                log.error("model %s: %s; serving without it", self.name, reason)
            else:
                self.candidate = self._version(cand, SHADOW if cfg.candidate.shadow else CANARY)
        self.cache: PredictionCache = NoCache()
        self.store: FeatureStore = NoFeatureStore()
        self.redis: RedisConnection | None = None
        self.ready = False  # loaded and warmed up: requests are admitted
        self.draining = False  # SIGTERM: readiness says no, admitted requests are still served
        self.load_error: str | None = None
        self.last_reload: dict[str, Any] = {}
        self._reload_lock = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()
        self._retiring_shadows: list[Shadow] = []
        self._load_task: asyncio.Task[None] | None = None
        # [reload] follow: one process polls the registry (the first worker); with several workers the
        # App's hook (on_follow: the workers' rollout) loads the concrete version in every worker.
        self.follow_leader = follow_leader
        # Called with (params, role): role "primary" loads the primary, "candidate" the candidate.
        self.on_follow: Callable[[dict[str, str], str], Any] | None = None
        # Per followed role: a version that failed to load (not retried until the alias moves), and
        # why the alias could not be followed at the last poll ("" when it could).
        self._follow_failed: dict[str, str] = {}
        self.follow_problem: dict[str, str] = {}
        self._outage_logged: dict[str, float] = {}
        self.metrics.gauge(
            "sparkscore_ready", "1 once the model is loaded and warmed up", lambda: float(self.ready)
        )
        self.metrics.gauges.append(
            InfoGauge(
                "sparkscore_model_version_info",
                "The versions serving now, by role (primary; canary or shadow: the candidate)",
                self.serving_versions,
            )
        )
        if self.followed():
            self.metrics.labelled_gauge(
                "sparkscore_registry_follow_ok",
                "1 when the last poll found the followed alias, 0 when it was not set or the registry "
                "was unreachable (the version already loaded keeps serving), by role",
                "role",
                lambda: {role: float(not self.follow_problem.get(role)) for role, _, _ in self.followed()},
            )

    def serving_versions(self) -> list[dict[str, str]]:
        """The primary's version, and the candidate's (with its role) when one is loaded."""
        out = [{"role": PRIMARY, "version": self.version}]
        cand = self.candidate
        if cand is not None and (cand.role == CANARY and self.traffic > 0 or self.shadow is not None):
            out.append({"role": cand.role, "version": cand.version})
        return out

    def candidate_info(self) -> dict[str, Any] | None:
        """The [candidate] as the metadata and the index show it: role, version ("" when none is
        loaded), the followed alias, and why the alias could not be followed or its last load failed."""
        cfg = self.cfg.candidate
        if cfg is None:
            return None
        cand = self.candidate
        live = cand is not None and (self.traffic > 0 or self.shadow is not None)
        info: dict[str, Any] = {
            "role": SHADOW if cfg.shadow else CANARY,
            "version": cand.version if cand is not None and live else "",
        }
        if cfg.follow:
            info["follow"] = cfg.follow
        reason = self.follow_problem.get(CANDIDATE) or self.candidate_reload.get("reason")
        if reason:
            info["reason"] = reason
        return info

    def followed(self) -> list[tuple[str, str, str | None]]:
        """(role, alias URI, registry URI) of each followed alias: the primary's ([reload] follow) and
        the candidate's ([candidate] follow); role is "primary" or "candidate"."""
        out: list[tuple[str, str, str | None]] = []
        if self.cfg.reload.follow:
            out.append((PRIMARY, self.cfg.reload.follow, self.cfg.model.registry_uri))
        cand = self.cfg.candidate
        if cand is not None and cand.follow:
            out.append((CANDIDATE, cand.follow, cand.model.registry_uri))
        return out

    def _version(self, runner: ModelRunner, role: str) -> ModelVersion:
        mv = self._new_version(runner, role)
        mv.batcher.admitted = lambda: self.admitted()
        return mv

    def admitted(self) -> int:
        """Requests the HTTP layer has admitted and not answered; set by :class:`serving.app.App`."""
        return 1 << 30  # unknown: the batcher waits max_wait_ms as configured

    def _new_version(self, runner: ModelRunner, role: str) -> ModelVersion:
        vm = self.metrics.for_version(runner.version, role)
        if runner.model.is_ensemble:
            vm.labelled_gauge(
                "sparkscore_member_hung_calls",
                "Ensemble member calls running past their timeout (their threads set aside)",
                "member",
                runner.hung_members,  # type: ignore[arg-type]
            )
        return ModelVersion(runner, self.cfg.batcher, vm, role)

    def problem(self) -> str | None:
        """Why the loaded model cannot answer fully right now (readiness then says not ready)."""
        cand = self.candidate
        return self.primary.runner.problem() or (cand.runner.problem() if cand is not None else None)

    @property
    def runner(self) -> ModelRunner:
        return self.primary.runner

    @property
    def version(self) -> str:
        return self.primary.version

    def versions(self) -> list[str]:
        """Versions that answer requests: the primary, and a canary candidate."""
        cand = self.candidate
        return [self.version] + ([cand.version] if cand is not None and cand.role == CANARY else [])

    def version_named(self, version: str) -> ModelVersion | None:
        if version == self.primary.version:
            return self.primary
        cand = self.candidate
        if cand is not None and cand.role == CANARY and version == cand.version:
            return cand
        return None

    # -- lifecycle ------------------------------------------------------------------

    async def start(self, *, wait: bool = False) -> None:
        """Start the batcher and load the model in the background (readiness stays false until done).

        ``wait``: return only once loaded (a worker process then accepts no connection before it can answer).
        """
        if self.cfg.redis.url:
            self.redis = RedisConnection(self.cfg.redis, self.metrics)
            self.store = RedisFeatureStore(self.redis)
        if self.cfg.cache.enabled:
            self.cache = RedisCache(self.redis, self.cfg.cache) if self.redis else LocalCache(self.cfg.cache)
        await self.primary.start()
        self._load_task = asyncio.get_running_loop().create_task(self._load(), name="model-load")
        if wait:
            await self._load_task
            if self.load_error:
                raise RuntimeError(self.load_error)

    async def _load(self) -> None:
        try:
            await self.primary.load()
        except Exception as exc:  # reported by readiness and the log, not a crash
            self.load_error = f"the model failed to load: {short_reason(exc)}"
            self.metrics.model_loads.inc("failure")
            log.error(self.load_error, exc_info=exc)
            return
        self.metrics.model_loads.inc("success")
        if self.candidate is not None:
            await self._start_candidate(self.candidate)
        # Move the model, torch and everything loaded so far out of the collector's sight:
        # otherwise each full collection rescans ~10^5 long-lived objects on the request path.
        gc.freeze()
        if self.redis is not None and not await self.redis.ping():
            log.warning("Redis at %s does not answer; serving without it until it does", self.cfg.redis.url)
        self.ready = True
        if self.cfg.reload.watch:
            self._spawn(self._watch(), "model-watch")
        if self.followed() and self.follow_leader:
            self._spawn(self._follow(), "model-follow")
        log.info("ready: model %s version %s", self.name, self.version)

    async def _start_candidate(self, cand: ModelVersion) -> None:
        """Load the candidate; a candidate that fails to load is dropped, never the primary."""
        assert self.cfg.candidate is not None
        try:
            await cand.load()
        except Exception as exc:  # noqa: BLE001 - the primary serves on
            self.candidate = None
            self.candidate_reload = {
                "state": "FAILED",
                "reason": short_reason(exc),
                "serving": "no candidate",
            }
            self.metrics.model_loads.inc("failure")
            log.error(
                "candidate version %s failed to load, serving without it: %s", cand.version, short_reason(exc)
            )
            return
        self.metrics.model_loads.inc("success")
        if cand.role == SHADOW:
            metrics = ShadowMetrics(self.name, cand.version, self.worker)
            self.metrics.extra.append(metrics)
            self.shadow = Shadow(cand, metrics, self.cfg.candidate.max_pending_batches)
            self.primary.batcher.on_batch = self.shadow.offer
        else:
            await cand.start()
            self.traffic = self.cfg.candidate.traffic
        log.info("candidate %s version %s is live (%s)", self.name, cand.version, cand.role)

    async def stop(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        await self.primary.stop()
        if self.candidate is not None:
            await self.candidate.stop()
        if self.shadow is not None:
            self.shadow.close()
        for task in list(self._background):
            task.cancel()
        if self._retiring_shadows:
            for old in self._retiring_shadows:
                old.close()
                old.candidate.runner.close()
        await self.cache.close()
        if self.redis is not None:
            await self.redis.close()

    def check_ready(self) -> None:
        if not self.ready:
            raise NotReady(self.load_error or "the model is still loading; retry shortly")

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- model updates --------------------------------------------------------------

    async def reload(self, *, path: str | None = None, version: str | None = None) -> dict[str, Any]:
        """Load the model file(s) again (or ``path``), warm the new version up, then swap it in.

        Requests keep being answered by the old version until the swap, and those it already
        holds finish on it. A file that fails to load leaves the old version serving: the
        reason is logged, counted (``sparkscore_model_loads_total{result="failure"}``) and
        raised as :class:`LoadFailed`. Loads are one at a time.
        """
        if path is not None:
            path = self.check_load_path(path)
        async with self._reload_lock:
            old = self.primary
            try:
                spec = with_overrides(self.spec, path=path) if path else self.spec
                # A pinned version names the file it was pinned for: a changed file gets its content hash.
                spec = replace(spec, version=version) if version else _unpinned(spec)
                loop = asyncio.get_running_loop()
                model = await loop.run_in_executor(None, resolve, spec)
                if model.content_hash == old.model.content_hash and version in (None, old.version):
                    return self._reloaded(old.version, old.version, changed=False)
                if model.version == old.version:
                    raise LoadFailed(f"version {old.version!r} is already serving different model content")
                # Load the files on the CPU and score a row of zeros before building anything.
                await loop.run_in_executor(None, check_model, model)
                new = self._version(self.runner_factory(model), PRIMARY)
                await new.load()
            except Exception as exc:  # noqa: BLE001 - every load failure keeps the old version
                reason, failed = self._load_failed(exc, "model version", old.version)
                self.last_reload = {"state": "FAILED", "reason": reason, "serving": old.version}
                raise failed from None
            await new.start()
            new.batcher.on_batch = old.batcher.on_batch  # a shadow keeps following the primary
            self.primary = new  # the swap: requests from here on go to the new version
            self.spec = model.spec
            self.metrics.model_loads.inc("success")
            self._spawn(old.retire(self.cfg.batcher.max_timeout_ms / 1000), "retire-" + old.version)
            log.info("model %s: version %s replaced %s", self.name, new.version, old.version)
            return self._reloaded(new.version, old.version, changed=True)

    def _load_failed(self, exc: Exception, what: str, serving: str) -> tuple[str, LoadFailed]:
        """Count and log a ``what`` that failed to load; its reason and the error to raise."""
        reason = exc.message if isinstance(exc, LoadFailed) else short_reason(exc)
        self.metrics.model_loads.inc("failure")
        log.error(
            "model %s: the new %s failed to load, %s keeps serving: %s", self.name, what, serving, reason
        )
        return reason, LoadFailed(f"the new {what} failed to load, {serving} keeps serving: {reason}")

    def load_dir(self) -> str | None:
        """The directory ``parameters.path`` must be under (None: the model comes from a URI)."""
        if self.cfg.reload.load_dir:
            return os.path.realpath(self.cfg.reload.load_dir)
        first = self.cfg.model.paths[0] if self.cfg.model.paths else ""
        return None if _is_uri(first) else os.path.dirname(os.path.realpath(first))

    def check_load_path(self, path: str) -> str:
        """The path to load (a relative one is under the load directory); a path outside it (or a URI,
        unless allowed) is refused before it is touched: the answer is the same whether or not it exists."""
        if _is_uri(path):
            if self.cfg.reload.load_uris or self.is_followed_version(path):
                return path
            raise LoadFailed(
                f"parameters.path {path!r} is a model URI; set [reload] load_uris = true to allow loading URIs"
            )
        root = self.load_dir()
        full = os.path.realpath(os.path.join(root or "/", path))
        if root is None or os.path.commonpath([root, full]) != root:
            where = f"under {root}" if root else "(no [reload] load_dir is set)"
            raise LoadFailed(
                f"parameters.path must name a model file {where}; set [reload] load_dir to load from elsewhere"
            )
        return full

    def is_followed_version(self, path: str) -> bool:
        """Whether ``path`` is a concrete version (models:/name/N) of a model [reload] follow or
        [candidate] follow names: what the follow loop rolls out, allowed without load_uris."""
        if not path.startswith("models:/"):
            return False
        try:
            got = model_store.parse_uri(path)
            names = {model_store.parse_uri(uri).name for _, uri, _ in self.followed()}
        except SparkscoreError:
            return False
        return got.kind == "registry" and bool(got.version) and got.name in names

    def _reloaded(self, version: str, previous: str, *, changed: bool, role: str = PRIMARY) -> dict[str, Any]:
        out = {
            "model_name": self.name,
            "model_version": version,
            "previous_version": previous,
            "changed": changed,
        }
        if role == PRIMARY:
            self.last_reload = {"state": "READY", "reason": "", "serving": version}
        else:
            out["role"] = role
        return out

    async def _watch(self) -> None:
        """Poll the model files; a changed file (stable for one poll) is loaded like a POST .../load."""
        poll = self.cfg.reload.poll_s
        seen = _stats(self.spec.paths)
        while True:
            await asyncio.sleep(poll)
            now = _stats(self.spec.paths)
            if now == seen:
                continue
            await asyncio.sleep(poll)  # a file still being written changes again: wait for it to settle
            if _stats(self.spec.paths) != now:
                continue
            seen = now
            # A failure is logged and counted; the next change of the file is tried again.
            with contextlib.suppress(LoadFailed):
                await self.reload()

    async def reload_candidate(self, path: str) -> dict[str, Any]:
        """Load ``path`` as the [candidate]'s new version, warm it up, then swap it in: a canary's
        requests already routed to the old version finish on it; a shadow's pending comparisons are
        dropped with the old one. A version that fails to load leaves the old candidate serving
        (logged, counted, in the repository index) and raises :class:`LoadFailed`."""
        cfg = self.cfg.candidate
        if cfg is None:
            raise LoadFailed("no [candidate] is configured, so there is no candidate to load")
        path = self.check_load_path(path)
        role = SHADOW if cfg.shadow else CANARY
        async with self._reload_lock:
            old = self.candidate
            serving = old.version if old is not None else "no candidate"
            try:
                loop = asyncio.get_running_loop()
                model = await loop.run_in_executor(
                    None, resolve, _unpinned(with_overrides(cfg.model, path=path))
                )
                if old is not None and model.content_hash == old.model.content_hash:
                    self.candidate_reload = {"state": "READY", "reason": "", "serving": old.version}
                    return self._reloaded(old.version, old.version, changed=False, role=role)
                await loop.run_in_executor(None, check_model, model)
                new = self._version(self.runner_factory(model), role)
                await new.load()
            except Exception as exc:  # noqa: BLE001 - every load failure keeps the old candidate
                reason, failed = self._load_failed(exc, "candidate version", serving)
                self.candidate_reload = {"state": "FAILED", "reason": reason, "serving": serving}
                raise failed from None
            grace = self.cfg.batcher.max_timeout_ms / 1000
            if role == SHADOW:
                old_shadow = self.shadow
                metrics = ShadowMetrics(self.name, new.version, self.worker)
                self.metrics.extra.append(metrics)
                shadows = [m for m in self.metrics.extra if isinstance(m, ShadowMetrics)]
                for stale in shadows[:-6]:  # the last few candidates' comparisons stay visible
                    self.metrics.extra.remove(stale)
                self.shadow = Shadow(new, metrics, cfg.max_pending_batches)
                self.candidate = new
                self.primary.batcher.on_batch = self.shadow.offer  # the swap
                if old_shadow is not None:
                    self._retiring_shadows.append(old_shadow)
                    self._spawn(
                        self._retire_shadow(old_shadow, grace),
                        "retire-shadow-" + old_shadow.candidate.version,
                    )
            else:
                await new.start()
                self.candidate = new  # the swap: requests routed from here on go to the new version
                self.traffic = cfg.traffic
                if old is not None:
                    self._spawn(old.retire(grace), "retire-" + old.version)
            self.metrics.model_loads.inc("success")
            self.candidate_reload = {"state": "READY", "reason": "", "serving": new.version}
            log.info("model %s: candidate version %s replaced %s (%s)", self.name, new.version, serving, role)
            return self._reloaded(new.version, serving, changed=True, role=role)

    async def _retire_shadow(self, old: Shadow, grace_s: float) -> None:
        """Drop an old shadow's queued comparisons, let a running one finish, then free its model."""
        old.close()
        end = time.monotonic() + grace_s
        while old.pending > 0 and time.monotonic() < end:
            await asyncio.sleep(0.01)
        old.candidate.runner.close()
        self._retiring_shadows.remove(old)

    async def _follow(self) -> None:
        """Poll the followed aliases (the primary's [reload] follow, the candidate's [candidate] follow)
        every poll_s, in one registry call per registered model; when one points at another version,
        load that concrete version (``models:/name/N``) in the background, warm it up and swap it in,
        here and in every worker.

        A registry outage or a deleted alias keeps the current version serving (counted, shown by the
        index and ``sparkscore_registry_follow_ok``, logged at most once a minute); a version that fails
        to load or warm up is not swapped in (the index and the log say why) and is not retried until
        the alias moves again.
        """
        targets = self.followed()
        by_registry: dict[str | None, list[str]] = {}
        for _, uri, registry in targets:
            by_registry.setdefault(registry, []).append(uri)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.cfg.reload.poll_s)
            found: dict[str, tuple[str, str] | None] = {}
            failed: dict[str, str] = {}
            for registry, uris in by_registry.items():
                try:
                    found.update(await loop.run_in_executor(None, model_store.peek_all, uris, registry))
                except SparkscoreError as exc:
                    failed.update(dict.fromkeys(uris, str(exc)))
            for role, uri, _ in targets:
                if uri in failed:
                    self.metrics.registry_polls.inc((role, "unreachable"))
                    self._follow_trouble(role, f"cannot poll {uri}: {failed[uri]}")
                elif found[uri] is None:
                    self.metrics.registry_polls.inc((role, "missing"))
                    self._follow_trouble(role, f"{uri} is not set in the registry (the alias was deleted?)")
                else:
                    self.follow_problem[role] = ""
                    await self._follow_one(role, uri, *found[uri])  # type: ignore[misc]

    def _follow_trouble(self, role: str, problem: str) -> None:
        """Remember why ``role``'s alias could not be followed; log it at most once a minute."""
        current = self.primary if role == PRIMARY else self.candidate
        serving = f"version {current.version} keeps serving" if current else "no candidate is loaded yet"
        self.follow_problem[role] = f"{problem}; {serving}"
        now = time.monotonic()
        if now - self._outage_logged.get(role, -OUTAGE_LOG_INTERVAL_S) >= OUTAGE_LOG_INTERVAL_S:
            self._outage_logged[role] = now
            log.warning("%s (%s): %s", self.name, role, self.follow_problem[role])

    async def _follow_one(self, role: str, uri: str, version: str, location: str) -> None:
        """``role``'s alias points at ``version`` (at ``location``; "" when only the version was asked):
        load it unless it is the version serving (or one that failed to load)."""
        current = self.primary if role == PRIMARY else self.candidate
        ref = current.model.members[0].store if current is not None else None
        if ref is not None and ref.registry_version == version and location in ("", ref.location):
            self.metrics.registry_polls.inc((role, "same"))
            return
        concrete = f"models:/{uri[len('models:/') :].split('@')[0].split('/')[0]}/{version}"
        if concrete == self._follow_failed.get(role):
            self.metrics.registry_polls.inc((role, "same"))
            return
        self.metrics.registry_polls.inc((role, "moved"))
        log.info("%s: %s now points at version %s; loading it (%s)", self.name, uri, version, role)
        try:
            if self.on_follow is not None:
                await self.on_follow({"path": concrete}, role)
            elif role == PRIMARY:
                await self.reload(path=concrete)
            else:
                await self.reload_candidate(concrete)
            self._follow_failed.pop(role, None)
        except LoadFailed:  # logged, counted and shown by the reload; the old version serves on
            self._follow_failed[role] = concrete

    # -- routing --------------------------------------------------------------------

    def route(self, user_id: str | int | None) -> ModelVersion:
        """The version that answers: the canary for a sticky share of users, else the primary."""
        cand = self.candidate
        if self.traffic <= 0 or cand is None:
            return self.primary
        # crc32, not hash(): the same user goes to the same version in every worker and restart.
        share = random.random() if user_id is None else zlib.crc32(str(user_id).encode()) / 4294967296.0
        return cand if share < self.traffic else self.primary

    # -- features -------------------------------------------------------------------

    def row_from_features(self, features: list[float | None] | dict[str, FeatureValue]) -> Row:
        """The request's feature values in input-column order (shape problems are 422s)."""
        cols = self.columns
        if self.array_layout:
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

    def row_from_inputs(self, inputs: dict[str, Any]) -> Row:
        """A typed model's named inputs as a row; a missing, unknown or misshapen input is a 400 naming it."""
        sig = self.runner.signature
        if sig is None:
            raise BadRequest(
                "inputs: this model reads features (input_columns), not named inputs", status=400
            )
        try:
            return row_from_inputs(sig, inputs)
        except InputError as exc:
            raise BadRequest(str(exc), status=400) from None

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
        if self.array_layout:
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

    async def predict(self, inst: Instance, deadline: float, gone: Any = None) -> dict[str, Any]:
        """Score one instance before ``deadline`` (time.monotonic()); the response fields, or a RequestError.

        ``gone``: the request's connection state (see :class:`serving.batcher.Batcher`).
        """
        if not self.ready:
            self.check_ready()
        mv = self.primary if self.traffic <= 0 else self.route(inst.user_id)
        # Held from the choice to the answer: a swap meanwhile does not stop this version under us.
        mv.holds += 1
        try:
            key, row = self.key_of(inst, mv.version)
            out, status = self.lookup(key)
            if out is not None:
                return out
            return await self.compute(mv, key, deadline, row, inst, status, gone)
        finally:
            mv.holds -= 1

    async def predict_row(
        self, row: Row, deadline: float, mv: ModelVersion | None = None, gone: Any = None
    ) -> dict[str, Any]:
        """Score one row of feature values (the KServe v2 path) with ``mv`` (default: the primary).

        The caller holds ``mv`` (see :attr:`ModelVersion.holds`) until every row is answered."""
        self.check_ready()
        mv = mv or self.primary
        key = self._row_key(row, mv.version)
        out, status = self.lookup(key)
        if out is not None:
            return out
        return await self.compute(mv, key, deadline, row, None, status, gone)

    def key_of(self, inst: Instance, version: str) -> tuple[Hashable, Row | None]:
        """The instance's cache key, and its row when it carries its features (else None: the store has them).

        Every key starts with the model version that answers, so a swap never serves an old answer.
        """
        sig = self.runner.signature
        if inst.inputs is not None or sig is not None:
            if sig is None:
                raise BadRequest(
                    "inputs: this model reads features (input_columns), not named inputs", status=400
                )
            if inst.inputs is None or inst.features is not None:
                names = [i.name for i in sig.fed]
                raise BadRequest(
                    f'inputs: this model takes named inputs {names}: send {{"inputs": {{...}}}}', status=400
                )
            row = self.row_from_inputs(inst.inputs)
            return self._row_key(row, version), row
        features = inst.features
        if features is not None:
            row = self.row_from_features(features)
            return self._row_key(row, version), row
        for name in ("user_id", "item_id"):
            if getattr(inst, name) is None:
                raise BadRequest(f"{name}: required when features is absent")
        ctx = tuple(sorted(inst.context.items())) if inst.context else ()
        ids = (str(inst.user_id), str(inst.item_id), ctx)
        return (f"{version}|e|{ids!r}" if self._string_keys() else (version, "e", *ids)), None

    def _string_keys(self) -> bool:
        """Whether cache keys must be strings (Redis); in-process keys are tuples, hashed without repr()."""
        cache = type(self.cache)
        return cache is not LocalCache and cache is not NoCache

    def _row_key(self, row: Row, version: str) -> Hashable:
        """The cache (and in-flight coalescing) key of a row of feature values."""
        if self._string_keys():
            return f"{version}|f|{row!r}"
        if self.runner.signature is not None:
            return (version, "f", repr(row))  # nested lists are not hashable
        # repr() of the floats was ~1 us of a cache hit; a tuple of them hashes in a tenth of that.
        return (version, "f", tuple(row[0])) if self.array_layout else (version, "f", row)

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
        self,
        mv: ModelVersion,
        key: Hashable,
        deadline: float,
        row: Row | None,
        inst: Instance | None,
        status: str | None,
        gone: Any = None,
    ) -> dict[str, Any]:
        """Everything after a :meth:`lookup` that did not answer: the awaited cache, the store, the model."""
        metrics = self.metrics
        if status is None or row is None:
            # Redis: the cache, then the feature store, both inside the request's deadline.
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    if status is None:
                        assert isinstance(key, str)
                        cached, status = await self.cache.get(key)
                        if status == HIT:
                            metrics.cache_hits.inc()
                            return {**cached, "cache_hit": True}  # type: ignore[dict-item]
                    if row is None:
                        assert inst is not None
                        row = await self.row_from_store(inst)
            except TimeoutError:
                raise DeadlineExceeded("the deadline passed while waiting for Redis") from None
        if status != OFF:
            metrics.cache_misses.inc()
            if status == UNAVAILABLE:
                metrics.cache_unavailable.inc()
        assert row is not None
        remaining_ms = (deadline - time.monotonic()) * 1000
        if remaining_ms <= 0:
            raise DeadlineExceeded("the deadline passed before the request reached the model")
        result = await mv.batcher.submit(row, remaining_ms, key, gone)
        error = result.get(ERROR)
        if error is not None:
            raise BadRequest(error)
        mv.metrics.predictions.inc()
        public = {("score" if k == PREDICTION else k): v for k, v in result.items() if k != ERROR}
        if status == OFF:
            public["cache_hit"] = False
            return public
        # A degraded ensemble answer (a member missing) is served but never cached.
        if status == MISS and not result.get(DEGRADED):
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


def _is_uri(path: str) -> bool:
    return "://" in path or path.startswith(("models:/", "runs:/"))


def _unpinned(spec: ModelSpec) -> ModelSpec:
    """The spec with a pinned version dropped (an ensemble derives its own)."""
    return spec if spec.is_ensemble or spec.version is None else replace(spec, version=None)


def _stats(paths: tuple[str, ...]) -> list[tuple[int, int] | None]:
    """(mtime_ns, size) of each file; None for a file that is missing right now."""
    out: list[tuple[int, int] | None] = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            out.append(None)
            continue
        out.append((st.st_mtime_ns, st.st_size))
    return out
