"""Soak with faults: 2 workers + Redis at 70% of their measured maximum for several minutes, while
Redis restarts twice, the model is swapped 5 times (load endpoint and file watch), one worker is
killed with -9, and the supervisor gets SIGTERM at the end.

    python bench/soak.py [--seconds 240] [--share 0.7]      (make soak; under the bench lock)

Writes ``bench/results/soak.json``: ``requests`` (sent), ``by_status``, ``never_answered`` (no answer
and no connection error within 10 s: must be 0), ``wrong_version`` (answered by a version that was
no longer current when the request was sent: must be 0), the faults with their times, and the p99 of
each 10 s window (whether the window is within 2 s of a fault). Connection errors are counted apart:
a worker killed with -9 drops the requests it holds, and after SIGTERM the listener closes.

Requests: /predict with the features (prediction cache in Redis) and, one in ten, with ids only
(features from the Redis feature store: 503 while Redis is down, as documented).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import common  # noqa: E402
from streaming.broker import free_port as common_free_port  # noqa: E402

DEMO = ROOT / "build" / "demo" / "ctr.pt"
NO_ANSWER_S = 10.0
MAX_CONNECTIONS = 1024  # the generator's connections (a request waits for one beyond that)
FAULT_TAIL_S = 2.0
WINDOW_S = 10.0

SERVE_TOML = """
[model]
path = "{model}"
name = "demo_ctr"
input_columns = ["age", "purchase_count", "price", "category_id"]
device = "cpu"

[server]
port = {port}
workers = 2
log_level = "warning"
drain_delay_s = 1.0
drain_timeout_s = 10.0

[batcher]
max_batch_size = 64
max_wait_ms = 2.0
default_timeout_ms = 1000

[redis]
url = "redis://127.0.0.1:{redis_port}/0"
socket_timeout_ms = 100   # the default 50 ms timed out often on the shared 2-core machine

