"""The HTTP surface: /predict, KServe v2, metrics, bad input, body limit, readiness and auth."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from tests.serving.conftest import GatedRunner
from udfs.core import load_scorer, score_batch
from udfs.demo import CTR_FEATURES


def core(model, rows: list[list[float | None]]) -> pa.RecordBatch:
    """Direct scoring through the core, the reference every path must match."""
    if model.spec.num_features is not None:
        batch = pa.record_batch({"features": pa.array(rows, pa.list_(pa.float64()))})
    else:
        batch = pa.record_batch(
            {c: pa.array([r[i] for r in rows], pa.float64()) for i, c in enumerate(CTR_FEATURES)}
        )
    return score_batch(batch, load_scorer(model))


ROW = [31.0, 4.0, 19.5, 7.0]


def test_predict_one_instance_returns_the_core_score_and_then_a_cache_hit(serve, ctr_model):
    srv = serve()
    first = srv.post("/predict", {"user_id": "u1", "item_id": 9, "features": ROW})
    assert first.status_code == 200, first.text
    body = first.json()
    expected = core(ctr_model, [ROW])
    assert body["score"] == expected.column("prediction")[0].as_py()
    assert body["model_version"] == ctr_model.version
    assert body["cache_hit"] is False
    assert body["latency_ms"] > 0
    again = srv.post("/predict", {"user_id": "u1", "item_id": 9, "features": ROW}).json()
    assert again["cache_hit"] is True
    assert again["score"] == body["score"]
    assert srv.metric("nv_cache_num_hits_per_model") == 1
    assert srv.metric("nv_cache_num_misses_per_model") == 1


def test_features_by_name_and_by_position_give_the_same_prediction(serve):
    srv = serve(cache={"enabled": False})
    by_pos = srv.post("/predict", {"features": ROW}).json()
    by_name = srv.post("/predict", {"features": dict(zip(CTR_FEATURES, ROW, strict=True))}).json()
    assert by_pos["score"] == by_name["score"]


def test_a_list_of_instances_fails_only_the_bad_one_with_the_core_reason(serve, ctr_model):
    srv = serve()
    rows = [ROW, [40.0, 2.0, None, 1.0], [22.0, 9.0, 5.0, 3.0]]
    resp = srv.post("/predict", [{"features": r} for r in rows])
    assert resp.status_code == 200
    preds = resp.json()["predictions"]
    expected = core(ctr_model, rows)
    assert preds[0]["score"] == expected.column("prediction")[0].as_py()
    assert preds[2]["score"] == expected.column("prediction")[2].as_py()
    assert preds[1] == {"error": expected.column("error")[1].as_py(), "status": 422}


def test_instances_key_with_a_shared_timeout_is_accepted(serve):
    srv = serve()
    resp = srv.post("/predict", {"instances": [{"features": ROW}], "timeout_ms": 5000})
    assert resp.status_code == 200
    assert len(resp.json()["predictions"]) == 1


def test_nan_feature_is_a_422_with_the_core_reason_naming_the_column(serve, ctr_model):
    srv = serve()
    # Python's json writes NaN tokens; the scorer accepts them so the core can report the row.
    body = json.dumps({"features": [31.0, 4.0, float("nan"), 7.0]})
    resp = srv.post("/predict", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 422
    expected = core(ctr_model, [[31.0, 4.0, float("nan"), 7.0]]).column("error")[0].as_py()
    assert resp.json()["error"] == expected
    assert "'price'" in expected


@pytest.mark.parametrize(
    ("body", "status", "names"),
    [
        (b'{"features": [1, 2,', 400, "malformed JSON"),
        (b'{"features": [1, 2, "x", 4]}', 422, "$.features[2]"),
        (b'{"features": [1, 2, 3]}', 422, "expected 4 values"),
        (b'{"features": {"age": 1, "purchase_count": 2, "price": 3}}', 422, "category_id"),
        (b'{"user_id": true, "features": [1, 2, 3, 4]}', 422, "$.user_id"),
        (b'{"featurez": [1, 2, 3, 4]}', 422, "featurez"),
        (b'{"features": [1, 2, 3, 4], "timeout_ms": -5}', 422, "timeout_ms"),
        (b'{"item_id": 3}', 422, "user_id"),
        (b"[]", 422, "instances"),
    ],
)
def test_bad_requests_get_4xx_naming_the_field(serve, body, status, names):
    srv = serve()
    resp = srv.post("/predict", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == status, resp.text
    assert names in resp.json()["error"]


def test_without_a_feature_store_a_request_without_features_is_422(serve):
    srv = serve()
    resp = srv.post("/predict", {"user_id": 1, "item_id": 2})
    assert resp.status_code == 422
    assert "--redis-url" in resp.json()["error"]


def test_array_column_model_gets_the_core_wrong_length_reason_and_probabilities(serve, clf_model):
    srv = serve(model=clf_model)
    good = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    resp = srv.post("/predict", {"features": good})
    assert resp.status_code == 200, resp.text
    expected = core(clf_model, [good])
    assert resp.json()["probabilities"] == expected.column("probabilities")[0].as_py()
    assert resp.json()["label"] == expected.column("label")[0].as_py()
    short = srv.post("/predict", {"features": good[:5]})
    assert short.status_code == 422
    assert short.json()["error"] == core(clf_model, [good[:5]]).column("error")[0].as_py()


def test_body_over_the_limit_is_413_with_or_without_content_length(serve):
    srv = serve(server={"max_body_bytes": 1000})
    big = json.dumps({"features": ROW, "context": {f"k{i}": 1.0 for i in range(200)}}).encode()
    assert len(big) > 1000
    resp = srv.post("/predict", content=big, headers={"content-type": "application/json"})
    assert resp.status_code == 413
    chunked = srv.post("/predict", content=iter([big[:600], big[600:]]))
    assert chunked.status_code == 413
    assert srv.post("/predict", {"features": ROW}).status_code == 200


def test_503_until_the_model_is_loaded_and_warmed_up(serve, ctr_model):
    runner = GatedRunner(ctr_model, hold_load=True)
    srv = serve(runner=runner, ready=False)
    assert srv.get("/v2/health/live").status_code == 200
    assert srv.get("/v2/health/ready").status_code == 400  # KServe v2: 4xx, empty body
    resp = srv.post("/predict", {"features": ROW})
    assert resp.status_code == 503
    assert resp.headers["retry-after"] == "1"
    assert srv.post("/v2/models/demo_ctr/infer", {"inputs": []}).status_code == 503
    runner.load_gate.set()
    srv.wait_ready()
    assert srv.post("/predict", {"features": ROW}).status_code == 200
    assert srv.metric("sparkscore_shed_requests_total", reason="not_ready") == 2


def test_bearer_token_guards_everything_but_health(serve):
    srv = serve(token="s3cret")
    assert srv.get("/v2/health/live").status_code == 200
    assert srv.get("/v2/health/ready").status_code == 200
    missing = srv.post("/predict", {"features": ROW})
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert (
        srv.post("/predict", {"features": ROW}, headers={"authorization": "Bearer nope"}).status_code == 401
    )
    assert srv.get("/metrics").status_code == 401
    ok = srv.post("/predict", {"features": ROW}, headers={"authorization": "Bearer s3cret"})
    assert ok.status_code == 200


def test_kserve_v2_round_trip_matches_the_core(serve, ctr_model):
    srv = serve()
    meta = srv.get("/v2/models/demo_ctr").json()
    assert meta["versions"] == [ctr_model.version]
    assert [i["name"] for i in meta["inputs"]] == list(CTR_FEATURES)
    rows = [ROW, [50.0, 1.0, 80.0, 2.0]]
    inputs = [
        {"name": c, "shape": [2], "datatype": "FP64", "data": [r[i] for r in rows]}
        for i, c in enumerate(CTR_FEATURES)
    ]
    resp = srv.post("/v2/models/demo_ctr/infer", {"id": "req-1", "inputs": inputs})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["id"] == "req-1"
    assert body["model_version"] == ctr_model.version
    (score,) = [o for o in body["outputs"] if o["name"] == "score"]
    assert score["shape"] == [2]
    np.testing.assert_array_equal(score["data"], core(ctr_model, rows).column("prediction").to_pylist())
    # One [N, 4] tensor works too, and a versioned path.
    matrix = {"inputs": [{"name": "input__0", "shape": [2, 4], "datatype": "FP32", "data": rows}]}
    versioned = srv.post(f"/v2/models/demo_ctr/versions/{ctr_model.version}/infer", matrix)
    assert [o for o in versioned.json()["outputs"] if o["name"] == "score"][0]["data"] == score["data"]


def test_kserve_v2_errors_name_the_model_and_the_bad_row(serve):
    srv = serve()
    assert srv.get("/v2/models/other").status_code == 404
    assert srv.get("/v2/models/demo_ctr/versions/nope").status_code == 404
    inputs = [{"name": c, "shape": [2], "datatype": "FP64", "data": [1.0, None]} for c in CTR_FEATURES]
    resp = srv.post("/v2/models/demo_ctr/infer", {"inputs": inputs})
    assert resp.status_code == 422
    assert "row 1: null feature: 'age'" in resp.json()["error"]
    short = [{"name": "age", "shape": [1], "datatype": "FP64", "data": [1.0]}]
    assert "missing" in srv.post("/v2/models/demo_ctr/infer", {"inputs": short}).json()["error"]


def test_metrics_use_triton_names(serve):
    srv = serve()
    srv.post("/predict", {"features": ROW})
    text = srv.get("/metrics").text
    for name in (
        "nv_inference_request_duration_us_bucket",
        "nv_inference_queue_duration_us_count",
        "nv_inference_compute_infer_duration_us_sum",
        "nv_inference_batch_size_bucket",
        "nv_inference_pending_request_count",
        "nv_inference_request_success",
        "nv_cache_num_hits_per_model",
        "nv_cache_num_misses_per_model",
        "sparkscore_shed_requests_total",
    ):
        assert name in text, name
    assert srv.metric("nv_inference_request_success") == 1
    assert srv.metric("nv_inference_request_duration_us_count") == 1


def test_unknown_route_is_404_and_wrong_method_405(serve):
    srv = serve()
    assert srv.get("/nope").status_code == 404
    assert srv.get("/predict").status_code == 405


def test_predictions_total_counts_model_answers_but_not_cache_hits(serve, ctr_model):
    srv = serve()
    for features in (ROW, [50.0, 1.0, 80.0, 2.0], ROW):
        assert srv.post("/predict", {"features": features}).status_code == 200
    assert srv.metric("sparkscore_predictions_total", version=ctr_model.version) == 2
