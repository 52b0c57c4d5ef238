"""What stands in front of the model: slow or idle clients, too many connections or requests,
unauthenticated bodies, and SIGTERM behind a load balancer. Each has a bound that answers (a 4xx
or 503 with Retry-After) or closes the connection, rather than holding a worker."""

from __future__ import annotations

import json
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import pytest

from serving.app import create_app
from serving.workers import DrainingServer, uvicorn_config
from tests.serving.conftest import GatedRunner, make_config, wait_until

ROW = [31.0, 4.0, 19.5, 7.0]
HELD = [999.0, 1.0, 2.0, 3.0]


def held(rows) -> bool:
    return any(r[0] == 999.0 for r in rows)


def connect(srv) -> socket.socket:
    url = urlparse(srv.url)
    return socket.create_connection((url.hostname, url.port), timeout=20)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes; the 20 s socket timeout fails a connection it keeps."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def head(path: str, length: int, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def test_a_connection_that_never_finishes_its_headers_is_closed(serve):
    srv = serve(server={"header_timeout_s": 0.5})
    with connect(srv) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        received = read_until_closed(sock)
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    with connect(srv) as idle:  # a connection that sends nothing at all
        assert read_until_closed(idle).startswith(b"HTTP/1.1 408")
    assert srv.post("/predict", {"features": ROW}).status_code == 200


def test_connections_beyond_the_cap_get_503_and_are_closed(serve):
    srv = serve(server={"max_connections": 3, "header_timeout_s": 30.0})
    idle = [connect(srv) for _ in range(3)]
    try:
        with connect(srv) as extra:
            received = read_until_closed(extra)
        assert received.startswith(b"HTTP/1.1 503"), received[:200]
        assert b"retry-after: 1" in received.lower()
    finally:
        for s in idle:
            s.close()
    wait_until(lambda: srv.post("/predict", {"features": ROW}).status_code == 200, "a free connection")


def test_requests_beyond_max_concurrency_are_shed_with_503_and_retry_after(serve, ctr_model):
    runner = GatedRunner(ctr_model, hold=held)
    srv = serve(runner=runner, server={"max_concurrency": 1}, cache={"enabled": False})
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, srv.url + "/predict", json={"features": HELD}, timeout=30)
        assert runner.entered.wait(10)
        shed = srv.post("/predict", {"features": ROW})
        assert shed.status_code == 503, shed.text
        assert shed.headers["retry-after"] == "1"
        assert "overloaded" in shed.json()["error"]
        assert srv.get("/v2/health/ready").status_code == 200  # probes are never shed
        runner.gate.set()
        assert first.result(20).status_code == 200
    assert srv.metric("sparkscore_shed_requests_total", reason="overloaded") == 1


def test_a_wrong_token_is_answered_before_the_body_and_the_connection_closed(serve):
    srv = serve(token="s3cret")
    with connect(srv) as sock:
        sock.sendall(head("/predict", 10_000_000) + b'{"features": [')  # 10 MB announced, never sent
        received = read_until_closed(sock)
    assert received.startswith(b"HTTP/1.1 401"), received[:200]
    assert b"connection: close" in received.lower()


def test_a_chunked_body_over_the_limit_gets_413_and_the_connection_closes(serve):
    srv = serve(server={"max_body_bytes": 1000})
    with connect(srv) as sock:
        chunk = b"[" + b" " * 1998 + b"]"
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n" % len(chunk)
            + chunk
            + b"\r\n"
        )  # no terminating chunk: the sender would go on
        received = read_until_closed(sock)
    assert received.startswith(b"HTTP/1.1 413"), received[:200]


def test_drain_timeout_below_one_second_is_kept_as_a_float(ctr_model):
    cfg = make_config(ctr_model, server={"drain_timeout_s": 0.5})
    app = create_app(cfg, model=ctr_model)
    assert uvicorn_config(app, cfg).timeout_graceful_shutdown == 0.5


@pytest.fixture
def draining():
    """A DrainingServer (as ``python -m serving`` runs it) in a thread; yields (server, app, url)."""
    started: list[tuple[DrainingServer, threading.Thread]] = []

    def start(model, runner, **server):
        cfg = make_config(model, cache={"enabled": False}, server={"header_timeout_s": 30.0, **server})
        app = create_app(cfg, model=model, runner=runner)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        srv = DrainingServer(uvicorn_config(app, cfg, log_level="warning"), app)
        thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        started.append((srv, thread))
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _status(url + "/v2/health/ready") == 200, "the server to be ready")
        return srv, app, url

    yield start
    for srv, thread in started:
        srv.should_exit = True
        thread.join(30)


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.TransportError:
        return 0


def test_sigterm_serves_a_request_whose_body_is_still_arriving(draining, ctr_model):
    srv, app, url = draining(ctr_model, GatedRunner(ctr_model))
    body = json.dumps({"features": ROW}).encode()
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=20) as sock:
        sock.sendall(head("/predict", len(body)) + body[:5])
        wait_until(lambda: app.inflight == 1, "the request to be admitted")
        srv.handle_exit(signal.SIGTERM, None)
        sock.sendall(body[5:])
        received = read_until_closed(sock)
    assert received.startswith(b"HTTP/1.1 200"), received[:300]
    assert b"connection: close" in received.lower()  # draining: the client reconnects elsewhere


def test_drain_delay_keeps_serving_kept_alive_clients_while_readiness_says_not_ready(draining, ctr_model):
    srv, app, url = draining(ctr_model, GatedRunner(ctr_model), drain_delay_s=30.0)
    with httpx.Client(timeout=20) as client:
        assert client.post(url + "/predict", json={"features": ROW}).status_code == 200
        srv.handle_exit(signal.SIGTERM, None)
        assert client.get(url + "/v2/health/ready").status_code == 400
        after = client.post(url + "/predict", json={"features": [40.0, 1.0, 2.0, 3.0]})
        assert after.status_code == 200, after.text
        # A fresh connection is still accepted during the pre-stop delay.
        assert httpx.post(url + "/predict", json={"features": ROW}, timeout=20).status_code == 200
    srv.handle_exit(signal.SIGTERM, None)  # a second signal ends the delay
    wait_until(lambda: _status(url + "/v2/health/live") == 0, "the listener to close")
