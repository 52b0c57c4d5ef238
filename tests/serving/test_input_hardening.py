"""Requests a new user (or an attacker) sends by mistake: invalid UTF-8, absurd nesting, a body that
never finishes, and KServe v2 tensors whose datatype the model does not read. Each is a 4xx, never a 500
and never a held connection."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlparse

import pytest

from udfs.demo import CTR_FEATURES

ROW = [31.0, 4.0, 19.5, 7.0]


def v2_inputs(datatype: str, values: list) -> dict:
    return {
        "inputs": [
            {"name": c, "shape": [1], "datatype": datatype, "data": [v]}
            for c, v in zip(CTR_FEATURES, values, strict=True)
        ]
    }


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/predict", b'{"user_id": "\xff\xfe", "features": [1, 2, 3, 4]}', 400, "not valid UTF-8"),
        (
            "/predict",
            b'{"features": [1, 2, 3, 4], "context": ' + b"[" * 1000 + b"NaN" + b"]" * 1000 + b"}",
            400,
            "nested deeper than 64",
        ),
        (
            "/predict",
            b'{"features": [1, 2, 3, 4], "context": ' + b"[" * 1000 + b"1" + b"]" * 1000 + b"}",
            400,
            "nested deeper than 64",
        ),
        (
            "/v2/models/demo_ctr/infer",
            b'{"inputs": [], "parameters": {"x": ' + b"[" * 1000 + b"NaN" + b"]" * 1000 + b"}}",
            400,
            "nested",
        ),
        ("/v2/models/demo_ctr/infer", b'{"id": "\xc3\x28", "inputs": []}', 400, "not valid UTF-8"),
    ],
    ids=["invalid-utf8", "deep-nan-predict", "deep-strict-predict", "deep-nan-v2", "invalid-utf8-v2"],
)
def test_undecodable_or_absurdly_nested_json_is_a_4xx(serve, path, body, status, says):
    srv = serve()
    resp = srv.post(path, content=body, headers={"content-type": "application/json"})
    assert resp.status_code == status, resp.text
    assert says in resp.json()["error"]
    assert srv.post("/predict", {"features": ROW}).status_code == 200


def test_deeply_nested_v2_data_is_a_4xx_naming_the_input(serve):
    srv = serve()
    deep = {
        "inputs": [
            {"name": "age", "shape": [1], "datatype": "FP64", "data": json.loads("[" * 900 + "1" + "]" * 900)}
        ]
    }
    resp = srv.post("/v2/models/demo_ctr/infer", deep)
    assert resp.status_code == 422, resp.text
    assert "age" in resp.json()["error"] and "nested deeper" in resp.json()["error"]
    # Nesting to the tensor's rank is fine: [[4 values]] for shape [1, 4].
    ok = {"inputs": [{"name": "input__0", "shape": [1, 4], "datatype": "FP32", "data": [ROW]}]}
    assert srv.post("/v2/models/demo_ctr/infer", ok).status_code == 200


def test_v2_refuses_integer_tensors_and_says_which_datatypes_it_reads(serve):
    srv = serve()
    ints = srv.post("/v2/models/demo_ctr/infer", v2_inputs("INT64", [31, 4, 19, 7]))
    assert ints.status_code == 422
    assert "'INT64' is not accepted" in ints.json()["error"] and "FP64" in ints.json()["error"]
    fraction_as_int = srv.post("/v2/models/demo_ctr/infer", v2_inputs("INT64", [34.5, 4, 19, 7]))
    assert fraction_as_int.status_code == 422
    assert srv.post("/v2/models/demo_ctr/infer", v2_inputs("FP32", ROW)).status_code == 200
    meta = srv.get("/v2/models/demo_ctr").json()
    assert all(i["datatype"] == "FP64" for i in meta["inputs"])
    assert meta["inputs"][0]["parameters"]["accepted_datatypes"] == ["FP16", "FP32", "FP64"]


def test_a_body_shorter_than_its_content_length_gets_408_and_the_connection_closes(serve):
    srv = serve(server={"body_timeout_s": 0.5})
    url = urlparse(srv.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"features": [1'
        )
        received = b""
        while chunk := sock.recv(4096):  # ends when the server closes the connection
            received += chunk
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    assert b"did not arrive within 0.5 s" in received
    assert srv.metric("nv_inference_request_failure", reason="body_timeout") == 1


@pytest.mark.parametrize("literal", [b"1e400", b"-1e400"])
def test_a_number_beyond_float64_gets_the_scoring_cores_non_finite_reason(serve, ctr_model, literal):
    from tests.serving.test_http import core

    srv = serve()
    body = b'{"features": [31.0, 4.0, ' + literal + b", 7.0]}"
    resp = srv.post("/predict", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 422, resp.text
    value = float(literal)  # inf or -inf, as Python's json reads it
    expected = core(ctr_model, [[31.0, 4.0, value, 7.0]]).column("error")[0].as_py()
    assert expected.startswith("non-finite feature")
    assert resp.json()["error"] == expected
