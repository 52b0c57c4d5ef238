"""Every core: ``--workers 2`` runs two server processes on one port under a supervisor; one scrape of
/metrics covers both, a load reaches both, a worker that dies comes back, and SIGTERM drains."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn

from serving.app import create_app
from serving.workers import DrainingServer
from tests.serving.conftest import GatedRunner, free_port, make_config, wait_until
from tests.serving.test_model_swap import ROW, version_of, versions  # noqa: F401 - versions: a fixture

ROOT = Path(__file__).resolve().parents[2]


def samples(url: str, name: str) -> dict[str, float]:
    """``name``'s value per worker label, from one scrape."""
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=20).text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1 :].rsplit("} ", 1)
            worker = next(
                (p.split("=")[1].strip('"') for p in labels.split(",") if p.startswith("worker=")), ""
            )
            out[worker] = out.get(worker, 0.0) + float(value)
    return out


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.slow
def test_two_workers_one_port_one_scrape_restart_load_everywhere_and_drain(versions, tmp_path):  # noqa: F811
    port = free_port()
    model = tmp_path / "model.pt"
    model.write_bytes(Path(versions["a"]).read_bytes())
    (tmp_path / "b.pt").write_bytes(Path(versions["b"]).read_bytes())
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving",
            "--config",
            "conf/serve.toml",
            "--port",
            str(port),
            "--workers",
            "2",
            "--model",
            str(model),
        ],
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"

    def both_ready() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"the supervisor exited with {proc.returncode}")
        try:
            return samples(url, "sparkscore_ready") == {"0": 1.0, "1": 1.0}
        except httpx.TransportError:
            return False

    try:
        wait_until(both_ready, "both workers to be ready", timeout=120)
        assert len(children(proc.pid)) == 2
        for i in range(20):  # a new connection each: either worker may take it
            resp = httpx.post(url + "/predict", json={"features": [20.0 + i, 1.0, 2.0, 3.0]}, timeout=20)
            assert resp.status_code == 200
        assert sum(samples(url, "nv_inference_request_success").values()) == 20

        victim = children(proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: samples(url, "sparkscore_worker_restarts_total") == {"": 1.0}, "a restart", timeout=60
        )
        wait_until(both_ready, "the restarted worker to be ready", timeout=120)
        assert victim not in children(proc.pid)

        loaded = httpx.post(
            url + "/v2/repository/models/demo_ctr/load",
            json={"parameters": {"path": "b.pt"}},
            timeout=120,
        )
        assert loaded.status_code == 200, loaded.text
        new = version_of(versions["b"])
        assert loaded.json()["workers"] == {"0": new, "1": new}
        for _ in range(10):
            resp = httpx.post(url + "/predict", json={"features": ROW}, timeout=20)
            assert resp.json()["model_version"] == new
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0


