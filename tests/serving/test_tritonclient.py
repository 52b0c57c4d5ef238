"""The stock Triton client talks to the scorer: binary tensor data (its default) and JSON, both ways."""

from __future__ import annotations

from urllib.parse import urlparse

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.serving.test_http import core
from udfs.demo import CTR_FEATURES

ROWS = [[31.0, 4.0, 19.5, 7.0], [50.0, 1.0, 80.0, 2.0], [22.0, 9.0, 5.0, 3.0]]


@pytest.fixture
def client(serve):
    srv = serve()
    c = triton.InferenceServerClient(url=urlparse(srv.url).netloc)
    yield c
    c.close()


def inputs(binary: bool) -> list[triton.InferInput]:
    out = []
    for i, name in enumerate(CTR_FEATURES):
        t = triton.InferInput(name, [len(ROWS)], "FP64")
        t.set_data_from_numpy(np.array([r[i] for r in ROWS], dtype=np.float64), binary_data=binary)
        out.append(t)
    return out


def test_tritonclient_defaults_binary_data_both_ways_and_matches_the_core(client, ctr_model):
    assert client.is_server_ready()
    assert client.get_model_metadata("demo_ctr")["versions"] == [ctr_model.version]
    result = client.infer("demo_ctr", inputs(binary=True))  # binary inputs, all outputs binary
    expected = np.array(core(ctr_model, ROWS).column("prediction").to_pylist())
    np.testing.assert_array_equal(result.as_numpy("score"), expected)
    assert result.get_response()["model_version"] == ctr_model.version


def test_tritonclient_json_in_binary_out_for_one_requested_output(client, ctr_model):
    result = client.infer(
        "demo_ctr", inputs(binary=False), outputs=[triton.InferRequestedOutput("score", binary_data=True)]
    )
    assert [o["name"] for o in result.get_response()["outputs"]] == ["score"]
    np.testing.assert_array_equal(
        result.as_numpy("score"), np.array(core(ctr_model, ROWS).column("prediction").to_pylist())
    )


def test_tritonclient_fp32_matrix_and_an_integer_tensor_refused(client, ctr_model):
    t = triton.InferInput("input__0", [len(ROWS), 4], "FP32")
    t.set_data_from_numpy(np.array(ROWS, dtype=np.float32))
    got = client.infer("demo_ctr", [t]).as_numpy("score")
    np.testing.assert_allclose(got, core(ctr_model, ROWS).column("prediction").to_pylist(), rtol=1e-6)
    bad = triton.InferInput("age", [1], "INT64")
    bad.set_data_from_numpy(np.array([31], dtype=np.int64))
    with pytest.raises(InferenceServerException, match="is not accepted"):
        client.infer("demo_ctr", [bad])
