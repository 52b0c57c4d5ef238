"""The HTTP layer: a plain ASGI callable (no web framework), JSON through msgspec.

Routes:

* ``POST /predict``: one instance ``{"user_id", "item_id", "features"?, "context"?,
  "timeout_ms"?}``, a JSON list of instances, or ``{"instances": [...], "timeout_ms"?}``.
* KServe v2: ``POST /v2/models/{name}[/versions/{v}]/infer``, ``GET /v2/models/{name}``,
  ``GET /v2/models/{name}/ready``, ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2``.
* ``GET /metrics``: Prometheus text.

Status codes: 400 malformed JSON, 401 bad token, 404 unknown entity/model,
413 body too large, 422 wrong types/lengths/bad feature values (the message
names the field, or is the scoring core's reason), 429 queue full (with
Retry-After), 500 model failure, 503 not ready / feature store down, 504 deadline.
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
    NotFound,
    RequestError,
    Unauthorized,
)
from serving.metrics import Metrics
from serving.model import ModelRunner, Row
from serving.service import Instance, Service
from udfs.core import ERROR, MODEL_VERSION, PREDICTION, output_schema, short_reason
from udfs.spec import ResolvedModel

log = logging.getLogger("serving.http")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

SHED = frozenset({"queue_full", "deadline", "not_ready"})
JSON_HEADERS = [(b"content-type", b"application/json")]


class Body(Instance, forbid_unknown_fields=True):
    """A /predict body: one instance's fields, or ``instances``, plus an optional deadline.

    An :class:`Instance` itself, so a single-instance body is scored without a copy.
    """

    timeout_ms: float | None = None
    instances: list[Instance] | None = None


class V2Tensor(msgspec.Struct):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]
    parameters: dict[str, Any] | None = None


class V2Request(msgspec.Struct):
    inputs: list[V2Tensor]
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[Any] | None = None


PredictBody = Body | list[Instance]
_predict_decoder = msgspec.json.Decoder(PredictBody)
_v2_decoder = msgspec.json.Decoder(V2Request)
_encode = msgspec.json.Encoder().encode

V2_NUMERIC = {
    "FP16",
    "FP32",
    "FP64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
}
ARROW_TO_V2 = {
    "double": "FP64",
    "float": "FP32",
    "int32": "INT32",
    "int64": "INT64",
    "bool": "BOOL",
    "string": "BYTES",
}


def decode(body: bytes, decoder: msgspec.json.Decoder, tp: Any) -> Any:
    """Typed JSON decode; wrong types name the field (422), malformed JSON is a 400.

    NaN / Infinity tokens (what Python's json writes) are not strict JSON but are
    accepted, so the scoring core can report them as it does for batch rows.
    """
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid request: {exc}") from None
    except msgspec.DecodeError as exc:
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest(f"malformed JSON: {exc}", status=400) from None
        try:
            return msgspec.convert(obj, tp)
        except msgspec.ValidationError as exc2:
            raise BadRequest(f"invalid request: {exc2}") from None


class App:
    """The ASGI application; ``service`` does the work, this class speaks HTTP."""

    def __init__(self, cfg: ServeConfig, service: Service, *, token: str | None = None) -> None:
        self.cfg = cfg
        self.service = service
        self.metrics: Metrics = service.metrics
        self.max_body = cfg.server.max_body_bytes
        self.token = token.encode() if token else None
        self.name = service.name
        schema = output_schema(service.runner.model)
        self.v2_outputs = [
            ("score" if f.name == PREDICTION else f.name, f.type)
            for f in schema
            if f.name not in (ERROR, MODEL_VERSION)
        ]

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
                    await self.service.start()
                except Exception as exc:  # noqa: BLE001 - reported to uvicorn, which exits
                    await send({"type": "lifespan.startup.failed", "message": short_reason(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.service.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- dispatch -------------------------------------------------------------------

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
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
                    raise RequestError("use POST /predict", status=405)
                timed = True
                status, body = await self.predict(scope, receive, started)
            elif path.startswith("/v2"):
                timed = path.endswith("/infer")
                status, body = await self.v2(scope, receive, method, path, started)
            elif path == "/metrics" and method == "GET":
                await _send(
                    send, 200, self.metrics.render(), [(b"content-type", b"text/plain; version=0.0.4")]
                )
                return
            else:
                raise NotFound(f"no route {method} {path}; see /predict, /v2/... and /metrics")
        except RequestError as exc:
            if timed:
                self.metrics.fail(exc.reason, shed=exc.reason in SHED)
            status, body = exc.status, _encode({"error": exc.message})
            if exc.retry_after is not None:
                headers.append((b"retry-after", str(exc.retry_after).encode()))
            if exc.status == 401:
                headers.append((b"www-authenticate", b"Bearer"))
        except Exception as exc:  # one request's bug must not kill the server
            log.exception("unhandled error on %s %s", method, path)
            if timed:
                self.metrics.fail("internal")
            status, body = 500, _encode({"error": f"internal error: {short_reason(exc)}"})
        if timed:
            self.metrics.request_duration.observe((time.monotonic() - started) * 1e6)
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
        message = await receive()
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
        if isinstance(parsed, list):
            return await self.predict_many(parsed, self.deadline(started, None), started)
        if parsed.instances is not None:
            if any(getattr(parsed, f) is not None for f in ("user_id", "item_id", "features", "context")):
                raise BadRequest("instances: give one instance or a list under instances, not both")
            return await self.predict_many(
                parsed.instances, self.deadline(started, parsed.timeout_ms), started
            )
        out = await svc.predict(parsed, self.deadline(started, parsed.timeout_ms))
        self.metrics.request_success.inc()
        out["latency_ms"] = round((time.monotonic() - started) * 1000, 3)
        return 200, _encode(out)

    async def predict_many(
        self, instances: list[Instance], deadline: float, started: float
    ) -> tuple[int, bytes]:
        """Each instance succeeds or fails on its own; a status shared by every instance is the response's."""
        if not instances:
            raise BadRequest("instances: the list is empty")
        limit = self.cfg.server.max_instances
        if len(instances) > limit:
            raise BadRequest(f"instances: at most {limit} per request, got {len(instances)}")
        outcomes = await asyncio.gather(*(self._one(inst, deadline) for inst in instances))
        statuses = {s for s, _ in outcomes}
        status = statuses.pop() if len(statuses) == 1 else 200
        body = {
            "predictions": [o for _, o in outcomes],
            "latency_ms": round((time.monotonic() - started) * 1000, 3),
        }
        return status, _encode(body)

    async def _one(self, inst: Instance, deadline: float) -> tuple[int, dict[str, Any]]:
        try:
            out = await self.service.predict(inst, deadline)
        except RequestError as exc:
            self.metrics.fail(exc.reason, shed=exc.reason in SHED)
            return exc.status, {"error": exc.message, "status": exc.status}
        self.metrics.request_success.inc()
        return 200, out

    # -- KServe v2 ------------------------------------------------------------------

    async def v2(
        self, scope: Scope, receive: Receive, method: str, path: str, started: float
    ) -> tuple[int, bytes]:
        parts = path.strip("/").split("/")
        svc = self.service
        if parts == ["v2"] and method == "GET":
            return 200, _encode({"name": "sparkscore", "version": "0.1.0", "extensions": []})
        if parts[:2] == ["v2", "health"] and len(parts) == 3 and method == "GET":
            if parts[2] == "live":
                return 200, _encode({"live": True})
            if parts[2] == "ready":
                return self._ready()
        if len(parts) >= 3 and parts[1] == "models":
            name, rest = parts[2], parts[3:]
            if name != self.name:
                raise NotFound(f"model {name!r} is not served here; this server serves {self.name!r}")
            if rest[:1] == ["versions"]:
                if len(rest) < 2 or rest[1] != svc.version:
                    raise NotFound(
                        f"model {name!r} has no version {'/'.join(rest[1:2])!r}; it is {svc.version!r}"
                    )
                rest = rest[2:]
            if rest == [] and method == "GET":
                return 200, _encode(self.v2_metadata())
            if rest == ["ready"] and method == "GET":
                return self._ready()
            if rest == ["infer"] and method == "POST":
                return await self.v2_infer(scope, receive, started)
        raise NotFound(f"no route {method} {path} in the KServe v2 protocol")

    def _ready(self) -> tuple[int, bytes]:
        svc = self.service
        if svc.ready:
            return 200, _encode({"ready": True})
        return 503, _encode({"ready": False, "error": svc.load_error or "the model is still loading"})

    def v2_metadata(self) -> dict[str, Any]:
        runner = self.service.runner
        model: ResolvedModel = runner.model
        if runner.array_layout:
            inputs = [{"name": runner.columns[0], "datatype": "FP32", "shape": [-1, runner.width]}]
        else:
            inputs = [{"name": c, "datatype": "FP64", "shape": [-1]} for c in runner.columns]
        outputs = []
        for name, t in self.v2_outputs:
            if hasattr(t, "value_type"):
                outputs.append({"name": name, "datatype": ARROW_TO_V2[str(t.value_type)], "shape": [-1, -1]})
            else:
                outputs.append({"name": name, "datatype": ARROW_TO_V2.get(str(t), "BYTES"), "shape": [-1]})
        return {
            "name": self.name,
            "versions": [self.service.version],
            "platform": f"pytorch_{model.format}",
            "inputs": inputs,
            "outputs": outputs,
        }

    def v2_rows(self, req: V2Request) -> list[Row]:
        """Rows in input-column order from named tensors (or one [N, width] tensor)."""
        runner = self.service.runner
        cols = runner.columns
        tensors: dict[str, tuple[list[int], list[Any]]] = {}
        for t in req.inputs:
            if t.datatype not in V2_NUMERIC:
                raise BadRequest(
                    f"inputs[{t.name}].datatype: {t.datatype!r} is not numeric; use FP32 or FP64"
                )
            flat = _flatten(t.data)
            size = 1
            for d in t.shape:
                size *= d
            if any(d < 0 for d in t.shape) or size != len(flat):
                raise BadRequest(f"inputs[{t.name}]: shape {t.shape} needs {size} values, got {len(flat)}")
            for v in flat:
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise BadRequest(f"inputs[{t.name}].data: expected numbers, got {v!r}")
            tensors[t.name] = (t.shape, flat)
        if runner.array_layout or (len(tensors) == 1 and set(tensors) - set(cols)):
            if len(tensors) != 1:
                raise BadRequest(f"inputs: expected one tensor {cols[0]!r} of shape [N, {runner.width}]")
            ((name, (shape, flat)),) = tensors.items()
            if len(shape) != 2:
                raise BadRequest(f"inputs[{name}]: expected shape [N, {runner.width}], got {shape}")
            n, d = shape
            matrix = [flat[i * d : (i + 1) * d] for i in range(n)]
            if runner.array_layout:
                return [(vec,) for vec in matrix]
            if d != len(cols):
                raise BadRequest(f"inputs[{name}]: expected {len(cols)} columns ({', '.join(cols)}), got {d}")
            return [tuple(vec) for vec in matrix]
        missing = [c for c in cols if c not in tensors]
        unknown = sorted(set(tensors) - set(cols))
        if missing or unknown:
            raise BadRequest(f"inputs: missing {missing}, unknown {unknown}; the model reads {list(cols)}")
        lengths = {c: len(tensors[c][1]) for c in cols}
        if len(set(lengths.values())) != 1:
            raise BadRequest(f"inputs: every input needs the same number of rows, got {lengths}")
        columns = [tensors[c][1] for c in cols]
        return list(zip(*columns, strict=True))

    async def v2_infer(self, scope: Scope, receive: Receive, started: float) -> tuple[int, bytes]:
        svc = self.service
        svc.check_ready()
        req = decode(await self.read_body(scope, receive), _v2_decoder, V2Request)
        rows = self.v2_rows(req)
        if not rows:
            raise BadRequest("inputs: no rows")
        if len(rows) > self.cfg.server.max_instances:
            raise BadRequest(
                f"inputs: at most {self.cfg.server.max_instances} rows per request, got {len(rows)}"
            )
        params = req.parameters or {}
        timeout = params.get("timeout_ms")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))):
            raise BadRequest("parameters.timeout_ms: expected a number")
        deadline = self.deadline(started, timeout)
        outcomes = await asyncio.gather(*(svc.predict_row(r, deadline) for r in rows), return_exceptions=True)
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
        n = len(results)
        outputs = []
        for name, t in self.v2_outputs:
            values = [r.get(name) for r in results]
            if hasattr(t, "value_type"):
                k = len(values[0]) if values and values[0] is not None else 0
                outputs.append(
                    {
                        "name": name,
                        "datatype": ARROW_TO_V2[str(t.value_type)],
                        "shape": [n, k],
                        "data": _flatten(values),
                    }
                )
            else:
                dtype = ARROW_TO_V2.get(str(t), "BYTES")
                if dtype == "BYTES":
                    values = ["" if v is None else str(v) for v in values]
                outputs.append({"name": name, "datatype": dtype, "shape": [n], "data": values})
        self.metrics.request_success.inc()
        body: dict[str, Any] = {"model_name": self.name, "model_version": svc.version, "outputs": outputs}
        if req.id is not None:
            body["id"] = req.id
        body["parameters"] = {
            "cache_hits": sum(1 for r in results if r.get("cache_hit")),
            "latency_ms": round((time.monotonic() - started) * 1000, 3),
        }
        return 200, _encode(body)


def _flatten(data: list[Any]) -> list[Any]:
    if not any(isinstance(v, list) for v in data):
        return data
    out: list[Any] = []
    for v in data:
        if isinstance(v, list):
            out.extend(_flatten(v))
        else:
            out.append(v)
    return out


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
) -> App:
    """The ASGI app for ``cfg``; ``runner`` replaces the model runner (tests, ensembles)."""
    if runner is None:
        # from_config: warm-up sizes and [batcher] parallel_members, as the config says.
        runner = ModelRunner.from_config(cfg, model)
    return App(cfg, Service(cfg, runner), token=token)
