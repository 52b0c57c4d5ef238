"""Peer for the real-time benchmark: the pattern document's asyncio DynamicBatcher behind FastAPI.

    MODEL=build/demo/ctr.pt uvicorn bench.peers.seed_batcher:app --loop uvloop --http httptools

Written as a competent user would from the pattern's description: requests put (features, future)
on an asyncio.Queue; one background task takes the first, then gathers more until 32 are waiting or
10 ms have passed since the first, runs the model once on the batch in a worker thread (so the event
loop keeps accepting), and resolves every future.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import torch
from fastapi import FastAPI
from pydantic import BaseModel

torch.set_num_threads(1)
MODEL = torch.jit.load(os.environ.get("MODEL", "build/demo/ctr.pt"), map_location="cpu").eval()


class DynamicBatcher:
    def __init__(self, model: Any, max_batch_size: int = 32, max_wait_ms: float = 10.0) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.queue: asyncio.Queue[tuple[list[float], asyncio.Future[float]]] = asyncio.Queue()

    async def predict(self, features: list[float]) -> float:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        await self.queue.put((features, fut))
        return await fut

    def _infer(self, rows: list[list[float]]) -> list[float]:
        with torch.inference_mode():
            return self.model(torch.tensor(rows, dtype=torch.float32)).reshape(-1).tolist()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch_size:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                except TimeoutError:
                    break
            try:
                scores = await loop.run_in_executor(None, self._infer, [f for f, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the error
                for _, fut in batch:
                    fut.set_exception(exc)
                continue
            for (_, fut), score in zip(batch, scores, strict=True):
                if not fut.done():
                    fut.set_result(score)


batcher = DynamicBatcher(MODEL, max_batch_size=32, max_wait_ms=10.0)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    task = asyncio.create_task(batcher.run())
    yield
    task.cancel()


app = FastAPI(lifespan=lifespan)


class PredictRequest(BaseModel):
    user_id: int | str | None = None
    item_id: int | str | None = None
    features: list[float]


@app.get("/health")
async def health() -> dict[str, bool]:
    return {"ready": True}


@app.post("/predict")
async def predict(req: PredictRequest) -> dict[str, float | str]:
    return {"score": await batcher.predict(req.features), "model_version": "seed-batcher"}
