"""[reload] follow = "models:/demo_ctr@champion": the scorer polls a real local MLflow registry and
swaps in the version an alias moves to, with no failed request; an outage or a broken version keeps
the current version serving, visibly."""

from __future__ import annotations

import shutil
import threading
import zlib

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
    srv = serve(
        model=model,
        candidate=follow_candidate(registry, traffic=0.5),
        reload={"follow": "models:/demo_ctr@champion", "poll_s": 0.05},
    )
    db = registry["root"] / "mlflow.db"
    shutil.move(db, tmp_path / "away.db")
    try:
        for role in ("primary", "candidate"):
            wait_until(
                lambda role=role: (
                    srv.metric("sparkscore_registry_polls_total", role=role, outcome="unreachable") >= 3
                ),
                f"failed polls for the {role}",
            )
            assert srv.metric("sparkscore_registry_follow_ok", role=role) == 0
        assert answered_by(srv, PRIMARY_USERS[0]).startswith("1+")
        assert answered_by(srv, CANARY_USERS[0]).startswith("2+")
        assert "cannot poll models:/demo_ctr@challenger" in srv.post(INDEX).json()[1]["reason"]
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


CANARY_USERS = [u for u in (f"user-{i}" for i in range(40)) if zlib.crc32(u.encode()) / 2**32 < 0.5]
PRIMARY_USERS = [u for u in (f"user-{i}" for i in range(40)) if u not in CANARY_USERS]


def answered_by(srv, user: str) -> str:
    return srv.post("/predict", {"user_id": user, "features": ROW}).json()["model_version"]


def follow_candidate(registry, **options) -> CandidateConfig:
    follow = "models:/demo_ctr@challenger"
    return CandidateConfig(model=spec(registry, follow), follow=follow, **options)