def test_sigterm_turns_readiness_false_stops_listening_and_lets_in_flight_requests_finish(ctr_model):
    runner = GatedRunner(ctr_model, hold=lambda rows: rows[0][0] == 999.0)
    cfg = make_config(ctr_model, cache={"enabled": False})
    app = create_app(cfg, model=ctr_model, runner=runner)
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning"
    )
    server = DrainingServer(config, app)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(url + "/v2/health/ready", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(ready, "the server to be ready")
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(
            httpx.post, url + "/predict", json={"features": [999.0, 1.0, 2.0, 3.0]}, timeout=30
        )
        assert runner.entered.wait(10)
        server.handle_exit(signal.SIGTERM, None)
        assert app.service.draining is True

        def refused() -> bool:
            try:
                httpx.get(url + "/v2/health/live", timeout=5)
                return False
            except httpx.ConnectError:
                return True
            except httpx.TransportError:
                # Accepted just before the listener closed, then reset: still on the way down.
                return False

        wait_until(refused, "the server to stop listening")
        assert not in_flight.done()
        runner.gate.set()
        assert in_flight.result(timeout=20).status_code == 200
    thread.join(30)
    assert not thread.is_alive()


def test_supervisor_back_off_grows_per_death_not_per_poll(ctr_model):
    import shutil
    import time

    from serving.workers import Supervisor

    sup = Supervisor(make_config(ctr_model, server={"port": 0}), [], 1)
    try:
        dead = subprocess.Popen(["true"])
        dead.wait()
        sup.procs[0], sup.started[0] = dead, time.monotonic()  # a worker that died at start-up
        for _ in range(10):  # ten polls of the same death, inside its 0.5 s pause
            sup.check()
        assert sup.quick_deaths[0] == 1
        assert sup.procs[0] is dead  # not restarted yet: the pause of one quick death
    finally:
        sup.sock.close()
        shutil.rmtree(sup.rundir, ignore_errors=True)


@pytest.mark.slow
def test_every_worker_serves_one_version_after_a_kill_a_load_and_concurrent_loads(versions, tmp_path):  # noqa: F811
    port = free_port()
    model = tmp_path / "model.pt"
    model.write_bytes(Path(versions["a"]).read_bytes())
    (tmp_path / "b.pt").write_bytes(Path(versions["b"]).read_bytes())
    a, b = version_of(versions["a"]), version_of(versions["b"])
    cmd = [sys.executable, "-m", "serving", "--config", "conf/serve.toml", "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--workers", "2", "--model", str(model)], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    load = url + "/v2/repository/models/demo_ctr/load"

    def workers() -> dict[str, str]:
        try:
            meta = httpx.get(url + "/v2/models/demo_ctr", timeout=20).json()
        except httpx.TransportError:
            return {}
        return meta.get("parameters", {}).get("workers", {})

    try:
        wait_until(lambda: set(workers()) == {"0", "1"}, "both workers", timeout=120)
        victim = children(proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        # Its socket is stale now, and its replacement is loading: the load must not fail for that.
        loaded = httpx.post(load, json={"parameters": {"path": "b.pt"}}, timeout=120)
        assert loaded.status_code == 200, loaded.text
        wait_until(lambda: workers() == {"0": b, "1": b}, "the restarted worker to serve b", timeout=120)
        # A new connection lands on either worker: each answers with b, and says which it is.
        seen = set()
        for i in range(30):
            resp = httpx.post(url + "/predict", json={"features": [20.0 + i, 1.0, 2.0, 3.0]}, timeout=20)
            assert resp.json()["model_version"] == b
            seen.add(resp.headers["x-sparkscore-worker"])
        assert seen <= {"0", "1"}
        # Two loads at once, on separate connections (likely different workers): one order everywhere.
        for _ in range(3):
            with ThreadPoolExecutor(2) as pool:
                answers = list(
                    pool.map(
                        lambda p: httpx.post(load, json={"parameters": {"path": p}}, timeout=120),
                        ["model.pt", "b.pt"],
                    )
                )
            assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
            served = workers()
            assert set(served) == {"0", "1"} and len(set(served.values())) == 1, served
            assert set(served.values()) <= {a, b}
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0


@pytest.mark.slow
def test_workers_exit_when_their_supervisor_is_killed(versions, tmp_path):  # noqa: F811
    port = free_port()
    model = tmp_path / "model.pt"
    model.write_bytes(Path(versions["a"]).read_bytes())
    cmd = [sys.executable, "-m", "serving", "--config", "conf/serve.toml", "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--workers", "2", "--model", str(model)], cwd=ROOT)
    try:
        wait_until(lambda: len(children(proc.pid)) == 2, "two workers", timeout=60)
        workers = children(proc.pid)
    finally:
        proc.kill()  # SIGKILL: the supervisor cannot forward anything
        proc.wait(30)

    def gone() -> bool:
        alive = []
        for pid in workers:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().split()[2]
            except FileNotFoundError:
                continue
            if state != "Z":
                alive.append(pid)
        return not alive

    try:
        wait_until(gone, "the orphaned workers to exit", timeout=60)
    finally:
        for pid in workers:  # whatever the outcome, nothing of this test keeps running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
