"""[reload] follow = "models:/demo_ctr@champion": the scorer polls a real local MLflow registry and
swaps in the version an alias moves to, with no failed request; an outage or a broken version keeps
the current version serving, visibly."""

from __future__ import annotations

import shutil
import threading

import httpx
import pytest
import torch

from serving.config import CandidateConfig
from tests.serving.conftest import wait_until
from udfs import demo, mlflow_demo, model_cache, model_store
from udfs.spec import ModelSpec, resolve

ROW = [31.0, 4.0, 19.5, 7.0]
INDEX = "/v2/repository/index"


class TwoOutputs(torch.nn.Module):
    """Two values per row where the config says one score: a version that fails its load check."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :1], x[:, 1:2]], dim=1)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """demo_ctr v1, v2 (other weights) and v3 (broken), logged once for the module."""
    root = tmp_path_factory.mktemp("mlflow")
    return {
        "root": root,
        "uri": mlflow_demo.registry_uri(root),
        "v1": mlflow_demo.log_pytorch(demo.ctr_module(0), root, alias="champion"),
        "v2": mlflow_demo.log_pytorch(demo.ctr_module(1), root, alias="challenger"),
        "v3": mlflow_demo.log_pytorch(TwoOutputs(), root, alias=None),
    }


@pytest.fixture
def registry(store):
    """The module's registry with @champion on v1 and @challenger on v2 again, and cold caches."""
    mlflow_demo.set_alias(store["root"], "demo_ctr", "champion", store["v1"])
    mlflow_demo.set_alias(store["root"], "demo_ctr", "challenger", store["v2"])
    model_store.forget()
    model_cache.clear()
    yield store
    model_store.forget()
    model_cache.clear()


def spec(registry, path: str) -> ModelSpec:
    return ModelSpec(
        path=path,
        input_columns=demo.CTR_FEATURES,
        name="demo_ctr",
        device="cpu",
        registry_uri=registry["uri"],
        cache_dir=str(registry["root"] / "cache"),
    )


def version(srv) -> str:
    return srv.post("/predict", {"features": ROW}).json()["model_version"]


