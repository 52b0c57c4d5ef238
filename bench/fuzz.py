"""Property-based HTTP fuzzing of the real-time scorer: hypothesis-generated requests against a real server.

Every generated request (any method, known and unknown paths, /predict and KServe v2 bodies with
hostile values: NaN, 1e400, huge and negative shapes, wrong datatypes, binary tails with lying
lengths, deep nesting, raw bytes, wrong tokens) must get an answer that is not a 5xx, within its
deadline plus one second, and the server must be ready and scoring afterwards.

``tests/serving/test_fuzz.py`` runs a bounded number of cases in ``make test``; ``make fuzz`` runs
a long campaign against ``python -m serving`` (2 workers) and writes ``bench/results/fuzz.json``::

    python bench/fuzz.py [--examples 20000] [--seconds 600]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FEATURES = ["age", "purchase_count", "price", "category_id"]
TOKEN = "fuzz-token"
DEFAULT_TIMEOUT_MS = 3000.0
MAX_TIMEOUT_MS = 5000.0
BOUND_S = MAX_TIMEOUT_MS / 1000 + 1.0  # no answer may take longer than the longest deadline plus 1 s


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def describe(self) -> str:
        return f"{self.method} {self.path} headers={self.headers} body={self.body[:300]!r}"


# -- strategies ---------------------------------------------------------------------------

numbers = (
    st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, 1, -1, 1e308, -1e308, 3.4e38, 1e-320])
)
scalars = st.none() | st.booleans() | numbers | st.text(max_size=8)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)
# Deadlines a request may ask for: generous valid ones (no legitimate 504 on a busy machine) or invalid.
timeouts = st.floats(2000, MAX_TIMEOUT_MS) | st.sampled_from([0, -1, 1e9, math.nan, math.inf, "1"])
ids = st.none() | st.integers(-5, 10**20) | st.text(max_size=10)
feature_values = (
    st.lists(numbers | st.none(), min_size=4, max_size=4)
    | st.lists(scalars, max_size=6)
    | st.dictionaries(st.sampled_from([*FEATURES, "x"]), numbers | st.none() | st.lists(numbers, max_size=2))
    | json_values
)
instance = st.fixed_dictionaries(
    {},
    optional={
        "user_id": ids,
        "item_id": ids,
        "features": feature_values,
        "context": st.dictionaries(st.sampled_from([*FEATURES, "y"]), numbers | st.none(), max_size=3)
        | json_values,
        "timeout_ms": timeouts,
        "surprise": json_values,
    },
)
finite = st.floats(-1e6, 1e6)
valid_instance = st.fixed_dictionaries(
    {"features": st.lists(finite, min_size=4, max_size=4)},
    optional={"user_id": ids, "timeout_ms": st.floats(2000, MAX_TIMEOUT_MS)},
)
predict_bodies = (
    valid_instance
    | st.lists(valid_instance, min_size=1, max_size=8)
    | instance
    | st.lists(instance, max_size=6)
    | st.fixed_dictionaries({"instances": st.lists(instance, max_size=6)}, optional={"timeout_ms": timeouts})
    | json_values
)
dims = st.integers(-3, 6) | st.sampled_from(
    [0, 1024, 1025, 2**31, 2**32, 2**62, 2**63, 2**64, 10**10, 10**30]
)
tensor_data = st.lists(numbers | st.none() | st.lists(numbers, max_size=5) | st.text(max_size=3), max_size=10)
tensor = st.fixed_dictionaries(
    {
        "name": st.sampled_from([*FEATURES, "input__0", "features", "x"]),
        "shape": st.lists(dims, max_size=4),
        "datatype": st.sampled_from(["FP32", "FP64", "FP16", "INT64", "INT32", "BOOL", "BYTES", "nope"]),
    },
    optional={
        "data": tensor_data | json_values,
        "parameters": st.fixed_dictionaries(
            {}, optional={"binary_data_size": st.integers(-5, 2**65) | st.text(max_size=3)}
        ),
    },
)
valid_v2 = st.integers(1, 8).flatmap(
    lambda n: st.lists(finite, min_size=4 * n, max_size=4 * n).map(
        lambda flat: {
            "inputs": [{"name": "input__0", "shape": [len(flat) // 4, 4], "datatype": "FP32", "data": flat}]
        }
    )
)
v2_bodies = valid_v2 | st.fixed_dictionaries(
    {"inputs": st.lists(tensor, max_size=5)},
    optional={
        "id": st.text(max_size=6) | st.integers(),
        "parameters": st.fixed_dictionaries(
            {},
            optional={"timeout_ms": timeouts, "binary_data_output": json_values, "user_id": ids},
        ),
        "outputs": st.lists(
            st.fixed_dictionaries(
                {"name": st.sampled_from(["score", "x"])},
                optional={"parameters": st.fixed_dictionaries({}, optional={"binary_data": json_values})},
            ),
            max_size=2,
        ),
    },
)
load_bodies = st.fixed_dictionaries(
    {},
    optional={
        "parameters": st.dictionaries(
            st.sampled_from(["path", "version", "x"]),
            st.sampled_from(["/etc/passwd", "../x.pt", "missing.pt", "s3://b/k", "models:/m/1", ""])
            | st.text(max_size=8),
            max_size=3,
        )
    },
)
KNOWN_PATHS = [
    "/v2/models/demo_ctr/versions/VERSION/infer",
    "/v2/models/demo_ctr/versions/nope/infer",
    "/v2/models/other/infer",
    "/v2/models/demo_ctr",
    "/v2/models/demo_ctr/ready",
    "/v2/health/ready",
    "/v2/health/live",
    "/v2",
    "/metrics",
    "/v2/repository/index",
    "/v2/repository/models/demo_ctr/load",
    "/v2/repository/models/demo_ctr/unload",
]
# Mostly the two scoring routes, then every other route, now and then any path at all.
paths = st.integers(0, 19).flatmap(
    lambda k: (
        st.just("/predict")
        if k < 8
        else st.just("/v2/models/demo_ctr/infer")
        if k < 15
        else st.sampled_from(KNOWN_PATHS)
        if k < 19
        else st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/_-.%", max_size=30).map(lambda p: "/" + p)
    )
)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


@st.composite
def requests(draw: st.DrawFn, version: str = "VERSION") -> Request:
    path = draw(paths).replace("VERSION", version)
    method = draw(st.sampled_from(["POST"] * 12 + ["GET"] * 2 + ["PUT", "DELETE", "PATCH", "HEAD"]))
    if path.endswith("/infer"):
        value: Any = draw(v2_bodies | json_values)
    elif path.endswith("/load"):
        value = draw(load_bodies | json_values)
    else:
        value = draw(predict_bodies)
    body = _dumps(value)
    mutation = draw(st.sampled_from(["none"] * 12 + ["truncate", "bytes", "deep", "tail", "empty", "1e400"]))
    if mutation == "truncate" and body:
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif mutation == "bytes":
        body = draw(st.binary(max_size=200))
    elif mutation == "deep":
        depth = draw(st.integers(60, 3000))
        body = b'{"features": ' + b"[" * depth + b"1" + b"]" * depth + b"}"
    elif mutation == "tail":
        body += draw(st.binary(max_size=64))
    elif mutation == "empty":
        body = b""
    elif mutation == "1e400":
        body = body.replace(b"1.0", b"1e400", 1) if b"1.0" in body else b'{"features": [1, 2, 1e400, 4]}'
    headers = {"content-type": draw(st.sampled_from(["application/json", "text/plain", "application/x-y"]))}
    auth = draw(st.sampled_from(["good"] * 16 + ["none", "wrong", "scheme"]))
    if auth == "good":
        headers["authorization"] = f"Bearer {TOKEN}"
    elif auth == "wrong":
        headers["authorization"] = "Bearer nope"
    elif auth == "scheme":
        headers["authorization"] = f"Basic {TOKEN}"
    if path.endswith("/infer") and draw(st.booleans()):
        headers["inference-header-content-length"] = str(
            draw(st.integers(-5, len(body) + 5) | st.sampled_from([2**64, 0]))
        )
    return Request(method, path, headers, body)


# -- checks -------------------------------------------------------------------------------


def send(client: httpx.Client, url: str, req: Request) -> tuple[int | None, float, str]:
    """(status or None, seconds, problem or "") for one request."""
    start = time.monotonic()
    try:
        resp = client.request(req.method, url + req.path, headers=req.headers, content=req.body)
    except httpx.TimeoutException:
        return None, time.monotonic() - start, f"no answer within {BOUND_S:g} s"
    except httpx.TransportError as exc:
        return None, time.monotonic() - start, f"transport error: {type(exc).__name__}: {exc}"
    elapsed = time.monotonic() - start
    if resp.status_code >= 500:
        return resp.status_code, elapsed, f"{resp.status_code}: {resp.text[:300]}"
    if elapsed > BOUND_S:
        return resp.status_code, elapsed, f"answered after {elapsed:.2f} s"
    return resp.status_code, elapsed, ""


def healthy(client: httpx.Client, url: str) -> str:
    """ "" when the server is ready and scores a valid request, else what is wrong."""
    ready = client.get(url + "/v2/health/ready")
    if ready.status_code != 200:
        return f"readiness {ready.status_code} after fuzzing"
    ok = client.post(
        url + "/predict",
        json={"features": [31.0, 4.0, 19.5, 7.0]},
        headers={"authorization": f"Bearer {TOKEN}"},
    )
    if ok.status_code != 200:
        return f"a valid request got {ok.status_code} after fuzzing: {ok.text[:200]}"
    return ""


def campaign(url: str, version: str, examples: int, seconds: float | None = None) -> dict[str, Any]:
    """Run ``examples`` generated requests (or until ``seconds``); every problem is recorded."""
    statuses: Counter[str] = Counter()
    problems: list[dict[str, Any]] = []
    slowest = 0.0
    end = None if seconds is None else time.monotonic() + seconds
    sent = 0

    with httpx.Client(timeout=BOUND_S) as client:

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(requests(version))
        def one(req: Request) -> None:
            nonlocal slowest, sent
            if end is not None and time.monotonic() > end:
                return
            status, elapsed, problem = send(client, url, req)
            sent += 1
            slowest = max(slowest, elapsed)
            statuses[str(status)] += 1
            if problem and len(problems) < 50:
                problems.append({"problem": problem, "request": req.describe()})

        one()
        after = healthy(client, url)
    return {
        "requests": sent,
        "by_status": dict(sorted(statuses.items())),
        "slowest_s": round(slowest, 3),
        "bound_s": BOUND_S,
        "problems": problems,
        "healthy_after": after or "yes",
    }


# -- make fuzz ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from bench.common import RESULTS
    from tests.serving.conftest import free_port

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=20_000)
    p.add_argument("--seconds", type=float, default=600.0, help="stop generating after this long")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "fuzz.json"))
    args = p.parse_args(argv)

    port = free_port()
    conf = Path(os.environ.get("TMPDIR", "/tmp")) / f"fuzz-{port}.toml"
    conf.write_text(
        (ROOT / "conf" / "serve.toml")
        .read_text()
        .replace('auth_token_env = ""', 'auth_token_env = "SPARKSCORE_FUZZ_TOKEN"')
        .replace("default_timeout_ms = 1000", f"default_timeout_ms = {DEFAULT_TIMEOUT_MS:g}")
        .replace("max_timeout_ms = 60000", f"max_timeout_ms = {MAX_TIMEOUT_MS:g}")
    )
    env = {**os.environ, "SPARKSCORE_FUZZ_TOKEN": TOKEN}
    cmd = [sys.executable, "-m", "serving", "--config", str(conf), "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--workers", str(args.workers)], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    try:
        while time.monotonic() - started < 120:
            try:
                if httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        meta = httpx.get(url + "/v2/models/demo_ctr", headers={"authorization": f"Bearer {TOKEN}"}).json()
        result = campaign(url, meta["versions"][0], args.examples, args.seconds)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        conf.unlink(missing_ok=True)
    result.update(
        {
            "workers": args.workers,
            "seconds": round(time.monotonic() - started, 1),
            "exit_code_after_sigterm": code,
            "loadavg": os.getloadavg(),
        }
    )
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "problems"}, indent=2))
    print(f"{len(result['problems'])} problem(s); written to {args.out}")
    return 1 if result["problems"] or result["healthy_after"] != "yes" or code != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
