"""Peer for the real-time benchmark: FastAPI with an ``async`` endpoint calling the model per request.

    MODEL=build/demo/ctr.pt uvicorn bench.peers.fastapi_async:app --loop uvloop --http httptools

The other common FastAPI recipe (next to the sync one in ``bench/fastapi_baseline.py``): an async
endpoint, no thread pool hop, the model called inline on the event loop, one row per call.
"""

from __future__ import annotations

import os

import torch
from fastapi import FastAPI
from pydantic import BaseModel

torch.set_num_threads(1)
MODEL = torch.jit.load(os.environ.get("MODEL", "build/demo/ctr.pt"), map_location="cpu").eval()

app = FastAPI()


class PredictRequest(BaseModel):
    user_id: int | str | None = None
    item_id: int | str | None = None
    features: list[float]


@app.get("/health")
async def health() -> dict[str, bool]:
    return {"ready": True}


@app.post("/predict")
async def predict(req: PredictRequest) -> dict[str, float | str]:
    with torch.inference_mode():
        score = MODEL(torch.tensor([req.features], dtype=torch.float32))
    return {"score": float(score.reshape(-1)[0]), "model_version": "fastapi-async"}
