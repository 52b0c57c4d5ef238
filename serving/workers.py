"""Every core: a supervisor, N worker processes on one listening socket, and their control channel.

``python -m serving --workers N`` (or ``[server] workers``; ``auto`` = the cores this
process may use) binds the port once in a small supervisor process, which starts
N workers (``python -m serving`` again, handed the socket's file descriptor). Each
worker has its own model, batcher and in-process cache (or shares Redis); the
kernel hands each new connection to whichever worker accepts it first, and a busy
worker accepts less. A worker that dies is started again (with a growing pause
if it keeps dying at start-up).

Workers reach each other over Unix sockets in a private run directory:

* ``GET /metrics`` on any worker returns every worker's metrics in one scrape
  (each sample labelled ``worker``), plus the supervisor's (workers alive,
  restarts);
* ``POST /v2/repository/models/{name}/load`` on any worker loads the new version
  in every worker, under a lock the workers share (two loads apply in one order
  everywhere). The last load is remembered in the run directory: a worker that is
  restarted loads it before it accepts a connection, and a dead worker's stale
  socket is skipped. A followed alias that moves ([reload] follow, [candidate] follow)
  is rolled out the same way, the candidate's remembered beside the primary's.
  ``GET /v2/models/{name}`` lists each worker's version (and candidate version), and
  every response names its worker (``x-sparkscore-worker``).

SIGTERM (to the supervisor, or to a single-process server): readiness turns false,
the listening socket closes, in-flight requests finish (up to
``[server] drain_timeout_s``), then the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from serving.config import ServeConfig
from serving.errors import LoadFailed, RequestError

if TYPE_CHECKING:
    from serving.app import App
    from serving.versions import ModelVersion

log = logging.getLogger("serving.workers")

PEER_TIMEOUT_S = 5.0  # a worker that does not answer a metrics request in this long is left out
SUPERVISOR_METRICS = "supervisor.prom"
# The last load: its parameters and version, and the candidate's last load under "candidate"
# (a restarted worker applies both).
ROLLOUT_STATE = "rollout.json"
ROLLOUT_LOCK = "rollout.lock"
PRIMARY, CANDIDATE = "primary", "candidate"  # what a rollout loads (serving.service's roles)


# -- one server process ----------------------------------------------------------------


class DrainingServer(uvicorn.Server):
    """uvicorn, with readiness turned false the moment a shutdown signal arrives, and exit 0 after it.

    Draining changes readiness only: requests already admitted, bodies still arriving and requests on
    kept-alive connections are served (each response then says ``Connection: close``). With
    ``[server] drain_delay_s`` the listener stays open that long first, so a load balancer that polls
    readiness deregisters the instance before it stops accepting; a second signal ends the delay.
    """

    def __init__(self, config: uvicorn.Config, app: App) -> None:
        super().__init__(config)
        self.scorer = app
        self._delay: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Readiness first (a probe that still gets through sees not-ready), then uvicorn's graceful
        # shutdown: stop accepting, let in-flight requests finish, then the lifespan shutdown. The signal
        # is not re-raised afterwards (uvicorn would), so a drained server exits 0.
        service = self.scorer.service
        delay = self.scorer.cfg.server.drain_delay_s
        if not service.draining and delay > 0:
            service.draining = True
            self._delay = threading.Timer(delay, self._begin_shutdown)
            self._delay.daemon = True
            self._delay.start()
            return
        service.draining = True
        if self._delay is not None:
            self._delay.cancel()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    def _begin_shutdown(self) -> None:
        self.should_exit = True  # uvicorn's main loop reads it within 0.1 s


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with two bounds a client cannot stretch.

    * A request's headers (and a new connection's first request) must arrive within
      ``header_timeout_s``: else 408 and the connection closes (slowloris, idle half-open sockets).
    * At most ``max_connections`` open connections: one more gets 503 with Retry-After and is closed
      (the worker's file descriptors are never exhausted by clients that only connect).
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    def refuse(transport: asyncio.Transport, status: bytes, message: bytes, extra: bytes = b"") -> None:
        transport.write(
            b"HTTP/1.1 "
            + status
            + b"\r\ncontent-type: application/json\r\nconnection: close\r\n"
            + extra
            + b"content-length: %d\r\n\r\n" % len(message)
            + message
        )
        transport.close()

    class GuardedProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                refuse(
                    transport,
                    b"503 Service Unavailable",
                    b'{"error": "too many open connections; retry shortly"}',
                    b"retry-after: 1\r\n",
                )
                return
            self._arm()

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return
            message = b'{"error": "the request headers did not arrive within %g s"}' % header_timeout_s
            refuse(self.transport, b"408 Request Timeout", message)

    return GuardedProtocol


def uvicorn_config(app: App, cfg: ServeConfig, **overrides: Any) -> uvicorn.Config:
    """uvicorn's settings for ``cfg`` (``overrides``: e.g. a quieter log level in tests)."""
    server = cfg.server
    options: dict[str, Any] = dict(
        host=server.host,
        port=server.port,
        loop="uvloop",
        lifespan="on",
        access_log=False,
        # Loopback by default: no proxy to trust, and the Server/Date headers are per-request work nobody reads.
        proxy_headers=False,
        server_header=False,
        date_header=False,
        log_level=server.log_level,
        http=guarded_protocol(server.header_timeout_s, server.max_connections),
        # A float: a drain under 1 s is that long, not 0 (which cancelled every in-flight request).
        timeout_graceful_shutdown=server.drain_timeout_s,  # type: ignore[arg-type]
    )
    options.update(overrides)
    return uvicorn.Config(app, **options)


