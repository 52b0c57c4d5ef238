"""The HTTP layer: a plain ASGI callable (no web framework), JSON through msgspec.

Routes:

* ``POST /predict``: one instance ``{"user_id", "item_id", "features"?, "context"?,
  "timeout_ms"?}`` (a model with ``[[model.inputs]]``: ``{"inputs": {name: value}}``), a JSON list
  of instances, or ``{"instances": [...], "timeout_ms"?}``.
* KServe v2: ``POST /v2/models/{name}[/versions/{v}]/infer`` (JSON, or the binary tensor data
  extension: ``Inference-Header-Content-Length``, as ``tritonclient.http`` sends by default),
  ``GET /v2/models/{name}``, ``GET /v2/models/{name}/ready``, ``GET /v2/health/live``,
  ``GET /v2/health/ready``, ``GET /v2``.
* Model repository extension: ``POST /v2/repository/index``, ``POST /v2/repository/models/{name}/load``
  (load the model file again, or ``{"parameters": {"path": ...}}``, and swap it in without downtime).
* ``GET /metrics``: Prometheus text (with several workers: every worker's, in one scrape).

Status codes: 400 malformed JSON (or nested deeper than 64), readiness while not ready (empty
body), 401 bad token, 404 unknown entity/model, 405 wrong method on a known route (with Allow),
408 headers or body not received in time, 413 body too large, 422 wrong
types/lengths/datatypes/shapes/bad feature values (the message names the field, or is the
scoring core's reason), 429 queue full (with Retry-After), 500 model failure,
503 not ready / shed at the door / feature store down (with Retry-After), 504 deadline.
An answer sent before the request's body was read, or while draining, closes the connection.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from serving.config import ServeConfig
from serving.errors import (
    BadRequest,
    BodyTooLarge,
    MethodNotAllowed,
    NotFound,
    RequestError,
    RequestTimeout,
    Unauthorized,
)
from serving.kserve import V2Request, allowed_method, metadata, output_fields, outputs_of, rows_from_request
from serving.metrics import Metrics, merge_exposition
from serving.model import ModelRunner
from serving.service import Instance, Service
from serving.versions import ModelVersion
from udfs.core import short_reason
from udfs.spec import ResolvedModel

log = logging.getLogger("serving.http")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

SHED = frozenset({"queue_full", "deadline", "not_ready", "canceled", "overloaded"})
JSON_HEADERS = [(b"content-type", b"application/json")]
OVERLOADED = b'{"error": "the server is overloaded (max_concurrency requests in flight); retry shortly"}'


class Body(Instance, forbid_unknown_fields=True):
    """A /predict body: one instance's fields, or ``instances``, plus an optional deadline.

    An :class:`Instance` itself, so a single-instance body is scored without a copy.
    """

    timeout_ms: float | None = None
    instances: list[Instance] | None = None


class LoadRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /v2/repository/models/{name}/load``: optional ``parameters.path`` / ``parameters.version``."""

    parameters: dict[str, str] | None = None


PredictBody = Body | list[Instance]
_predict_decoder = msgspec.json.Decoder(PredictBody)
_v2_decoder = msgspec.json.Decoder(V2Request)
_load_decoder = msgspec.json.Decoder(LoadRequest)
_encode = msgspec.json.Encoder().encode

MAX_JSON_DEPTH = 64  # deeper non-strict JSON is refused before Python's json module recurses into it


def decode(body: bytes, decoder: msgspec.json.Decoder, tp: Any) -> Any:
    """Typed JSON decode; wrong types name the field (422), malformed JSON is a 400.

    NaN / Infinity tokens (what Python's json writes) are not strict JSON but are
    accepted, so the scoring core can report them as it does for batch rows.
    """
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        if _depth(body) > MAX_JSON_DEPTH:
            raise BadRequest(
                f"malformed JSON: nested deeper than {MAX_JSON_DEPTH} levels", status=400
            ) from None
        if not str(exc).startswith("Number out of range"):
            raise BadRequest(f"invalid request: {exc}") from None
        # A number beyond float64 (1e400): Python's json reads it as inf, so the scoring core
        # gives the reason it gives on every other path ("non-finite feature: ...").
        return _convert(body, tp, exc)
    except UnicodeDecodeError as exc:
        raise BadRequest(f"malformed JSON: a string is not valid UTF-8 ({exc.reason})", status=400) from None
    except RecursionError:
        raise BadRequest("malformed JSON: nested too deeply", status=400) from None
    except msgspec.DecodeError as exc:
        if _depth(body) > MAX_JSON_DEPTH:
            raise BadRequest(
                f"malformed JSON: nested deeper than {MAX_JSON_DEPTH} levels", status=400
            ) from None
        return _convert(body, tp, exc)