[reload]
watch = true
poll_s = 0.5
"""


# -- the load generator (its own process) ----------------------------------------------------


class _Conn(asyncio.Protocol):
    """A keep-alive connection, one request at a time; resolves (status, body)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.fut: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).lower()
        at = head.find(b"content-length:")
        stop = head.find(b"\r\n", at)
        length = int(head[at + 15 : stop if stop > 0 else None]) if at >= 0 else 0
        if len(self.buf) < end + 4 + length:
            return
        body = bytes(self.buf[end + 4 : end + 4 + length])
        del self.buf[: end + 4 + length]
        if b"connection: close" in head:
            self.closed = True
        if self.fut is not None and not self.fut.done():
            self.fut.set_result((int(head[9:12]), body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.fut is not None and not self.fut.done():
            self.fut.set_exception(ConnectionError("connection lost"))


def _bodies(n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 10 == 9:
            body: dict[str, Any] = {"user_id": f"u{i % 100}", "item_id": f"i{i % 50}"}
        else:
            feats = [
                float(rng.integers(18, 80)),
                float(rng.poisson(5)),
                round(float(rng.gamma(2.0, 40.0)), 2),
                3.0,
            ]
            body = {"user_id": i, "features": feats}
        raw = json.dumps(body).encode()
        head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n"
        out.append(head.encode() + raw)
    return out


async def _generate(port: int, rate: float, seconds: float, seed: int, out: Path) -> None:
    loop = asyncio.get_running_loop()
    n = int(rate * seconds)
    reqs = _bodies(min(n, 200_000), seed)
    rng = np.random.default_rng(seed)
    sent_at = np.zeros(n)
    latency = np.full(n, np.nan)
    status = np.zeros(n, dtype=np.int32)  # 0: no answer yet; -1: connection error
    versions: list[str] = [""] * n
    idle: list[_Conn] = []
    opened = 0
    free: asyncio.Queue[None] = asyncio.Queue()  # a connection slot came back

    async def one(i: int, scheduled: float) -> None:
        nonlocal opened
        c = None
        try:
            while c is None:
                while idle:
                    c = idle.pop()
                    if not c.closed:
                        break
                    opened -= 1
                    c = None
                if c is None and opened < MAX_CONNECTIONS:
                    opened += 1
                    try:
                        _, c = await loop.create_connection(_Conn, "127.0.0.1", port)
                    except OSError:
                        opened -= 1
                        raise
                elif c is None:
                    await free.get()
            c.fut = loop.create_future()
            assert c.transport is not None
            sent_at[i] = time.monotonic()
            c.transport.write(reqs[i % len(reqs)])
            code, body = await asyncio.wait_for(c.fut, NO_ANSWER_S)
        except TimeoutError:
            if c is not None and c.transport is not None:
                c.transport.close()
            return  # never answered: status stays 0
        except (ConnectionError, OSError):
            if sent_at[i] == 0:
                sent_at[i] = time.monotonic()
            status[i] = -1
            if c is not None:
                opened -= 1
                free.put_nowait(None)
            return
        # From when the request was due (open loop): time spent waiting for a connection counts too.
        latency[i] = time.monotonic() - scheduled
        status[i] = code
        if code == 200:
            versions[i] = json.loads(body).get("model_version", "")
        elif code >= 500:
            versions[i] = (
                json.loads(body).get("error", "")[:60] if body.startswith(b"{") else body[:60].decode()
            )
        if c.closed:
            opened -= 1
        else:
            idle.append(c)
        free.put_nowait(None)

    start = time.monotonic() + 0.05
    sched = start + np.cumsum(rng.exponential(1.0 / rate, n))
    tasks = []
    for i in range(n):
        delay = sched[i] - time.monotonic()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(i, sched[i])))
    await asyncio.wait(tasks, timeout=NO_ANSWER_S + 2)
    np.savez(out, sent_at=sent_at, latency=latency, status=status, versions=np.array(versions))


# -- the orchestrator --------------------------------------------------------------------------


class Redis:
    def __init__(self, workdir: Path) -> None:
        self.port = common_free_port()
        self.dir = workdir / "redis"
        self.dir.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
            + ["--save", "", "--appendonly", "yes", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
        )
        import redis

        for _ in range(200):
            try:
                redis.Redis(port=self.port, socket_timeout=1).ping()
                return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def second_version(path: Path) -> None:
    """A model with different answers (the demo's score halved), saved as TorchScript at ``path``."""
    import torch

    class Half(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) * 0.5

    torch.jit.save(torch.jit.script(Half(torch.jit.load(str(DEMO))).eval()), str(path))


def version_of(path: Path) -> str:
    from udfs.spec import ModelSpec, resolve

    return resolve(
        ModelSpec(path=str(path), input_columns=("age", "purchase_count", "price", "category_id"))
    ).version


def put(content: Path, where: Path) -> None:
    tmp = where.with_suffix(".tmp")
    shutil.copy(content, tmp)
    os.replace(tmp, where)


def main(argv: list[str] | None = None) -> int:

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=240.0)
    p.add_argument("--share", type=float, default=0.7, help="share of the measured maximum to offer")
    p.add_argument("--generate", nargs=4, help=argparse.SUPPRESS)  # port rate seconds out
    args = p.parse_args(argv)
    if args.generate:
        import uvloop

        port, rate, seconds, out = args.generate
        uvloop.run(_generate(int(port), float(rate), float(seconds), 1, Path(out)))
        return 0

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    redis = Redis(work)
    try:
        return soak(args, work, redis)
    finally:
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)


