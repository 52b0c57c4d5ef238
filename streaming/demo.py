"""The streaming demo: a local broker, a trickle of demo events, the stream job, predictions as they arrive.

    python -m streaming.demo [--seconds 60] [--rate 200] [--port 9092] [--broker tansu|kafka]

Starts a broker on 127.0.0.1 (or uses one already listening there): Tansu by
default, which starts in well under a second with no JVM, or Apache Kafka
(``--broker kafka``, 10-20 s to start; ``make jars`` fetches it). Then it
produces demo CTR events (about 2 % malformed or with bad features), runs
``jobs/stream_score.py`` under spark-submit for ``--seconds``, prints a sample
of the predictions as they land, then the counts on every output topic.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from streaming import kafka_client as kc
from streaming.broker import ApacheKafkaBroker, BrokerError, LocalBroker, TansuBroker
from udfs.demo import CTR_FEATURES, synthetic_ctr

ROOT = Path(__file__).resolve().parents[1]


def demo_event(table: dict[str, list], i: int) -> tuple[bytes, bytes]:
    """Event ``i`` of a synthetic CTR table, stamped now; every 97th one is not JSON.

    Bad rows of the table (null, NaN or infinite features) go out as JSON
    ``null`` / ``NaN`` / ``Infinity``, which the job reads and dead-letters with the core's reason.
    """
    user = f"user-{table['user_id'][i]}"
    if i % 97 == 50:
        return user.encode(), b"{not json"
    body = {
        "user_id": user,
        "features": [table[c][i] for c in CTR_FEATURES],
        "timestamp": datetime.now(UTC).isoformat(),
    }
    return user.encode(), json.dumps(body).encode()


def produce(bootstrap: str, topic: str, rate: float, seconds: float, stop: threading.Event) -> int:
    """Send demo events at about ``rate`` per second."""
    producer = kc.make_producer({"bootstrap.servers": bootstrap}, **{"enable.idempotence": False})
    n = max(1, int(rate * seconds))
    table = synthetic_ctr(n, seed=11, bad_fraction=0.02).to_pydict()
    start = time.monotonic()
    sent = 0
    for i in range(n):
        if stop.is_set():
            break
        due = start + i / rate
        if due > time.monotonic():
            time.sleep(due - time.monotonic())
        key, value = demo_event(table, i)
        producer.produce(topic, key=key, value=value)
        producer.poll(0)
        sent += 1
    producer.flush(30)
    return sent


def watch(bootstrap: str, topic: str, stop: threading.Event, every: int = 200) -> None:
    """Print every ``every``-th prediction as it lands, with its end-to-end latency."""
    consumer = kc.make_consumer({"bootstrap.servers": bootstrap}, **{"enable.partition.eof": False})
    parts: list[int] = []
    deadline = time.monotonic() + 60
    while not parts and time.monotonic() < deadline and not stop.is_set():
        parts = kc.topic_partitions(consumer, 10).get(topic, [])
        time.sleep(0.5)
    consumer.assign([kc.TopicPartition(topic, p, 0) for p in parts])
    seen = 0
    while not stop.is_set():
        msg = consumer.poll(0.5)
        if msg is None or msg.error():
            continue
        seen += 1
        if seen % every == 1:
            body = json.loads(msg.value() or b"{}")
            lag = time.time() - datetime.fromisoformat(body["timestamp"]).timestamp()
            print(
                f"  prediction #{seen:,}: {body['user_id']} -> {body['prediction']:.4f} "
                f"(model {body['model_version']}, {lag * 1000:.0f} ms after the event)",
                flush=True,
            )
    consumer.close()


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m streaming.demo", description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--rate", type=float, default=200, help="events per second")
    p.add_argument("--port", type=int, default=9092)
    p.add_argument("--config", default="conf/stream.toml")
    p.add_argument(
        "--broker", choices=["tansu", "kafka"], default="tansu", help="tansu or kafka (Apache Kafka)"
    )
    args = p.parse_args(argv)
    bootstrap = f"127.0.0.1:{args.port}"
    broker: LocalBroker | None = None
    if port_open(args.port):
        print(f"[sparkscore] using the broker already on {bootstrap}", flush=True)
    else:
        try:
            broker = (ApacheKafkaBroker if args.broker == "kafka" else TansuBroker)(args.port).start(
                timeout_s=180
            )
        except BrokerError as exc:
            print(f"[sparkscore] error: {exc}", file=sys.stderr)
            return 2
        where = "in memory" if args.broker == "tansu" else "temp log dir"
        print(f"[sparkscore] started {broker.kind} on {bootstrap} ({where})", flush=True)
    # A fresh in-memory broker has none of the offsets an old checkpoint remembers.
    checkpoint = ROOT / "build" / "stream" / f"demo-{int(time.time())}"
    kc.ensure_topics({"bootstrap.servers": bootstrap}, {"events": 2})
    stop = threading.Event()
    producer = threading.Thread(
        target=produce, args=(bootstrap, "events", args.rate, args.seconds + 30, stop), daemon=True
    )
    watcher = threading.Thread(target=watch, args=(bootstrap, "predictions", stop), daemon=True)
    spark_submit = shutil.which("spark-submit") or str(Path(sys.executable).parent / "spark-submit")
    log4j = ROOT / "conf" / "log4j2.properties"
    cmd = [
        spark_submit,
        "--driver-java-options",
        f"-Dlog4j2.configurationFile=file:{log4j}",
        str(ROOT / "jobs" / "stream_score.py"),
        "--config",
        args.config,
        "--bootstrap-servers",
        bootstrap,
        "--checkpoint",
        str(checkpoint),
        "--duration",
        str(args.seconds),
    ]
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    print(
        f"[sparkscore] producing ~{args.rate:g} events/s to 'events'; running the stream job for {args.seconds:g} s",
        flush=True,
    )
    producer.start()
    watcher.start()
    try:
        code = subprocess.call(cmd, cwd=ROOT, env=env)
    finally:
        stop.set()
        watcher.join(5)
        producer.join(5)
    conf = {"bootstrap.servers": bootstrap}
    offsets = kc.Offsets(conf, latest_by=kc.FETCH_PROBE, timeout_s=10)
    known = offsets.partitions()
    for topic in ("events", "predictions", "events.dlq", "prediction-stats"):
        tps = [(topic, q) for q in known.get(topic, [])]
        print(f"[sparkscore] {topic}: {sum(offsets.latest(tps).values()):,} records", flush=True)
    offsets.close()
    if broker is not None:
        broker.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
