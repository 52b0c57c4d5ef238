"""The tutorial baseline for the real-time benchmark: FastAPI on uvicorn, the model run once per request.

    MODEL=build/demo/ctr.pt uvicorn bench.fastapi_baseline:app --port 8081 --loop uvloop --http httptools

This is the common "serve a PyTorch model with FastAPI" recipe: a pydantic
request model and a sync endpoint (FastAPI runs it in its thread pool) that
turns one request into a 1-row tensor and calls the model. Same TorchScript
file, same JSON request shape as ``POST /predict`` on the sparkscore scorer.
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
def health() -> dict[str, bool]:
    return {"ready": True}


@app.post("/predict")
def predict(req: PredictRequest) -> dict[str, float | str]:
    with torch.inference_mode():
        score = MODEL(torch.tensor([req.features], dtype=torch.float32))
    return {"score": float(score.reshape(-1)[0]), "model_version": "tutorial"}