def soak(args: argparse.Namespace, work: Path, redis: Redis) -> int:
    import httpx
    import redis as redis_py

    client = redis_py.Redis(port=redis.port)
    for u in range(100):
        client.hset(f"user:u{u}", mapping={"age": 20 + u % 50, "purchase_count": u % 7})
    for i in range(50):
        client.hset(f"item:i{i}", mapping={"price": 5.0 + i, "category_id": i % 20})
    a, b = work / "a.pt", work / "b.pt"
    shutil.copy(DEMO, a)
    second_version(b)
    va, vb = version_of(a), version_of(b)
    f1, f2 = work / "f1.pt", work / "f2.pt"
    put(a, f1)
    port = common_free_port()
    conf = work / "serve.toml"
    conf.write_text(SERVE_TOML.format(model=f1, port=port, redis_port=redis.port))
    sup = subprocess.Popen(
        [sys.executable, "-m", "serving", "--config", str(conf)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        start_new_session=True,  # its own group: a failed run kills the workers too
    )
    gen: subprocess.Popen[bytes] | None = None
    url = f"http://127.0.0.1:{port}"
    events: list[dict[str, Any]] = []
    current: list[tuple[float, str]] = []  # (time from which every worker serves it, version)

    def workers() -> dict[str, str]:
        try:
            return (
                httpx.get(url + "/v2/models/demo_ctr", timeout=5)
                .json()
                .get("parameters", {})
                .get("workers", {})
            )
        except (httpx.TransportError, ValueError):
            return {}

    def all_on(version: str, what: str) -> None:
        end = time.monotonic() + 120
        while time.monotonic() < end:
            w = workers()
            if len(w) == 2 and set(w.values()) == {version}:
                current.append((time.monotonic(), version))
                return
            time.sleep(0.05)
        raise RuntimeError(f"{what}: the workers never all served {version}")

    try:
        all_on(va, "start-up")
        # The maximum: closed loop, 64 connections, 8 s (the realtime bench's load generator).
        out = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "realtime_bench.py"), "--client", "--mode", "closed"]
            + ["--port", str(port), "--concurrency", "64", "--duration", "8", "--distinct", "100000"],
            capture_output=True,
            text=True,
            check=True,
        )
        max_rps = json.loads(out.stdout.strip().splitlines()[-1])["rps"]
        rate = max_rps * args.share
        print(
            f"[soak] measured max {max_rps:.0f} req/s; offering {rate:.0f} req/s for {args.seconds:g} s",
            flush=True,
        )
        samples = work / "samples.npz"
        gen = subprocess.Popen(
            [sys.executable, __file__, "--generate", str(port), str(rate), str(args.seconds), str(samples)],
            cwd=ROOT,
        )
        t0 = time.monotonic()

        def at(offset: float) -> None:
            delay = t0 + offset * args.seconds / 240.0 - time.monotonic()
            if delay > 0:
                time.sleep(delay)

        def event(kind: str, start: float, **extra: Any) -> None:
            events.append({"kind": kind, "start": start, "end": time.monotonic(), **extra})
            print(f"[soak] {kind} at {start - t0:.1f} s ({time.monotonic() - start:.2f} s)", flush=True)

        def restart_redis() -> None:
            s = time.monotonic()
            redis.stop()
            time.sleep(1.0)
            redis.start()
            event("redis_restart", s)

        def load(path: Path, version: str) -> None:
            s = time.monotonic()
            for _ in range(50):  # a 503 (shed at the door) says retry
                resp = httpx.post(
                    url + "/v2/repository/models/demo_ctr/load",
                    json={"parameters": {"path": path.name}},
                    timeout=120,
                )
                if resp.status_code != 503:
                    break
                time.sleep(0.2)
            if resp.status_code != 200:
                raise RuntimeError(f"load failed: {resp.status_code} {resp.text}")
            current.append((time.monotonic(), version))
            event("swap_endpoint", s, version=version)

        def watch(content: Path, where: Path, version: str) -> None:
            s = time.monotonic()
            put(content, where)
            all_on(version, "file watch")
            event("swap_watch", s, version=version)

        def kill_worker() -> None:
            s = time.monotonic()
            pids = [int(x) for x in Path(f"/proc/{sup.pid}/task/{sup.pid}/children").read_text().split()]
            os.kill(pids[0], signal.SIGKILL)
            end = time.monotonic() + 120
            while time.monotonic() < end and len(workers()) < 2:
                time.sleep(0.1)
            time.sleep(0.5)
            event("kill_9_worker", s)

        at(20)
        restart_redis()
        at(45)
        put(b, f2)
        load(f2, vb)  # 1: endpoint, B (the watch now follows f2)
        at(75)
        watch(a, f2, va)  # 2: watch, A
        at(100)
        kill_worker()
        at(125)
        put(b, f1)
        load(f1, vb)  # 3: endpoint, B (the watch follows f1)
        at(150)
        restart_redis()
        at(175)
        watch(a, f1, va)  # 4: watch, A
        at(200)
        put(b, f2)
        load(f2, vb)  # 5: endpoint, B
        at(230)
        s = time.monotonic()
        sup.send_signal(signal.SIGTERM)
        code = sup.wait(60)
        event("sigterm", s, exit_code=code)
        gen.wait(args.seconds + 60)
    finally:
        for proc in (gen, sup):
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    if proc is sup:
                        os.killpg(proc.pid, signal.SIGKILL)
                    else:
                        proc.kill()
                proc.wait(30)
    data = np.load(samples)
    result = summarize(data, events, current, t0, args, max_rps, rate)
    result["loadavg"] = os.getloadavg()
    out_path = common.RESULTS / "soak.json"
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "windows"}, indent=2))
    print(f"[soak] wrote {out_path}")
    return 0


