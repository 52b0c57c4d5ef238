"""KServe v2 details a client relies on: shapes checked exactly before any row is built, readiness
as the protocol says (4xx, empty body), binary_data_output honoured, 405 for a wrong method."""

from __future__ import annotations

import numpy as np
import pytest

from tests.serving.conftest import GatedRunner
from udfs.demo import CTR_FEATURES

ROW = [31.0, 4.0, 19.5, 7.0]
INFER = "/v2/models/demo_ctr/infer"


def named(shape: list[int], data: list) -> dict:
    return {"inputs": [{"name": c, "shape": shape, "datatype": "FP64", "data": data} for c in CTR_FEATURES]}


def test_a_shape_whose_product_overflows_int64_is_refused_with_its_exact_size(serve):
    srv = serve()
    # np.prod wraps [1, 2**32, 2**32] to 0, which "matched" an empty data list.
    resp = srv.post(INFER, named([1, 4294967296, 4294967296], []))
    assert resp.status_code == 422, resp.text
    assert "18446744073709551616 values" in resp.json()["error"]


def test_a_shape_with_more_rows_than_max_instances_is_refused_before_rows_are_built(serve):
    srv = serve(server={"max_instances": 8})
    # 80 bytes that once built two million empty rows on the event loop before any check.
    resp = srv.post(INFER, {"inputs": [{"name": "x", "shape": [2000000, 0], "datatype": "FP32", "data": []}]})
    assert resp.status_code == 422, resp.text
    assert "2000000 rows" in resp.json()["error"] and "at most 8" in resp.json()["error"]
    huge = srv.post(INFER, named([4294967296, 4294967296], []))
    assert huge.status_code == 422
    assert "at most 8" in huge.json()["error"]


def test_an_inner_dimension_of_zero_is_refused(serve):
    srv = serve()
    resp = srv.post(INFER, {"inputs": [{"name": "x", "shape": [3, 0], "datatype": "FP32", "data": []}]})
    assert resp.status_code == 422, resp.text
    assert "dimension" in resp.json()["error"] and "[3, 0]" in resp.json()["error"]


def test_binary_data_size_is_checked_against_the_exact_shape(serve):
    srv = serve()
    header = (
        b'{"inputs": [{"name": "input__0", "shape": [4, 4611686018427387904], "datatype": "FP32",'
        b' "parameters": {"binary_data_size": 0}}]}'
    )
    resp = srv.post(INFER, content=header, headers={"inference-header-content-length": str(len(header))})
    assert resp.status_code == 422, resp.text
    assert "73786976294838206464 bytes" in resp.json()["error"]


def test_readiness_is_4xx_with_an_empty_body_until_loaded(serve, ctr_model):
    runner = GatedRunner(ctr_model, hold_load=True)
    srv = serve(runner=runner, ready=False)
    for path in ("/v2/health/ready", "/v2/models/demo_ctr/ready"):
        resp = srv.get(path)
        assert resp.status_code == 400, path
        assert resp.content == b""
    runner.load_gate.set()
    srv.wait_ready()
    assert srv.get("/v2/models/demo_ctr/ready").status_code == 200


def test_binary_data_output_applies_to_listed_outputs_without_their_own_flag(serve):
    srv = serve()
    inputs = [
        {"name": c, "shape": [1], "datatype": "FP64", "data": [v]}
        for c, v in zip(CTR_FEATURES, ROW, strict=True)
    ]
    body = {"inputs": inputs, "parameters": {"binary_data_output": True}, "outputs": [{"name": "score"}]}
    resp = srv.post(INFER, body)
    assert resp.status_code == 200, resp.text
    n = int(resp.headers["inference-header-content-length"])
    head = resp.content[:n]
    assert b'"binary_data_size":8' in head
    score = np.frombuffer(resp.content[n:], dtype="<f8")
    plain = srv.post(INFER, {"inputs": body["inputs"], "outputs": [{"name": "score"}]}).json()
    assert score.tolist() == plain["outputs"][0]["data"]


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", INFER, "POST"),
        ("POST", "/v2/health/ready", "GET"),
        ("POST", "/v2/health/live", "GET"),
        ("DELETE", "/v2/models/demo_ctr", "GET"),
        ("PUT", "/v2/models/demo_ctr/ready", "GET"),
        ("GET", "/v2/repository/models/demo_ctr/load", "POST"),
        ("POST", "/metrics", "GET"),
        ("GET", "/predict", "POST"),
    ],
)
def test_a_known_route_with_the_wrong_method_is_405_with_allow(serve, method, path, allow):
    srv = serve()
    resp = srv.client.request(method, srv.url + path)
    assert resp.status_code == 405, resp.text
    assert resp.headers["allow"] == allow