def _convert(body: bytes, tp: Any, exc: Exception) -> Any:
    """``body`` read by Python's json module (NaN, Infinity, 1e400 allowed), then typed by msgspec."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        raise BadRequest(f"malformed JSON: {exc}", status=400) from None
    try:
        return msgspec.convert(obj, tp)
    except msgspec.ValidationError as exc2:
        raise BadRequest(f"invalid request: {exc2}") from None


def _depth(body: bytes) -> int:
    """The deepest bracket nesting in ``body`` (brackets inside strings count too: an upper bound)."""
    depth = deepest = 0
    for b in body.translate(None, delete=bytes(set(range(256)) - set(b"[]{}"))):
        if b in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


class App:
    """The ASGI application; ``service`` does the work, this class speaks HTTP."""

    def __init__(
        self, cfg: ServeConfig, service: Service, *, token: str | None = None, peers: Any = None
    ) -> None:
        self.cfg = cfg
        self.service = service
        self.metrics: Metrics = service.metrics
        self.max_body = cfg.server.max_body_bytes
        self.max_concurrency = cfg.server.max_concurrency
        self.inflight = 0  # requests being handled (admitted at the door, not yet answered)
        service.admitted = lambda: self.inflight  # type: ignore[method-assign]
        self.body_timeout = cfg.server.body_timeout_s
        self.token = token.encode() if token else None
        # The other worker processes (serving.workers.Peers), when there are several.
        self.peers = peers
        self.worker_header = None if peers is None else (b"x-sparkscore-worker", str(peers.index).encode())
        if peers is not None:  # [reload] follow: the first worker rolls a moved alias out to every worker
            service.on_follow = peers.rollout
        self.name = service.name
        self.v2_outputs = output_fields(service.runner.model)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self.http(scope, receive, send)
        elif kind == "lifespan":
            await self.lifespan(receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    # A worker of several loads before it accepts connections: no 503 while it warms up.
                    await self.service.start(wait=self.peers is not None)
                    if self.peers is not None:
                        await self.peers.start(self)
                except Exception as exc:  # noqa: BLE001 - reported to uvicorn, which exits
                    await send({"type": "lifespan.startup.failed", "message": short_reason(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.peers is not None:
                    await self.peers.stop()
                await self.service.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- dispatch -------------------------------------------------------------------

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Admission at the door: beyond ``max_concurrency`` requests in this worker, 503 at once
        (before the token, the body or JSON cost anything); health probes are always answered."""
        if self.inflight >= self.max_concurrency and not scope["path"].startswith("/v2/health"):
            self.metrics.fail("overloaded", shed=True)
            headers = [*JSON_HEADERS, (b"retry-after", b"1")]
            if _body_pending(receive):
                headers.append((b"connection", b"close"))
            await _send(send, 503, OVERLOADED, headers)
            return
        self.inflight += 1
        try:
            await self.handle(scope, receive, send if self.worker_header is None else self._tagged(send))
        finally:
            self.inflight -= 1

    def _tagged(self, send: Send) -> Send:
        """``send`` that names this worker on the response (``x-sparkscore-worker``)."""
        tag = self.worker_header

        async def tagged(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message["headers"], tag]
            await send(message)

        return tagged

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.monotonic()
        path: str = scope["path"]
        method: str = scope["method"]
        headers: list[tuple[bytes, bytes]] = []
        timed = False
        try:
            if self.token is not None and not path.startswith("/v2/health"):
                self.check_token(scope)
            if path == "/predict":
                if method != "POST":
                    raise MethodNotAllowed("use POST /predict", allow="POST")
                timed = True
                status, body = await self.predict(scope, receive, started)
            elif path.startswith("/v2"):
                timed = path.endswith("/infer")
                answer = await self.v2(scope, receive, method, path, started)
                status, body = answer[0], answer[1]
                if len(answer) == 3:
                    # Binary tensor data: its own content type and the JSON header's length.
                    if timed:
                        self.metrics.request_duration.observe((time.monotonic() - started) * 1e6)
                    extra = answer[2]  # type: ignore[misc]
                    if self.service.draining:
                        extra = [*extra, (b"connection", b"close")]
                    await _send(send, status, body, extra)
                    return
            elif path == "/metrics":
                if method != "GET":
                    raise MethodNotAllowed("use GET /metrics", allow="GET")
                text = self.metrics.render()
                if self.peers is not None:
                    text = merge_exposition([text, *await self.peers.gather_metrics()])
                await _send(send, 200, text, [(b"content-type", b"text/plain; version=0.0.4")])
                return
            else:
                raise NotFound(f"no route {method} {path}; see /predict, /v2/... and /metrics")
        except RequestError as exc:
            if timed:
                self.metrics.fail(exc.reason, shed=exc.reason in SHED)
            status, body = exc.status, _encode({"error": exc.message})
            if exc.status == 408:
                headers.append((b"connection", b"close"))  # the rest of the body is not coming
            if exc.retry_after is not None:
                headers.append((b"retry-after", str(exc.retry_after).encode()))
            if exc.status == 401:
                headers.append((b"www-authenticate", b"Bearer"))
            if isinstance(exc, MethodNotAllowed):
                headers.append((b"allow", exc.allow.encode()))
        except Exception as exc:  # one request's bug must not kill the server
            log.exception("unhandled error on %s %s", method, path)
            if timed:
                self.metrics.fail("internal")
            status, body = 500, _encode({"error": f"internal error: {short_reason(exc)}"})
        if timed:
            self.metrics.request_duration.observe((time.monotonic() - started) * 1e6)
        if (self.service.draining or _body_pending(receive)) and not any(
            k == b"connection" for k, _ in headers
        ):
            # Draining (the client should reconnect elsewhere), or answered before the body was read
            # (a 401, a 413, a shed request): the rest of it is not read on this connection.
            headers.append((b"connection", b"close"))
        await _send(send, status, body, JSON_HEADERS + headers if headers else JSON_HEADERS)

    def check_token(self, scope: Scope) -> None:
        assert self.token is not None
        for k, v in scope["headers"]:
            if k == b"authorization":
                scheme, _, given = v.partition(b" ")
                if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token):
                    return
                break
        raise Unauthorized("missing or wrong bearer token (send Authorization: Bearer <token>)")

    async def read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The request body, refused with 413 as soon as it passes the configured size."""
        self.check_length(scope)
        # uvicorn's request cycle says whether the whole body is in; only then is no timer needed.
        if getattr(getattr(receive, "__self__", None), "more_body", True) is False:
            message = await receive()
        else:
            try:
                async with asyncio.timeout(self.body_timeout):
                    message = await receive()
                    if message.get("more_body", False):
                        return await self.read_rest(receive, message)
            except TimeoutError:
                raise RequestTimeout(
                    f"the request body did not arrive within {self.body_timeout:g} s"
                ) from None
        body: bytes = message.get("body", b"")
        if not message.get("more_body", False) and len(body) <= self.max_body:
            return body
        return await self.read_rest(receive, message)

    def check_length(self, scope: Scope) -> None:
        """A declared Content-Length over the limit is a 413 before the body is read."""
        limit = self.max_body
        for k, v in scope["headers"]:
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    raise BadRequest("Content-Length is not a number", status=400) from None
                if declared > limit:
                    raise BodyTooLarge(f"request body of {declared} bytes is over the limit of {limit} bytes")
                return

    async def read_rest(self, receive: Receive, message: dict[str, Any]) -> bytes:
        """The body after its first message: more chunks, each counted against the limit."""
        limit = self.max_body
        body: bytes = message.get("body", b"")
        chunks, size = [body], len(body)
        if size > limit:
            raise BodyTooLarge(f"request body is over the limit of {limit} bytes")
        while message.get("more_body", False):
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body is over the limit of {limit} bytes")
        return b"".join(chunks)

    # -- /predict -------------------------------------------------------------------

    def deadline(self, started: float, timeout_ms: float | None) -> float:
        b = self.cfg.batcher
        if timeout_ms is None:
            timeout_ms = b.default_timeout_ms
        elif not 0 < timeout_ms <= b.max_timeout_ms:
            raise BadRequest(f"timeout_ms: must be > 0 and <= {b.max_timeout_ms:g}, got {timeout_ms:g}")
        return started + timeout_ms / 1000

    async def predict(self, scope: Scope, receive: Receive, started: float) -> tuple[int, bytes]:
        svc = self.service
        if not svc.ready:
            svc.check_ready()
        parsed = decode(await self.read_body(scope, receive), _predict_decoder, PredictBody)
        gone = _connection(receive)
        if isinstance(parsed, list):
            return await self.predict_many(parsed, self.deadline(started, None), started, gone)
        if parsed.instances is not None:
            if any(
                getattr(parsed, f) is not None
                for f in ("user_id", "item_id", "features", "context", "inputs")
            ):
                raise BadRequest("instances: give one instance or a list under instances, not both")
            return await self.predict_many(
                parsed.instances, self.deadline(started, parsed.timeout_ms), started, gone
            )
        out = await svc.predict(parsed, self.deadline(started, parsed.timeout_ms), gone)
        self.metrics.request_success.inc()
        out["latency_ms"] = round((time.monotonic() - started) * 1000, 3)
        return 200, _encode(out)

    async def predict_many(
        self, instances: list[Instance], deadline: float, started: float, gone: Any = None
    ) -> tuple[int, bytes]:
        """Each instance succeeds or fails on its own; a status shared by every instance is the response's."""
        if not instances:
            raise BadRequest("instances: the list is empty")
        limit = self.cfg.server.max_instances
        if len(instances) > limit:
            raise BadRequest(f"instances: at most {limit} per request, got {len(instances)}")
        outcomes = await asyncio.gather(*(self._one(inst, deadline, gone) for inst in instances))
        statuses = {s for s, _ in outcomes}
        status = statuses.pop() if len(statuses) == 1 else 200
        body = {
            "predictions": [o for _, o in outcomes],
            "latency_ms": round((time.monotonic() - started) * 1000, 3),
        }
        return status, _encode(body)

    async def _one(self, inst: Instance, deadline: float, gone: Any) -> tuple[int, dict[str, Any]]:
        try:
            out = await self.service.predict(inst, deadline, gone)
        except RequestError as exc:
            self.metrics.fail(exc.reason, shed=exc.reason in SHED)
            return exc.status, {"error": exc.message, "status": exc.status}
        self.metrics.request_success.inc()
        return 200, out

    # -- KServe v2 ------------------------------------------------------------------

    async def v2(
        self, scope: Scope, receive: Receive, method: str, path: str, started: float
    ) -> tuple[int, bytes] | tuple[int, bytes, list[tuple[bytes, bytes]]]:
        parts = path.strip("/").split("/")
        svc = self.service
        if parts == ["v2"] and method == "GET":
            return 200, _encode(
                {
                    "name": "sparkscore",
                    "version": "0.1.0",
                    "extensions": ["binary_tensor_data", "model_repository"],
                }
            )
        if parts[:2] == ["v2", "health"] and len(parts) == 3 and method == "GET":
            if parts[2] == "live":
                return 200, _encode({"live": True})
            if parts[2] == "ready":
                return self._ready()
        if parts[:2] == ["v2", "repository"] and method == "POST":
            return await self.repository(scope, receive, parts[2:])
        if len(parts) >= 3 and parts[1] == "models":
            name, rest = parts[2], parts[3:]
            if name != self.name:
                raise NotFound(f"model {name!r} is not served here; this server serves {self.name!r}")
            mv: ModelVersion | None = None
            if rest[:1] == ["versions"]:
                mv = svc.version_named(rest[1]) if len(rest) >= 2 else None
                if mv is None:
                    raise NotFound(
                        f"model {name!r} has no version {'/'.join(rest[1:2])!r}; it serves {svc.versions()}"
                    )
                rest = rest[2:]
            if rest == [] and method == "GET":
                meta = self.v2_metadata()
                params: dict[str, Any] = {}
                candidate = svc.candidate_info()
                if candidate is not None:
                    params["candidate"] = candidate
                if self.peers is not None:
                    versions = await self.peers.versions()
                    params["workers"] = versions["primary"]
                    if candidate is not None:
                        candidate["workers"] = versions["candidate"]
                if params:
                    meta["parameters"] = params
                return 200, _encode(meta)
            if rest == ["ready"] and method == "GET":
                return self._ready()
            if rest == ["infer"] and method == "POST":
                if mv is None:
                    return await self.v2_infer(scope, receive, started, None)
                # A versioned request holds its version from here, before its body arrives.
                mv.holds += 1
                try:
                    return await self.v2_infer(scope, receive, started, mv)
                finally:
                    mv.holds -= 1
        allow = allowed_method(parts, self.name)
        if allow is not None and allow != method:
            raise MethodNotAllowed(f"use {allow} {path}", allow=allow)
        raise NotFound(f"no route {method} {path} in the KServe v2 protocol")

    async def repository(self, scope: Scope, receive: Receive, rest: list[str]) -> tuple[int, bytes]:
        """The model repository extension: index, and load (a zero-downtime swap; unload is refused)."""
        svc = self.service
        if rest == ["index"]:
            await self.read_body(scope, receive)
            state = "READY" if svc.ready else ("UNAVAILABLE" if svc.load_error else "LOADING")
            entry = {"name": self.name, "version": svc.version, "state": state}
            reason = (
                svc.load_error
                or svc.problem()
                or svc.last_reload.get("reason")
                or svc.follow_problem.get("primary")
            )
            if reason:
                entry["reason"] = reason
            entries = [entry]
            candidate = svc.candidate_info()
            if candidate is not None:
                # The candidate: the same model at its own version (as Triton lists each version).
                live = svc.ready and candidate["version"] != ""
                cand_state = "READY" if live else ("UNAVAILABLE" if svc.ready else state)
                cand = {"name": self.name, "version": candidate["version"], "state": cand_state}
                if candidate.get("reason"):
                    cand["reason"] = candidate["reason"]
                entries.append(cand)
            return 200, _encode(entries)
        if len(rest) == 3 and rest[0] == "models" and rest[2] in ("load", "unload"):
            if rest[1] != self.name:
                raise NotFound(f"model {rest[1]!r} is not served here; this server serves {self.name!r}")
            if rest[2] == "unload":
                raise BadRequest(
                    f"unload is not supported: this server always serves {self.name!r}", status=400
                )
            svc.check_ready()
            body = await self.read_body(scope, receive)
            req = decode(body, _load_decoder, LoadRequest) if body.strip() else LoadRequest()
            params = req.parameters or {}
            unknown = sorted(set(params) - {"path", "version"})
            if unknown:
                raise BadRequest(f"parameters: unknown {unknown}; give path and/or version")
            if self.peers is not None:
                return 200, _encode(await self.peers.rollout(params))
            result = await svc.reload(path=params.get("path"), version=params.get("version"))
            return 200, _encode(result)
        raise NotFound(f"no route POST /v2/repository/{'/'.join(rest)}")

    def _ready(self) -> tuple[int, bytes]:
        # The protocol: 200 when ready, else a 4xx with an empty body (as Triton answers).
        # Draining (SIGTERM) is not ready: a load balancer stops sending while requests finish.
        if self.service.ready and not self.service.draining and self.service.problem() is None:
            return 200, _encode({"ready": True})
        return 400, b""

    def v2_metadata(self) -> dict[str, Any]:
        return metadata(self.name, self.service.versions(), self.service.runner, self.v2_outputs)

    async def v2_infer(
        self, scope: Scope, receive: Receive, started: float, mv: ModelVersion | None
    ) -> tuple[int, bytes] | tuple[int, bytes, list[tuple[bytes, bytes]]]:
        svc = self.service
        svc.check_ready()
        raw = await self.read_body(scope, receive)
        header_len = _header(scope, b"inference-header-content-length")
        binary: memoryview | None = None
        if header_len is not None:
            try:
                n = int(header_len)
            except ValueError:
                raise BadRequest("Inference-Header-Content-Length is not a number", status=400) from None
            if not 0 < n <= len(raw):
                raise BadRequest(
                    f"Inference-Header-Content-Length {n} is outside the body of {len(raw)} bytes", status=400
                )
            binary = memoryview(raw)[n:]
            raw = raw[:n]
        req = decode(raw, _v2_decoder, V2Request)
        limit = self.cfg.server.max_instances
        rows = rows_from_request(svc.runner, req, binary, limit)
        if not rows:
            raise BadRequest("inputs: no rows")
        if len(rows) > limit:
            raise BadRequest(f"inputs: at most {limit} rows per request, got {len(rows)}")
        params = req.parameters or {}
        timeout = params.get("timeout_ms")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))):
            raise BadRequest("parameters.timeout_ms: expected a number")
        deadline = self.deadline(started, timeout)
        if mv is None:
            # A canary takes a whole request: sticky by parameters.user_id when given.
            mv = svc.route(params.get("user_id"))
        gone = _connection(receive)
        mv.holds += 1
        try:
            outcomes = await asyncio.gather(
                *(svc.predict_row(r, deadline, mv, gone) for r in rows), return_exceptions=True
            )
        finally:
            mv.holds -= 1
        for o in outcomes:
            if isinstance(o, BaseException) and not isinstance(o, RequestError):
                raise o
        failures = [(i, o) for i, o in enumerate(outcomes) if isinstance(o, RequestError)]
        if failures:
            worst = max(failures, key=lambda f: f[1].status)[1]
            if all(f[1].status == 422 for f in failures):
                detail = "; ".join(f"row {i}: {exc}" for i, exc in failures)
                raise BadRequest(f"bad input rows: {detail}")
            raise worst
        results: list[dict[str, Any]] = outcomes  # type: ignore[assignment]
        self.metrics.request_success.inc()
        return self.v2_response(req, results, mv.version, started)

    def v2_response(
        self, req: V2Request, results: list[dict[str, Any]], version: str, started: float
    ) -> tuple[int, bytes] | tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """The outputs asked for (all by default), as JSON data or binary tensor data."""
        outputs, chunks = outputs_of(req, self.v2_outputs, results)
        body: dict[str, Any] = {"model_name": self.name, "model_version": version, "outputs": outputs}
        if req.id is not None:
            body["id"] = req.id
        body["parameters"] = {
            "cache_hits": sum(1 for r in results if r.get("cache_hit")),
            "latency_ms": round((time.monotonic() - started) * 1000, 3),
        }
        header = _encode(body)
        if not chunks:
            return 200, header
        extra = [
            (b"inference-header-content-length", b"%d" % len(header)),
            (b"content-type", b"application/octet-stream"),
        ]
        return 200, header + b"".join(chunks), extra


def _body_pending(receive: Receive) -> bool:
    """Whether the request's body has not fully arrived (uvicorn's cycle says so)."""
    return getattr(getattr(receive, "__self__", None), "more_body", False) is True


def _connection(receive: Receive) -> Any:
    """uvicorn's request cycle behind ``receive`` (its ``disconnected`` turns true when the client goes)."""
    cycle = getattr(receive, "__self__", None)
    return cycle if hasattr(cycle, "disconnected") else None


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope["headers"]:
        if k == name:
            return bytes(v)
    return None


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


def create_app(
    cfg: ServeConfig,
    *,
    model: ResolvedModel | None = None,
    runner: ModelRunner | None = None,
    token: str | None = None,
    peers: Any = None,
    service_options: dict[str, Any] | None = None,
) -> App:
    """The ASGI app for ``cfg``; ``runner`` replaces the model runner (tests, ensembles);
    ``service_options`` go to :class:`Service` (candidate runner, runner factory, worker index)."""
    if runner is None:
        # from_config: warm-up sizes and [batcher] parallel_members, as the config says.
        runner = ModelRunner.from_config(cfg, model)
    return App(cfg, Service(cfg, runner, **(service_options or {})), token=token, peers=peers)