def test_moving_the_alias_swaps_the_new_version_in_with_no_failed_request(serve, registry):
    model = resolve(spec(registry, "models:/demo_ctr@champion"))
    srv = serve(model=model, reload={"follow": "models:/demo_ctr@champion", "poll_s": 0.05})
    assert version(srv).startswith("1+")
    stop = threading.Event()
    answers: list[tuple[int, str | None]] = []

    def load(k: int) -> None:
        with httpx.Client(timeout=30) as client:
            i = 0
            while not stop.is_set():
                i += 1
                resp = client.post(
                    srv.url + "/predict", json={"features": [20.0 + i % 50, float(k), 10.0, 1.0]}
                )
                answers.append((resp.status_code, resp.json().get("model_version")))

    threads = [threading.Thread(target=load, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(answers) > 20, "traffic before the move")
        mlflow_demo.set_alias(registry["root"], "demo_ctr", "champion", registry["v2"])
        wait_until(lambda: version(srv).startswith("2+"), "the scorer to follow the alias")
        seen = len(answers)
        wait_until(lambda: len(answers) > seen + 20, "traffic after the move")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert {status for status, _ in answers} == {200}
    assert {v.split("+")[0] for _, v in answers} == {"1", "2"}
    assert srv.metric("sparkscore_registry_polls_total", outcome="moved") == 1
    assert srv.post(INDEX).json()[0]["version"].startswith("2+")


def test_a_registry_outage_keeps_the_current_version_serving_and_is_counted(serve, registry, tmp_path):
    model = resolve(spec(registry, "models:/demo_ctr@champion"))
    srv = serve(model=model, reload={"follow": "models:/demo_ctr@champion", "poll_s": 0.05})
    db = registry["root"] / "mlflow.db"
    shutil.move(db, tmp_path / "away.db")
    try:
        wait_until(
            lambda: srv.metric("sparkscore_registry_polls_total", outcome="unreachable") >= 3, "failed polls"
        )
        assert version(srv).startswith("1+")
    finally:
        shutil.move(tmp_path / "away.db", db)
    # Back: the next move is followed.
    mlflow_demo.set_alias(registry["root"], "demo_ctr", "champion", registry["v2"])
    wait_until(lambda: version(srv).startswith("2+"), "the scorer to follow the alias after the outage")


def test_a_version_that_fails_its_load_check_is_not_swapped_in_and_says_why(serve, registry):
    model = resolve(spec(registry, "models:/demo_ctr@champion"))
    srv = serve(model=model, reload={"follow": "models:/demo_ctr@champion", "poll_s": 0.05})
    mlflow_demo.set_alias(registry["root"], "demo_ctr", "champion", registry["v3"])
    wait_until(lambda: srv.metric("sparkscore_model_loads_total", result="failure") == 1, "the failed load")
    entry = srv.post(INDEX).json()[0]
    assert entry["version"].startswith("1+") and "returns 2 values per row" in entry["reason"]
    assert version(srv).startswith("1+")
    # Not retried on every poll: one failure until the alias moves again.
    polls = srv.metric("sparkscore_registry_polls_total", outcome="same")
    wait_until(
        lambda: srv.metric("sparkscore_registry_polls_total", outcome="same") > polls + 5, "more polls"
    )
    assert srv.metric("sparkscore_model_loads_total", result="failure") == 1
    mlflow_demo.set_alias(registry["root"], "demo_ctr", "champion", registry["v2"])
    wait_until(lambda: version(srv).startswith("2+"), "the next move to be followed")


def test_a_canary_candidate_may_be_a_registry_alias(serve, registry):
    model = resolve(spec(registry, "models:/demo_ctr@champion"))
    cand = CandidateConfig(model=spec(registry, "models:/demo_ctr@challenger"), traffic=1.0)
    srv = serve(model=model, candidate=cand)
    wait_until(lambda: version(srv).startswith("2+"), "the canary to answer")


@pytest.mark.slow
def test_with_two_workers_the_moved_alias_is_rolled_out_to_both(registry, tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from tests.serving.conftest import free_port
    from tests.serving.test_workers import samples

    root = Path(__file__).resolve().parents[2]
    port = free_port()
    cfg = tmp_path / "serve.toml"
    cfg.write_text(
        f"""
[model]
path = "models:/demo_ctr@champion"
registry_uri = "{registry["uri"]}"
cache_dir = "{registry["root"] / "cache"}"
name = "demo_ctr"
input_columns = {list(demo.CTR_FEATURES)!r}
device = "cpu"

[server]
port = {port}
workers = 2

[reload]
follow = "models:/demo_ctr@champion"
poll_s = 0.1
""".replace("'", '"')
    )
    proc = subprocess.Popen([sys.executable, "-m", "serving", "--config", str(cfg)], cwd=root)
    url = f"http://127.0.0.1:{port}"

    def both_ready() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"the supervisor exited with {proc.returncode}")
        try:
            return samples(url, "sparkscore_ready") == {"0": 1.0, "1": 1.0}
        except httpx.TransportError:
            return False

    def versions() -> dict[str, str]:
        return httpx.get(url + "/v2/models/demo_ctr", timeout=20).json()["parameters"]["workers"]

    try:
        wait_until(both_ready, "both workers to be ready", timeout=120)
        assert {v.split("+")[0] for v in versions().values()} == {"1"}
        mlflow_demo.set_alias(registry["root"], "demo_ctr", "champion", registry["v2"])
        wait_until(
            lambda: {v.split("+")[0] for v in versions().values()} == {"2"} and len(versions()) == 2,
            "both workers to serve version 2",
            timeout=120,
        )
        # One worker polls the registry; the other got the version through the rollout.
        polls = samples(url, "sparkscore_registry_polls_total")
        assert set(polls) == {"0"}
        for i in range(10):
            resp = httpx.post(url + "/predict", json={"features": [20.0 + i, 1.0, 2.0, 3.0]}, timeout=20)
            assert resp.json()["model_version"].startswith("2+")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0
