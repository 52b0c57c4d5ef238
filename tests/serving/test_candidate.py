"""A candidate model on live traffic: a canary answers a sticky share of users; a shadow scores every
micro-batch off the response path and reports how far it is from the primary. A failing or slow
candidate never changes a primary answer."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from serving.config import CandidateConfig, from_mapping
from tests.serving.conftest import GatedRunner, wait_until
from tests.serving.test_http import core
from tests.serving.test_model_swap import versions  # noqa: F401 - the two model files, a fixture
from udfs.demo import CTR_FEATURES
from udfs.errors import ConfigError
from udfs.spec import ModelSpec, resolve


def spec(path: str) -> ModelSpec:
    return ModelSpec(path=path, input_columns=CTR_FEATURES, name="demo_ctr", device="cpu")


def rows(n: int) -> list[list[float]]:
    return [[20.0 + i % 60, float(i % 7), 5.0 + i, float(i % 5)] for i in range(n)]


def test_a_canary_answers_exactly_its_sticky_share_of_users(serve, versions):  # noqa: F811
    primary, candidate = resolve(spec(versions["a"])), resolve(spec(versions["b"]))
    srv = serve(
        model=primary, candidate=CandidateConfig(model=candidate.spec, traffic=0.3), cache={"enabled": False}
    )
    users = [f"user-{i}" for i in range(60)]
    expected = {u for u in users if zlib.crc32(u.encode()) / 2**32 < 0.3}
    assert 5 < len(expected) < 35
    feats = rows(len(users))
    for _ in range(2):  # twice: the same user lands on the same version again
        for u, f in zip(users, feats, strict=True):
            body = srv.post("/predict", {"user_id": u, "features": f}).json()
            model = candidate if u in expected else primary
            assert body["model_version"] == model.version, u
            assert body["score"] == core(model, [f]).column("prediction")[0].as_py()
    assert srv.get("/v2/models/demo_ctr").json()["versions"] == [primary.version, candidate.version]
    assert srv.metric("nv_inference_count", version=candidate.version, role="canary") == 2 * len(expected)
    assert srv.metric("nv_inference_count", version=primary.version, role="primary") == 2 * (
        60 - len(expected)
    )
    # KServe v2 can address the candidate by version.
    inputs = [
        {"name": c, "shape": [1], "datatype": "FP64", "data": [v]}
        for c, v in zip(CTR_FEATURES, feats[0], strict=True)
    ]
    v2 = srv.post(f"/v2/models/demo_ctr/versions/{candidate.version}/infer", {"inputs": inputs}).json()
    assert v2["model_version"] == candidate.version


def test_a_shadow_reports_the_difference_and_the_primary_answers(serve, versions):  # noqa: F811
    primary, candidate = resolve(spec(versions["a"])), resolve(spec(versions["b"]))
    # Room for every batch: on a loaded machine the shadow can fall more than the default 4 batches
    # behind and skip some, by design (the next test covers skipping); here all 40 must be compared.
    srv = serve(
        model=primary, candidate=CandidateConfig(model=candidate.spec, shadow=True, max_pending_batches=64)
    )
    feats = rows(40)
    for f in feats:
        body = srv.post("/predict", {"user_id": "u", "features": f}).json()
        assert body["model_version"] == primary.version
        assert body["score"] == core(primary, [f]).column("prediction")[0].as_py()
    wait_until(
        lambda: srv.metric("sparkscore_shadow_rows_compared_total") == 40, "the shadow to compare 40 rows"
    )
    a = np.array(core(primary, feats).column("prediction").to_pylist())
    b = np.array(core(candidate, feats).column("prediction").to_pylist())
    diff = np.abs(a - b)
    assert srv.metric("sparkscore_shadow_abs_diff_mean") == pytest.approx(diff.mean(), rel=1e-6)
    assert srv.metric("sparkscore_shadow_abs_diff_p99") == pytest.approx(np.percentile(diff, 99), rel=1e-6)
    agree = np.mean((a >= 0.5) == (b >= 0.5))
    assert srv.metric("sparkscore_shadow_label_agreement_ratio") == pytest.approx(agree)
    assert srv.metric("nv_inference_count", role="shadow") == 40
    assert srv.get("/v2/models/demo_ctr").json()["versions"] == [primary.version]


def test_a_held_or_failing_shadow_never_holds_or_changes_a_primary_answer(serve, versions):  # noqa: F811
    primary, candidate = resolve(spec(versions["a"])), resolve(spec(versions["b"]))
    held = GatedRunner(candidate, poison=13.0)
    held.hold = lambda rows: held.live and rows[0][0] != 13.0  # real batches wait at the gate
    srv = serve(
        model=primary,
        candidate=CandidateConfig(model=candidate.spec, shadow=True, max_pending_batches=1),
        service_options={"candidate_runner": held},
    )
    feats = rows(5)
    try:
        for f in feats:  # one at a time: each its own micro-batch
            body = srv.post("/predict", {"features": f}).json()
            assert (body["model_version"], body["score"]) == (
                primary.version,
                core(primary, [f]).column("prediction")[0].as_py(),
            )
        assert held.entered.wait(10)
        assert srv.metric("sparkscore_shadow_batches_total", outcome="skipped") == 4
    finally:
        held.gate.set()
    wait_until(
        lambda: srv.metric("sparkscore_shadow_batches_total", outcome="compared") == 1, "the held batch"
    )
    poisoned = [13.0, 1.0, 2.0, 3.0]
    body = srv.post("/predict", {"features": poisoned}).json()
    assert body["score"] == core(primary, [poisoned]).column("prediction")[0].as_py()
    wait_until(
        lambda: srv.metric("sparkscore_shadow_batches_total", outcome="failed") == 1, "the failed batch"
    )


@pytest.mark.parametrize(
    ("candidate", "says"),
    [
        ({"path": "x.pt"}, "either traffic"),
        ({"path": "x.pt", "traffic": 0.1, "shadow": True}, "either traffic"),
        ({"path": "x.pt", "traffic": 1.5}, "between 0 and 1"),
        ({"path": "x.pt", "shadow": True, "input_columns": ["a"]}, "input_columns"),
        ({"path": "x.pt", "shadow": "yes"}, "wrong type"),
        ({"follow": "ctr@challenger", "traffic": 0.1}, "follow must be a registry URI"),
        ({"follow": 3, "traffic": 0.1}, "wrong type"),
    ],
)
def test_candidate_config_mistakes_are_one_sentence(candidate, says):
    model = {"path": "m.pt", "input_columns": list(CTR_FEATURES), "name": "demo_ctr"}
    with pytest.raises(ConfigError, match=says):
        from_mapping({"model": model, "candidate": candidate})


def test_a_candidate_inherits_the_primary_spec_but_its_own_file():
    model = {"path": "m.pt", "version": "v1", "input_columns": list(CTR_FEATURES), "name": "demo_ctr"}
    cfg = from_mapping({"model": model, "candidate": {"path": "c.pt", "traffic": 0.1}})
    assert cfg.candidate is not None
    assert (cfg.candidate.model.path, cfg.candidate.model.version) == ("c.pt", None)
    assert cfg.candidate.model.input_columns == tuple(CTR_FEATURES)


def test_a_followed_candidate_starts_from_its_alias_unless_given_a_path():
    model = {"path": "m.pt", "input_columns": list(CTR_FEATURES), "name": "demo_ctr"}
    follow = "models:/demo_ctr@challenger"
    cfg = from_mapping({"model": model, "candidate": {"follow": follow, "traffic": 0.1}})
    assert cfg.candidate is not None
    assert (cfg.candidate.model.path, cfg.candidate.follow) == (follow, follow)
    cfg = from_mapping({"model": model, "candidate": {"follow": follow, "path": "c.pt", "shadow": True}})
    assert cfg.candidate is not None and cfg.candidate.model.path == "c.pt"


def test_a_canarys_metrics_survive_many_swaps_of_the_primary(serve, versions, tmp_path):  # noqa: F811
    from tests.serving.test_model_swap import LOAD, replace_file, served

    path, primary = served(tmp_path, versions["a"])
    candidate = resolve(spec(versions["b"]))
    srv = serve(model=primary, candidate=CandidateConfig(model=candidate.spec, traffic=1.0))
    assert srv.post("/predict", {"features": rows(1)[0]}).json()["model_version"] == candidate.version
    for swap in range(7):
        replace_file(path, versions["b" if swap % 2 == 0 else "a"])
        assert srv.post(LOAD).status_code == 200
    assert srv.metric("nv_inference_count", version=candidate.version, role="canary") == 1