def test_moving_challenger_swaps_the_canary_while_champion_stays_with_no_failed_request(serve, registry):
    model = resolve(spec(registry, "models:/demo_ctr@champion"))
    srv = serve(
        model=model,
        candidate=follow_candidate(registry, traffic=0.5),
        reload={"follow": "models:/demo_ctr@champion", "poll_s": 0.05},
    )
    canary, primary = CANARY_USERS[0], PRIMARY_USERS[0]
    assert answered_by(srv, canary).startswith("2+") and answered_by(srv, primary).startswith("1+")
    stop = threading.Event()
    answers: list[tuple[str, int, str | None]] = []

    def load(k: int) -> None:
        with httpx.Client(timeout=30) as client:
            i = 0
            while not stop.is_set():
                i += 1
                user = (CANARY_USERS + PRIMARY_USERS)[(i * 7 + k) % 40]
                resp = client.post(
                    srv.url + "/predict",
                    json={"user_id": user, "features": [20.0 + i % 50, float(k), 10.0, 1.0]},
                )
                answers.append((user, resp.status_code, resp.json().get("model_version")))

    threads = [threading.Thread(target=load, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(answers) > 20, "traffic before the move")
        # @challenger onto the version @champion points at: the canary then serves that version too.
        mlflow_demo.set_alias(registry["root"], "demo_ctr", "challenger", registry["v1"])
        wait_until(lambda: answered_by(srv, canary).startswith("1+"), "the canary to follow @challenger")
        seen = len(answers)
        wait_until(lambda: len(answers) > seen + 20, "traffic after the move")
        # Deleted: the canary keeps its version, and the index, the metadata and a gauge say why.
        mlflow_demo.delete_alias(registry["root"], "demo_ctr", "challenger")
        wait_until(
            lambda: srv.metric("sparkscore_registry_polls_total", role="candidate", outcome="missing") >= 2,
            "polls that miss the alias",
        )
        assert srv.metric("sparkscore_registry_follow_ok", role="candidate") == 0
        assert srv.metric("sparkscore_registry_follow_ok", role="primary") == 1
        seen = len(answers)
        wait_until(lambda: len(answers) > seen + 20, "traffic without the alias")
        assert srv.get("/v2/health/ready").status_code == 200
        index = srv.post(INDEX).json()
        assert index[1]["version"].startswith("1+") and "not set in the registry" in index[1]["reason"]
        assert "reason" not in index[0]
        meta = srv.get("/v2/models/demo_ctr").json()["parameters"]["candidate"]
        assert meta["role"] == "canary" and "not set in the registry" in meta["reason"]
        # Set again: followed again.
        mlflow_demo.set_alias(registry["root"], "demo_ctr", "challenger", registry["v2"])
        wait_until(
            lambda: answered_by(srv, canary).startswith("2+"), "the canary to follow @challenger again"
        )
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert {status for _, status, _ in answers} == {200}
    by_canary = {v.split("+")[0] for u, _, v in answers if u in CANARY_USERS}
    assert by_canary >= {"1", "2"}
    assert {v.split("+")[0] for u, _, v in answers if u in PRIMARY_USERS} == {"1"}
    assert srv.metric("sparkscore_registry_polls_total", role="candidate", outcome="moved") == 2
    assert srv.metric("sparkscore_registry_polls_total", role="primary", outcome="moved") == 0
    assert srv.metric("sparkscore_registry_follow_ok", role="candidate") == 1
    index = srv.post(INDEX).json()
    assert index[0]["version"].startswith("1+") and index[1]["version"].startswith("2+")
    assert srv.metric("sparkscore_model_version_info", role="canary", version=index[1]["version"]) == 1
    assert srv.metric("sparkscore_model_version_info", role="primary", version=index[0]["version"]) == 1


def test_a_followed_shadow_compares_the_new_version_and_a_broken_one_is_not_swapped_in(serve, registry):
    model = resolve(spec(registry, "models:/demo_ctr@champion"))
    srv = serve(
        model=model,
        candidate=follow_candidate(registry, shadow=True),
        reload={"follow": "models:/demo_ctr@champion", "poll_s": 0.05},
        cache={"enabled": False},
    )

    def shadow_version() -> str:
        return srv.get("/v2/models/demo_ctr").json()["parameters"]["candidate"]["version"]

    assert shadow_version().startswith("2+")
    mlflow_demo.set_alias(registry["root"], "demo_ctr", "challenger", registry["v1"])
    wait_until(lambda: shadow_version().startswith("1+"), "the shadow to follow @challenger")
    new = shadow_version()
    for i in range(10):
        assert version(srv).startswith("1+")
        srv.post("/predict", {"features": [20.0 + i, 1.0, 2.0, 3.0]})
    wait_until(
        lambda: srv.metric("sparkscore_shadow_rows_compared_total", candidate=new) >= 10, "comparisons"
    )
    # The shadow now runs the primary's own version: no difference at all.
    assert srv.metric("sparkscore_shadow_abs_diff_sum", candidate=new) == 0
    mlflow_demo.set_alias(registry["root"], "demo_ctr", "challenger", registry["v3"])
    wait_until(lambda: srv.metric("sparkscore_model_loads_total", result="failure") == 1, "the failed load")
    assert shadow_version() == new
    assert "returns 2 values per row" in srv.post(INDEX).json()[1]["reason"]


def test_a_worker_started_while_challenger_is_deleted_serves_without_the_canary_until_it_is_set(
    serve, registry
):
    model = resolve(spec(registry, "models:/demo_ctr@champion"))
    mlflow_demo.delete_alias(registry["root"], "demo_ctr", "challenger")
    srv = serve(
        model=model,
        candidate=follow_candidate(registry, traffic=0.5),
        reload={"follow": "models:/demo_ctr@champion", "poll_s": 0.05},
    )
    assert answered_by(srv, CANARY_USERS[0]).startswith("1+")
    wait_until(
        lambda: srv.metric("sparkscore_registry_polls_total", role="candidate", outcome="missing") >= 1,
        "a poll that misses the alias",
    )
    entry = srv.post(INDEX).json()[1]
    assert entry["state"] == "UNAVAILABLE" and "no candidate is loaded yet" in entry["reason"]
    mlflow_demo.set_alias(registry["root"], "demo_ctr", "challenger", registry["v2"])
    wait_until(lambda: answered_by(srv, CANARY_USERS[0]).startswith("2+"), "the canary to arrive")
    assert srv.post(INDEX).json()[1]["state"] == "READY"


@pytest.mark.slow
def test_with_two_workers_both_moved_aliases_are_rolled_out_to_both(registry, tmp_path):
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

[candidate]
follow = "models:/demo_ctr@challenger"
traffic = 0.5
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
        """Each worker's primary and canary version numbers: {"0": "1/2", ...}."""
        params = httpx.get(url + "/v2/models/demo_ctr", timeout=20).json()["parameters"]
        cands = params["candidate"]["workers"]
        return {
            w: f"{v.split('+')[0]}/{cands.get(w, '').split('+')[0]}" for w, v in params["workers"].items()
        }

    try:
        wait_until(both_ready, "both workers to be ready", timeout=240)
        assert versions() == {"0": "1/2", "1": "1/2"}
        # Both aliases move: champion to v2, challenger to v1.
        mlflow_demo.set_alias(registry["root"], "demo_ctr", "champion", registry["v2"])
        mlflow_demo.set_alias(registry["root"], "demo_ctr", "challenger", registry["v1"])
        wait_until(
            lambda: versions() == {"0": "2/1", "1": "2/1"},
            "both workers to serve 2 and canary 1",
            timeout=120,
        )
        # One worker polls the registry; the other got the versions through the rollout.
        polls = samples(url, "sparkscore_registry_polls_total")
        assert set(polls) == {"0"}
        info = [
            line
            for line in httpx.get(url + "/metrics", timeout=20).text.splitlines()
            if line.startswith("sparkscore_model_version_info{") and 'role="canary"' in line
        ]
        assert sorted('worker="0"' in line for line in info) == [False, True]
        assert all('version="1+' in line for line in info)
        for i, user in enumerate([*CANARY_USERS[:5], *PRIMARY_USERS[:5]]):
            body = {"user_id": user, "features": [20.0 + i, 1.0, 2.0, 3.0]}
            resp = httpx.post(url + "/predict", json=body, timeout=20)
            assert resp.json()["model_version"].startswith("1+" if user in CANARY_USERS else "2+")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0


def test_the_rollout_state_remembers_the_primary_and_the_candidate_for_a_restarted_worker(tmp_path):
    from serving.workers import Peers

    peers = Peers(str(tmp_path), 0)
    peers.write_state({"path": "models:/demo_ctr/2"}, "2+a")
    peers.write_state({"path": "models:/demo_ctr/1"}, "1+b", "candidate")
    peers.write_state({"path": "models:/demo_ctr/3"}, "3+c")
    assert peers.read_state() == {
        "params": {"path": "models:/demo_ctr/3"},
        "version": "3+c",
        "candidate": {"params": {"path": "models:/demo_ctr/1"}, "version": "1+b"},
    }


def test_a_poll_asks_the_registry_once_for_both_aliases_and_a_deleted_one_is_none(registry, monkeypatch):
    from mlflow import MlflowClient

    calls: list[str] = []
    for name in [n for n in vars(MlflowClient) if not n.startswith("_") and callable(vars(MlflowClient)[n])]:
        real = vars(MlflowClient)[name]

        def counted(self, *args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(MlflowClient, name, counted)
    both = ["models:/demo_ctr@champion", "models:/demo_ctr@challenger"]
    found = model_store.peek_all(both, registry["uri"])
    assert found == {both[0]: (str(registry["v1"]), ""), both[1]: (str(registry["v2"]), "")}
    assert calls == ["get_registered_model"]
    mlflow_demo.delete_alias(registry["root"], "demo_ctr", "challenger")
    assert model_store.peek_all(both, registry["uri"])[both[1]] is None