def summarize(
    data: Any,
    events: list[dict[str, Any]],
    current: list[tuple[float, str]],
    t0: float,
    args: Any,
    max_rps: float,
    rate: float,
) -> dict[str, Any]:
    sent, lat, status, versions = data["sent_at"], data["latency"], data["status"], data["versions"]
    sigterm = next(e["start"] for e in events if e["kind"] == "sigterm")
    codes, counts = np.unique(status[sent > 0], return_counts=True)
    by_status = {
        ("connection_error" if c == -1 else "no_answer" if c == 0 else str(c)): int(n)
        for c, n in zip(codes, counts, strict=True)
    }
    never = int(((status == 0) & (sent > 0)).sum())
    # A request sent once every worker serves version v is answered by v, or by the version that
    # replaces v while it is in flight; any other (a replaced one) is wrong.
    wrong = 0
    wrong_examples: list[dict[str, Any]] = []
    for i in np.nonzero(status == 200)[0]:
        due = [v for t, v in current if t <= sent[i]]
        later = [v for t, v in current if t > sent[i]]
        if due and versions[i] != due[-1] and versions[i] != (later[0] if later else None):
            wrong += 1
            if len(wrong_examples) < 10:
                wrong_examples.append(
                    {"sent_s": round(sent[i] - t0, 3), "answered_by": str(versions[i]), "current": due[-1]}
                )
    reasons: dict[str, int] = {}
    for i in np.nonzero(status >= 500)[0]:
        key = re.sub(r"\d+(\.\d+)? ms", "N ms", f"{status[i]} {versions[i]}")
        reasons[key] = reasons.get(key, 0) + 1
    faults = [(e["start"], e["end"] + FAULT_TAIL_S) for e in events]
    fives = status >= 500
    in_fault = np.zeros(len(sent), dtype=bool)
    for s, e in faults:
        in_fault |= (sent >= s) & (sent <= e)
    windows = []
    for w in range(int(np.ceil(args.seconds / WINDOW_S))):
        lo, hi = t0 + w * WINDOW_S, t0 + (w + 1) * WINDOW_S
        sel = (sent >= lo) & (sent < hi) & (status == 200)
        clean = sel & ~in_fault
        windows.append(
            {
                "from_s": w * WINDOW_S,
                "requests": int(((sent >= lo) & (sent < hi)).sum()),
                "p99_ms": round(float(np.percentile(lat[sel], 99)) * 1000, 2) if sel.any() else None,
                "p99_outside_faults_ms": round(float(np.percentile(lat[clean], 99)) * 1000, 2)
                if clean.any()
                else None,
                "fault": bool(any(s < hi and e > lo for s, e in faults)),
            }
        )
    outside = [w["p99_outside_faults_ms"] for w in windows if w["p99_outside_faults_ms"] is not None]
    return {
        "seconds": args.seconds,
        "max_rps": max_rps,
        "offered_rps": round(rate, 1),
        "requests": int((sent > 0).sum()),
        "by_status": by_status,
        "never_answered": never,
        "wrong_version": wrong,
        "wrong_version_examples": wrong_examples,
        "not_sent_before_the_end": int((sent == 0).sum()),
        "5xx_reasons": reasons,
        "5xx_outside_fault_windows": int((fives & ~in_fault).sum()),
        "5xx_by_status_in_fault_windows": {
            str(c): int(((status == c) & in_fault).sum()) for c in np.unique(status[fives])
        },
        "connection_errors_after_sigterm": int(((status == -1) & (sent >= sigterm)).sum()),
        "p99_outside_faults_max_ms": max(outside) if outside else None,
        "version_timeline": [{"from_s": round(t - t0, 3), "version": v} for t, v in current],
        "faults": [{**e, "start": round(e["start"] - t0, 2), "end": round(e["end"] - t0, 2)} for e in events],
        "windows": windows,
    }


if __name__ == "__main__":
    sys.exit(main())
