"""Peer for the typed real-time benchmark: FastAPI, an ``async`` KServe v2 endpoint for the DLRM-style
example, the model called inline per request (the fastapi_async recipe, for two named inputs).

    MODEL=build/bench/typed/models/dlrm.pt uvicorn bench.peers.fastapi_dlrm:app --loop uvloop --http httptools
"""

from __future__ import annotations

import os

import torch
from fastapi import FastAPI
from pydantic import BaseModel

torch.set_num_threads(1)
MODEL = torch.jit.load(os.environ["MODEL"], map_location="cpu").eval()

app = FastAPI()


class Tensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[float]


class InferRequest(BaseModel):
    inputs: list[Tensor]


@app.get("/health")
async def health() -> dict[str, bool]:
    return {"ready": True}


@app.post("/v2/models/dlrm/infer")
async def infer(req: InferRequest) -> dict[str, object]:
    by_name = {t.name: t for t in req.inputs}
    dense, sparse = by_name["dense"], by_name["sparse"]
    with torch.inference_mode():
        y = MODEL(
            torch.tensor(dense.data, dtype=torch.float32).reshape(dense.shape),
            torch.tensor(sparse.data, dtype=torch.int64).reshape(sparse.shape),
        )
    return {
        "model_name": "dlrm",
        "outputs": [{"name": "ctr", "datatype": "FP64", "shape": [len(y)], "data": y.double().tolist()}],
    }
