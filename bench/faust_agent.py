"""The Faust peer of the streaming benchmark: a ``faust-streaming`` agent doing consume -> score -> produce.

    build/faust-venv/bin/python bench/faust_agent.py --bootstrap HOST:PORT [--app NAME] [--web-port N]

Run from the separate venv that ``make bench-stream`` builds (``build/faust-venv``: Faust pins
click and aiohttp versions the project's own venv does not allow); a ``.pth`` file there
puts the project and its venv's packages (torch, pyarrow, ``udfs``) after Faust's own.

Configured as a Faust user would for throughput: raw bytes in and out (no Faust models),
``stream.take(5000, within=5 ms)`` batches scored with ``udfs.core.score_batch``, and
``send_soon`` for the predictions; one worker process per input partition, one consumer group.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IN, OUT, DLQ = "events", "predictions", "events.dlq"
DEMO_MODEL = ROOT / "build" / "demo" / "ctr.pt"


def make_app(bootstrap: str, name: str, web_port: int):  # type: ignore[no-untyped-def]
    import faust
    import pyarrow as pa

    from udfs.core import load_scorer, score_batch
    from udfs.spec import ModelSpec, resolve

    model = resolve(
        ModelSpec(
            path=str(DEMO_MODEL), input_columns=("features",), num_features=4, name="demo_ctr", device="cpu"
        )
    )
    scorer = load_scorer(model)
    app = faust.App(
        name,
        broker=f"kafka://{bootstrap}",
        value_serializer="raw",
        key_serializer="raw",
        topic_partitions=2,
        web_host="127.0.0.1",
        web_port=web_port,
        # Throughput settings a Faust user reaches for: a larger commit interval, no tables.
        broker_commit_interval=1.0,
        producer_linger_ms=5,
    )
    events = app.topic(IN, value_serializer="raw", key_serializer="raw")
    predictions = app.topic(OUT, value_serializer="raw", key_serializer="raw")
    dlq = app.topic(DLQ, value_serializer="raw", key_serializer="raw")

    @app.agent(events)
    async def score(stream):  # type: ignore[no-untyped-def]
        async for values in stream.take(5000, within=0.005):
            users, feats, stamps = [], [], []
            for raw in values:
                try:
                    e = json.loads(raw)
                    users.append(e["user_id"])
                    feats.append(e["features"])
                    stamps.append(e["timestamp"])
                except (ValueError, KeyError, TypeError):
                    dlq.send_soon(value=raw)
            if not users:
                continue
            table = pa.table({"features": pa.array(feats, pa.list_(pa.float64()))})
            out = score_batch(table, scorer).to_pydict()
            for user, pred, ts, err in zip(users, out["prediction"], stamps, out["error"], strict=True):
                key = user.encode()
                if err is not None:
                    dlq.send_soon(key=key, value=json.dumps({"user_id": user, "error": err}).encode())
                    continue
                body = {"user_id": user, "prediction": pred, "timestamp": ts, "model_version": model.version}
                predictions.send_soon(key=key, value=json.dumps(body).encode())

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--app", default="sparkscore-bench-faust")
    p.add_argument("--web-port", type=int, default=6066)
    args = p.parse_args(argv)
    app = make_app(args.bootstrap, args.app, args.web_port)
    sys.argv = [sys.argv[0], "worker", "--loglevel", "warn", "--web-port", str(args.web_port)]
    app.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
