"""Typed real-time benchmark (issue 17): KServe v2 multi-input requests for the DLRM-style example.

    flock /tmp/sparkscore-bench.lock .venv/bin/python bench/typed_realtime.py [--duration 5]

``sparkscore`` (``python -m serving`` with the example's ``[[model.inputs]]``, dynamic batching,
max_batch_size 64, max_wait_ms 2, cache off) against ``fastapi_async`` (bench/peers/fastapi_dlrm.py:
an async KServe v2 endpoint calling the model per request), both pinned to CPU 0 with the open-loop
load generator of bench/realtime_bench.py on CPU 1: distinct one-row requests (``dense`` FP32
[1, 13], ``sparse`` INT64 [1, 8]) on a Poisson schedule, latency from the scheduled send time.
``max_rps_p99_under_50ms`` per server, as realtime_bench.py's sweep finds it. Writes the ``dlrm``
key of bench/results/realtime.json (the other keys are kept), with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402
from bench.realtime_bench import Server, _free_port, sweep, uvicorn_cmd  # noqa: E402

WORK = ROOT / "build" / "bench" / "typed"
RATES = [200, 500, 1000, 2000, 3000, 4000, 6000, 8000, 11000, 14000]

SERVE = """
[model]
name = "dlrm"
path = "{model}"
device = "cpu"
{signature}

[server]
port = {port}
log_level = "warning"

[batcher]
max_batch_size = 64
max_wait_ms = 2.0
max_queue = 4096
default_timeout_ms = 1000
workers = 2

[cache]
enabled = false
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=common.RESULTS / "realtime.json")
    args = p.parse_args(argv)
    from udfs import examples

    model = examples.save("dlrm", examples.dlrm_module(), WORK / "models", ("torchscript",))["torchscript"]
    load_before = round(os.getloadavg()[0], 2)
    results = {}
    port = _free_port()
    cfg = WORK / "dlrm-serve.toml"
    cfg.write_text(SERVE.format(model=model, port=port, signature=examples.CONFIGS["dlrm"]))
    servers = [
        lambda: Server(
            "sparkscore", [sys.executable, "-m", "serving", "--config", str(cfg)], port, "/v2/health/ready"
        ),
        lambda: Server(
            "fastapi_async",
            uvicorn_cmd("bench.peers.fastapi_dlrm:app", (peer_port := _free_port())),
            peer_port,
            "/health",
            env={"MODEL": str(model)},
        ),
    ]
    for start in servers:
        server = start()
        try:
            results[server.name] = sweep(server, RATES, args.duration, body="dlrm_v2")
        finally:
            server.stop()
    out = json.loads(args.out.read_text()) if args.out.exists() else {}
    entry: dict[str, Any] = {
        name: {k: v for k, v in r.items() if k != "details"} for name, r in results.items()
    }
    a, b = entry["sparkscore"]["max_rps_p99_under_50ms"], entry["fastapi_async"]["max_rps_p99_under_50ms"]
    entry["ratio"] = round(a / b, 2) if b else None
    entry["target_ratio"] = 2.0
    entry["request"] = "KServe v2 JSON, dense FP32 [1, 13] + sparse INT64 [1, 8], distinct rows"
    entry["load_avg_1m_before"] = load_before
    entry["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    out["dlrm"] = entry
    common.write_json(args.out, out)
    print(json.dumps(entry, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
