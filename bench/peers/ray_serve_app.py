"""Peer for the real-time benchmark: Ray Serve with ``@serve.batch`` (runs in build/peers-venv).

    build/peers-venv/bin/python bench/peers/ray_serve_app.py --model build/demo/ctr.pt --port 8000

One replica holding the TorchScript model; ``@serve.batch(max_batch_size=64,
batch_wait_timeout_s=0.002)`` (the scorer's max_wait_ms), ``max_ongoing_requests`` high enough
for batches to fill. Ray runs on the CPUs this process may use (the bench pins it). Runs until killed.
"""

from __future__ import annotations

import argparse
import os
import signal
import time

import ray
import torch
from ray import serve
from starlette.requests import Request


@serve.deployment(
    num_replicas=1,
    max_ongoing_requests=256,
    ray_actor_options={"num_cpus": 1},
    logging_config={"enable_access_log": False},  # Ray Serve's advice for throughput: no access log
)
class Scorer:
    def __init__(self, path: str) -> None:
        torch.set_num_threads(1)
        self.model = torch.jit.load(path, map_location="cpu").eval()

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def predict(self, rows: list[list[float]]) -> list[float]:
        with torch.inference_mode():
            return self.model(torch.tensor(rows, dtype=torch.float32)).reshape(-1).tolist()

    async def __call__(self, request: Request) -> dict[str, float | str]:
        if request.method == "GET":
            return {"ready": True}
        body = await request.json()
        return {"score": await self.predict(body["features"]), "model_version": "ray-serve"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    cpus = len(os.sched_getaffinity(0))
    ray.init(
        num_cpus=max(cpus, 1),
        include_dashboard=False,
        object_store_memory=100 * 1024 * 1024,
        log_to_driver=False,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(Scorer.bind(os.path.abspath(args.model)), route_prefix="/predict", name="scorer")
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    while not stop:
        time.sleep(0.5)
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
