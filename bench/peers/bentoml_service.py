"""Peer for the real-time benchmark: BentoML with adaptive batching (runs in build/peers-venv).

    MODEL=build/demo/ctr.pt build/peers-venv/bin/bentoml serve bench.peers.bentoml_service:Scorer \
        --host 127.0.0.1 --port 3000

One worker holding the TorchScript model; a batchable API (max batch 64). A request carries one
row as a batch of one: ``{"features": [[age, purchase_count, price, category_id]]}``; the adaptive
batcher merges concurrent requests.
"""

from __future__ import annotations

import os

import bentoml
import numpy as np
import torch


@bentoml.service(workers=1, traffic={"timeout": 30})
class Scorer:
    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.model = torch.jit.load(os.environ["MODEL"], map_location="cpu").eval()

    @bentoml.api(batchable=True, max_batch_size=64, max_latency_ms=1000)
    def predict(self, features: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model(torch.from_numpy(features.astype(np.float32))).reshape(-1).numpy()