def run_server(app: App, cfg: ServeConfig, *, fd: int | None = None) -> None:
    """Serve ``app`` until a signal: on ``cfg``'s host and port, or on the inherited socket ``fd``."""
    config = uvicorn_config(app, cfg)
    sockets = None if fd is None else [socket.socket(fileno=fd)]
    DrainingServer(config, app).run(sockets=sockets)


# -- the control channel between workers -----------------------------------------------


class Peers:
    """This worker's view of the others: answers their requests and asks them for theirs."""

    def __init__(self, rundir: str, index: int) -> None:
        self.rundir = rundir
        self.index = index
        self.path = os.path.join(rundir, f"worker-{index}.sock")
        self._server: asyncio.AbstractServer | None = None
        self._app: App | None = None

    async def start(self, app: App) -> None:
        """Catch up with the current rollout (a worker restarted after a load serves the loaded
        version, not the config's), then open the control socket: under the rollout lock, so no load
        can happen between the two and leave this worker behind."""
        self._app = app
        async with self.rollout_lock():
            state = self.read_state() or {}
            if "version" in state and state["version"] != app.service.version:
                log.info("worker %d: loading the current rollout, version %s", self.index, state["version"])
                await app.service.reload(**state["params"])
            cand = state.get(CANDIDATE)
            if cand is not None and cand["version"] != _version_of(app.service.candidate):
                log.info("worker %d: loading the current candidate, version %s", self.index, cand["version"])
                await app.service.reload_candidate(**cand["params"])
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # left by this worker's predecessor
            self._server = await asyncio.start_unix_server(self._handle, path=self.path)

    # -- rollouts: one at a time across the workers, remembered in the run directory --------------

    @contextlib.asynccontextmanager
    async def rollout_lock(self) -> AsyncIterator[None]:
        """An exclusive lock shared by every worker (flock on a file in the run directory)."""
        fd = os.open(os.path.join(self.rundir, ROLLOUT_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            await asyncio.get_running_loop().run_in_executor(None, fcntl.flock, fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def read_state(self) -> dict[str, Any] | None:
        try:
            with open(os.path.join(self.rundir, ROLLOUT_STATE)) as fh:
                state: dict[str, Any] = json.load(fh)
                return state
        except FileNotFoundError:
            return None

    def write_state(self, params: dict[str, str], version: str, role: str = PRIMARY) -> None:
        """Remember the last load of ``role`` (the other role's last load is kept)."""
        state = self.read_state() or {}
        if role == PRIMARY:
            state.update(params=params, version=version)
        else:
            state[CANDIDATE] = {"params": params, "version": version}
        tmp = os.path.join(self.rundir, ROLLOUT_STATE + ".tmp")
        with open(tmp, "w") as fh:
            json.dump(state, fh)
        os.replace(tmp, os.path.join(self.rundir, ROLLOUT_STATE))

    async def rollout(self, params: dict[str, str], role: str = PRIMARY) -> dict[str, Any]:
        """``POST .../load`` on this worker (or a moved alias the follow loop found): load here,
        remember it, then in every other worker, all under the rollout lock (two loads sent to two
        workers apply in one order everywhere). ``role``: "primary", or "candidate" for the [candidate]."""
        assert self._app is not None
        service = self._app.service
        async with self.rollout_lock():
            if role == PRIMARY:
                result = await service.reload(**params)
            else:
                result = await service.reload_candidate(**params)
            self.write_state(params, result["model_version"], role)
            result["workers"] = await self.broadcast_load(params, result, role)
        return result

    async def versions(self) -> dict[str, dict[str, str]]:
        """The version each worker serves, and its candidate's when one is configured (a worker
        that is restarting is left out): {"primary": {worker: version}, "candidate": {...}}."""
        assert self._app is not None
        others = self.others()
        answers = await asyncio.gather(
            *(self._ask(p, {"op": "version"}, PEER_TIMEOUT_S) for p in others), return_exceptions=True
        )
        service = self._app.service
        primary = {str(self.index): service.version}
        candidate = {str(self.index): _version_of(service.candidate)}
        for path, answer in zip(others, answers, strict=True):
            if isinstance(answer, bytes) and answer:
                reply = json.loads(answer)
                primary[_worker_of(path)] = reply["version"]
                candidate[_worker_of(path)] = reply.get(CANDIDATE, "")
        out = {PRIMARY: dict(sorted(primary.items()))}
        if service.cfg.candidate is not None:
            out[CANDIDATE] = dict(sorted(candidate.items()))
        return out

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def others(self) -> list[str]:
        return sorted(p for p in glob.glob(os.path.join(self.rundir, "worker-*.sock")) if p != self.path)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._app is not None
        try:
            request = json.loads(await reader.readline())
            if request["op"] == "metrics":
                writer.write(self._app.metrics.render())
            elif request["op"] == "version":
                service = self._app.service
                reply = {"version": service.version, CANDIDATE: _version_of(service.candidate)}
                writer.write(json.dumps(reply).encode())
            elif request["op"] == "load":
                try:
                    if request.get("role", PRIMARY) == PRIMARY:
                        result = await self._app.service.reload(**request["params"])
                    else:
                        result = await self._app.service.reload_candidate(**request["params"])
                    writer.write(json.dumps({"ok": result}).encode())
                except RequestError as exc:
                    writer.write(json.dumps({"error": exc.message}).encode())
            await writer.drain()
        except Exception:
            log.exception("control request failed")
        finally:
            writer.close()

    async def _ask(self, path: str, request: dict[str, Any], timeout: float) -> bytes:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(path)
            try:
                writer.write(json.dumps(request).encode() + b"\n")
                await writer.drain()
                return await reader.read()
            finally:
                writer.close()

    async def gather_metrics(self) -> list[bytes]:
        """Every other worker's metrics (a worker that is restarting is left out) and the supervisor's."""
        answers = await asyncio.gather(
            *(self._ask(p, {"op": "metrics"}, PEER_TIMEOUT_S) for p in self.others()), return_exceptions=True
        )
        texts = [a for a in answers if isinstance(a, bytes)]
        with contextlib.suppress(OSError), open(os.path.join(self.rundir, SUPERVISOR_METRICS), "rb") as fh:
            texts.append(fh.read())
        return texts

    async def broadcast_load(
        self, params: dict[str, str], own: dict[str, Any], role: str = PRIMARY
    ) -> dict[str, Any]:
        """Load the same version in every other worker; each worker's outcome, or LoadFailed naming them."""
        others = self.others()
        request = {"op": "load", "params": params, "role": role}
        # A load waits for the model to load and warm up in that worker: give it time.
        answers = await asyncio.gather(
            *(self._ask(p, request, 600.0) for p in others), return_exceptions=True
        )
        outcome: dict[str, Any] = {str(self.index): own["model_version"]}
        failed = []
        for path, answer in zip(others, answers, strict=True):
            worker = _worker_of(path)
            if isinstance(answer, (ConnectionError, FileNotFoundError)) or answer == b"":
                # A worker that died (its socket is stale, or it went mid-request): the supervisor starts
                # it again, and it loads this rollout from the run directory before it accepts a connection.
                outcome[worker] = "restarting"
                continue
            if isinstance(answer, BaseException):
                failed.append(f"worker {worker}: {type(answer).__name__}")
                continue
            reply = json.loads(answer or b"{}")
            if "ok" in reply:
                outcome[worker] = reply["ok"]["model_version"]
            else:
                failed.append(f"worker {worker}: {reply.get('error', 'no answer')}")
        if failed:
            raise LoadFailed(
                f"version {own['model_version']} is serving in worker {self.index}, but not in: {'; '.join(failed)}",
                status=500,
            )
        return outcome


def _worker_of(path: str) -> str:
    return os.path.basename(path)[len("worker-") : -len(".sock")]


def _version_of(mv: ModelVersion | None) -> str:
    return mv.version if mv is not None else ""


# -- the supervisor --------------------------------------------------------------------


def _die_with_parent() -> None:
    """In a worker before it runs: SIGTERM when the supervisor dies (even by SIGKILL), no orphans."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Supervisor:
    """Starts the workers on one socket, restarts one that dies, and drains them all on SIGTERM."""

    def __init__(self, cfg: ServeConfig, argv: list[str], count: int) -> None:
        self.cfg = cfg
        self.argv = argv
        self.count = count
        self.sock = listen(cfg.server.host, cfg.server.port)
        self.port = self.sock.getsockname()[1]
        self.rundir = tempfile.mkdtemp(prefix="sparkscore-")
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.started: dict[int, float] = {}
        self.quick_deaths: dict[int, int] = {}
        self.died_at: dict[int, float] = {}
        self.restarts = 0
        self.stopping = False

    def spawn(self, index: int) -> None:
        fd = self.sock.fileno()
        cmd = [sys.executable, "-m", "serving", *self.argv]
        cmd += ["--worker-fd", str(fd), "--worker-index", str(index), "--worker-dir", self.rundir]
        self.procs[index] = subprocess.Popen(cmd, pass_fds=(fd,), preexec_fn=_die_with_parent)
        self.started[index] = time.monotonic()

    def write_metrics(self) -> None:
        alive = sum(1 for p in self.procs.values() if p.poll() is None)
        base = f'{{model="{self.cfg.model.name}"}}'
        text = (
            "# HELP sparkscore_workers Worker processes running\n# TYPE sparkscore_workers gauge\n"
            f"sparkscore_workers{base} {alive}\n"
            "# HELP sparkscore_worker_restarts_total Workers restarted after they died\n"
            "# TYPE sparkscore_worker_restarts_total counter\n"
            f"sparkscore_worker_restarts_total{base} {self.restarts}\n"
        )
        tmp = os.path.join(self.rundir, SUPERVISOR_METRICS + ".tmp")
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, os.path.join(self.rundir, SUPERVISOR_METRICS))

    def _stop(self, sig: int, frame: FrameType | None) -> None:
        self.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        try:
            for i in range(self.count):
                self.spawn(i)
            self.write_metrics()
            while not self.stopping:
                time.sleep(0.2)
                self.check()
            return self.drain()
        finally:
            shutil.rmtree(self.rundir, ignore_errors=True)

    def check(self) -> None:
        """Restart a worker that exited; one that keeps dying at start-up waits longer each time."""
        now = time.monotonic()
        for index, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None or self.stopping:
                continue
            if index not in self.died_at:  # a death is counted once, however many polls see it
                quick = now - self.started[index] < 10
                self.quick_deaths[index] = self.quick_deaths.get(index, 0) + 1 if quick else 0
                self.died_at[index] = now
            deaths = self.quick_deaths[index]
            pause = min(30.0, 0.5 * 2 ** (deaths - 1)) if deaths else 0.0
            if now - self.died_at[index] < pause:
                continue
            del self.died_at[index]
            print(
                f"[sparkscore] worker {index} exited with {code}; starting it again",
                file=sys.stderr,
                flush=True,
            )
            self.restarts += 1
            self.spawn(index)
            self.write_metrics()

    def drain(self) -> int:
        """Close the port here, SIGTERM every worker (each finishes its in-flight requests), wait for them."""
        self.sock.close()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.server.drain_delay_s + self.cfg.server.drain_timeout_s + 15
        code = 0
        for proc in self.procs.values():
            try:
                rc = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
            if rc not in (0, -signal.SIGTERM):
                code = 1
        return code
