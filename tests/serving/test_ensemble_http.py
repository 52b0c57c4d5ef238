"""Ensembles over HTTP: a member past its timeout or failing degrades the answer while the quorum
holds; below the quorum the request fails with a message naming the member."""

from __future__ import annotations

import math

import pytest
import torch

from serving.model import ModelRunner
from tests.serving.conftest import wait_until
from udfs.demo import CTR_FEATURES
from udfs.spec import MemberSpec, ModelSpec, ResolvedModel, resolve

ROW = [34.0, 2.0, 19.99, 4.0]


class Slow(torch.nn.Module):
    """Seconds of matrix products per call on a real row: far past the member timeout below.
    The all-zero warm-up rows return at once, so the server becomes ready quickly."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.eye(1024) * 0.5, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool((x != 0).any()):
            return x[:, :1]
        y = x.sum(dim=1, keepdim=True).expand(x.shape[0], 1024).contiguous()
        for _ in range(2000):
            y = y @ self.w
        return y[:, :1]


class FailsOnRealRows(torch.nn.Module):
    """Answers the warm-up's all-zero rows, raises on real ones: a member that breaks after start-up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x != 0).any()):
            raise RuntimeError("member exploded")
        return x[:, :1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("ens-http")
    out = {}
    for i in range(2):
        torch.manual_seed(20 + i)
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).eval()
        out[f"reg{i}"] = str(d / f"reg{i}.pt")
        torch.jit.save(torch.jit.script(net), out[f"reg{i}"])
    for name, module in (("slow", Slow()), ("broken", FailsOnRealRows())):
        out[name] = str(d / f"{name}.pt")
        torch.jit.save(torch.jit.script(module.eval()), out[name])
    return out


def ensemble(files: dict[str, str], names: list[str], **kw) -> ResolvedModel:
    return resolve(
        ModelSpec(
            input_columns=tuple(CTR_FEATURES),
            name="ens",
            members=tuple(MemberSpec(path=files[n], name=n, weight=1.0) for n in names),
            member_outputs=True,
            **kw,
        )
    )


def test_a_member_past_its_timeout_is_dropped_and_the_answer_says_degraded(serve, files):
    model = ensemble(files, ["reg0", "slow", "reg1"], quorum=2, member_timeout_ms=100)
    srv = serve(model=model, cache={"enabled": False}, batcher={"default_timeout_ms": 30_000.0})
    resp = srv.post("/predict", {"features": ROW})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["degraded"] is True
    assert body["missing_members"] == "slow"
    assert body["model_version"] == model.version
    # Weights renormalised over the two members that answered.
    mean = (body["member_reg0"] + body["member_reg1"]) / 2
    assert math.isclose(body["score"], mean, rel_tol=0, abs_tol=1e-6)


def test_an_ensemble_whose_members_all_answer_is_not_degraded(serve, files):
    srv = serve(model=ensemble(files, ["reg0", "reg1"]), cache={"enabled": False})
    body = srv.post("/predict", {"features": ROW}).json()
    assert body["degraded"] is False
    assert body["missing_members"] is None


def test_below_the_quorum_the_request_fails_naming_the_failing_member(serve, files):
    srv = serve(model=ensemble(files, ["reg0", "broken"]), cache={"enabled": False})  # quorum: all
    resp = srv.post("/predict", {"features": ROW})
    assert resp.status_code == 500
    assert "broken" in resp.text and "member exploded" in resp.text
    # The batcher keeps running: the next request gets the same clear failure, not a hang.
    assert srv.post("/predict", {"features": [1.0, 2.0, 3.0, 4.0]}).status_code == 500


def test_a_degraded_answer_is_served_but_not_cached(serve, files):
    model = ensemble(files, ["reg0", "reg1"], quorum=1)
    runner = ModelRunner(model)
    srv = serve(model=model, runner=runner)  # cache on
    assert runner.scorer is not None
    real = runner.scorer.run_member
    failed: list[int] = []

    def hiccup_once(index, x):
        if index == 1 and not failed:
            failed.append(index)
            raise RuntimeError("member hiccup")
        return real(index, x)

    runner.scorer.run_member = hiccup_once  # type: ignore[method-assign]
    first = srv.post("/predict", {"features": ROW}).json()
    assert (first["degraded"], first["missing_members"]) == (True, "reg1")
    second = srv.post("/predict", {"features": ROW}).json()
    assert (second["degraded"], second["cache_hit"]) == (False, False)
    third = srv.post("/predict", {"features": ROW}).json()
    assert (third["degraded"], third["cache_hit"]) == (False, True)


def test_a_hung_member_is_set_aside_batches_keep_answering_and_readiness_and_metrics_say_so(serve, files):
    import threading

    model = ensemble(files, ["reg0", "reg1", "slow"], quorum=2, member_timeout_ms=100)
    runner = ModelRunner(model, max_hung_member_calls=4)  # as [batcher] max_hung_member_calls = 4
    srv = serve(
        model=model, runner=runner, cache={"enabled": False}, batcher={"default_timeout_ms": 20_000.0}
    )
    assert runner.scorer is not None
    real = runner.scorer.run_member
    release = threading.Event()

    def hangs(index, x):
        if index == 2:
            release.wait(60)  # a member that never returns (until the test ends)
        return real(index, x)

    runner.scorer.run_member = hangs  # type: ignore[method-assign]
    try:
        # Far more batches than the pool has threads (3 members x 2 batches at once).
        for i in range(12):
            resp = srv.post("/predict", {"features": [30.0 + i, 2.0, 19.99, 4.0]})
            assert resp.status_code == 200, resp.text
            assert resp.json()["missing_members"] == "slow"
        assert srv.metric("sparkscore_member_hung_calls", member="slow") == 4
        assert srv.get("/v2/health/ready").status_code == 400
        (index,) = srv.post("/v2/repository/index").json()
        assert "slow" in index["reason"] and "hung" in index["reason"]
    finally:
        release.set()
    wait_until(lambda: srv.metric("sparkscore_member_hung_calls", member="slow") == 0, "the calls to return")
    srv.wait_ready()  # and ready again
