"""Fixtures for the real-time scorer: a real uvicorn on a free loopback port, a real redis-server.

``serve(...)`` starts the ASGI app under uvicorn (uvloop + httptools, as in
production) in a background thread, so a test can hand it a gated model runner
and hold a micro-batch mid-compute. ``redis_server`` starts ``redis-server`` on a
free port and FAILS (never skips) when the binary is missing.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from serving.app import App, create_app
from serving.config import (
    BatcherConfig,
    CacheConfig,
    CandidateConfig,
    RedisConfig,
    ReloadConfig,
    ServeConfig,
    ServerConfig,
)
from serving.model import ModelRunner, Row
from streaming.broker import free_port
from udfs.demo import CTR_FEATURES
from udfs.spec import ModelSpec, ResolvedModel, resolve


def wait_until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` (a liveness bound, not a timing assertion)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


# -- models ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ctr_model(models) -> ResolvedModel:
    return resolve(
        ModelSpec(path=models["torchscript"], input_columns=CTR_FEATURES, name="demo_ctr", device="cpu")
    )


@pytest.fixture(scope="session")
def clf_model(models) -> ResolvedModel:
    """A 6-feature classifier reading one array column (the other input layout)."""
    spec = ModelSpec(
        path=models["classifier"],
        input_columns=("features",),
        num_features=6,
        name="clf",
        output="probabilities",
        activation="softmax",
        device="cpu",
    )
    return resolve(spec)


class GatedRunner(ModelRunner):
    """The real runner, with test hooks: hold loading or a batch at a gate, see every batch, fail on demand.

    ``hold`` is a predicate over a batch's rows: a matching batch waits at ``gate``.
    A row whose first value is ``poison`` makes the model raise.
    """

    def __init__(
        self,
        model: ResolvedModel,
        *,
        hold: Callable[[list[Row]], bool] | None = None,
        hold_load: bool = False,
        poison: float | None = None,
    ) -> None:
        super().__init__(model)
        self.hold = hold
        self.poison = poison
        self.gate = threading.Event()
        self.load_gate = threading.Event()
        if not hold_load:
            self.load_gate.set()
        self.entered = threading.Event()  # a held batch has started computing
        self.live = False  # loaded and warmed up: batches from now on are real requests
        self.batches: list[list[Row]] = []
        self._lock = threading.Lock()

    def load(self) -> None:
        self.load_gate.wait(30)
        super().load()
        self.live = True

    def score(self, rows: list[Row]) -> list[dict[str, Any]]:
        if self.live:
            with self._lock:
                self.batches.append(list(rows))
        if self.hold is not None and self.hold(rows):
            self.entered.set()
            self.gate.wait(30)
        if self.poison is not None and any(r[0] == self.poison for r in rows):
            raise RuntimeError(f"poisoned row: age = {self.poison}")
        return super().score(rows)

    def rows_seen(self) -> list[Row]:
        with self._lock:
            return [r for b in self.batches for r in b]


# -- servers --------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    app: App
    client: httpx.Client
    runner: ModelRunner
    extra: dict[str, Any] = field(default_factory=dict)

    def post(self, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        return (
            self.client.post(self.url + path, json=body, **kw)
            if body is not None
            else self.client.post(self.url + path, **kw)
        )

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.get(self.url + path, **kw)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        total = 0.0
        for line in self.get("/metrics").text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, value = line.rsplit(" ", 1)
            metric, _, rest = head.partition("{")
            if metric != name:
                continue
            if all(f'{k}="{v}"' in rest for k, v in labels.items()):
                total += float(value)
        return total

    def wait_ready(self) -> None:
        wait_until(lambda: self.get("/v2/health/ready").status_code == 200, "readiness")


@contextlib.contextmanager
def uvicorn_thread(app: App) -> Iterator[str]:
    """Run ``app`` under a real uvicorn (uvloop, httptools) on a free 127.0.0.1 port."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    from serving.workers import DrainingServer, uvicorn_config

    # The production settings (header timeout, connection cap, drain), as ``python -m serving`` runs it.
    server = DrainingServer(uvicorn_config(app, app.cfg, log_level="warning"), app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), "uvicorn to start")
    if not thread.is_alive():
        pytest.fail("uvicorn exited during startup")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def make_config(
    model: ResolvedModel, candidate: CandidateConfig | None = None, **sections: dict[str, Any]
) -> ServeConfig:
    kinds = {
        "server": ServerConfig,
        "batcher": BatcherConfig,
        "cache": CacheConfig,
        "redis": RedisConfig,
        "reload": ReloadConfig,
    }
    return ServeConfig(
        model=model.spec, candidate=candidate, **{k: kinds[k](**v) for k, v in sections.items()}
    )


@pytest.fixture
def serve(ctr_model) -> Iterator[Callable[..., Server]]:
    """``serve(runner=..., token=..., model=..., candidate=..., batcher={...}, ...)`` -> a running :class:`Server`.

    ``service_options`` go to :class:`serving.service.Service` (a candidate runner, a runner factory).
    """
    stack = contextlib.ExitStack()

    def start(
        *,
        model: ResolvedModel | None = None,
        runner: ModelRunner | None = None,
        token: str | None = None,
        ready: bool = True,
        candidate: CandidateConfig | None = None,
        service_options: dict[str, Any] | None = None,
        **sections: dict[str, Any],
    ) -> Server:
        model = model or ctr_model
        cfg = make_config(model, candidate, **sections)
        runner = runner or ModelRunner(model)
        app = create_app(cfg, model=model, runner=runner, token=token, service_options=service_options)
        url = stack.enter_context(uvicorn_thread(app))
        client = stack.enter_context(httpx.Client(timeout=20.0))
        server = Server(url, app, client, runner)
        if ready:
            server.wait_ready()
        return server

    yield start
    stack.close()


# -- redis ----------------------------------------------------------------------------


@dataclass
class RedisProcess:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_redis(port: int | None = None) -> RedisProcess:
    """A fresh redis-server on a free port (or on ``port``: the same server coming back after a restart)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not installed; the serving tests need it: run `make setup` as root "
            "or `sudo apt-get install redis-server`"
        )
    port = port or free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--enable-debug-command",
            "yes",
            "--loglevel",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    handle = RedisProcess(port, proc)

    def answers() -> bool:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.fail(f"redis-server exited at start: {err.strip()}")
        try:
            return bool(handle.client().ping())
        except Exception:  # noqa: BLE001 - not up yet
            return False

    wait_until(answers, "redis-server to answer PING")
    return handle


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    handle = start_redis()
    yield handle
    handle.stop()


@pytest.fixture
def redis_db(redis_server: RedisProcess) -> Iterator[RedisProcess]:
    """The session's redis-server, emptied before the test."""
    redis_server.client().flushall()
    yield redis_server
