"""Typed models over HTTP: ``/predict`` with ``"inputs": {name: value}`` and KServe v2 with several
named tensors of their own datatypes (JSON and binary, through ``tritonclient.http``), requested
outputs only, and a 400 naming the input for a missing, unknown or mistyped one."""

from __future__ import annotations

from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from udfs import examples
from udfs.config import from_dict
from udfs.core import load_scorer, score_batch
from udfs.spec import ModelSpec, resolve


@pytest.fixture(scope="module")
def typed_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("typed-http")
    return {
        "two_head": examples.save("two_head", examples.two_head_module(), out, ("torchscript", "onnx")),
        "text": examples.save("text", examples.text_module(), out, ("torchscript",)),
    }


def typed_model(name, path):
    table = {**examples.model_table(name), "name": name, "path": str(path), "device": "cpu"}
    return resolve(from_dict(ModelSpec, table, where="model"))


def test_predict_takes_inputs_by_name_and_gives_every_output(serve, typed_files):
    model = typed_model("two_head", typed_files["two_head"]["torchscript"])
    srv = serve(model=model)
    feats = [0.1 * k for k in range(16)]
    r = srv.post("/predict", json={"inputs": {"features": feats, "device_id": 3}})
    assert r.status_code == 200, r.text
    body = r.json()
    want = score_batch(
        pa.record_batch({"features": pa.array([feats]), "device": pa.array([3])}), load_scorer(model)
    )
    assert body["ctr"] == pytest.approx(want.column("ctr")[0].as_py(), abs=1e-6)
    assert body["cvr"] == pytest.approx(want.column("cvr")[0].as_py(), abs=1e-6)
    bad = srv.post("/predict", json={"inputs": {"features": feats, "device_id": 99}})
    assert bad.status_code == 422 and "id out of range: device_id = 99" in bad.text
    missing = srv.post("/predict", json={"inputs": {"features": feats}})
    assert missing.status_code == 400 and "missing input 'device_id'" in missing.text
    unknown = srv.post("/predict", json={"inputs": {"features": feats, "device_id": 1, "dev": 2}})
    assert unknown.status_code == 400 and "unknown input 'dev'" in unknown.text


@pytest.mark.parametrize("binary", [True, False])
def test_kserve_v2_multi_input_through_tritonclient_returns_only_the_requested_output(
    serve, typed_files, binary
):
    model = typed_model("two_head", typed_files["two_head"]["onnx"])
    srv = serve(model=model)
    client = triton.InferenceServerClient(url=urlparse(srv.url).netloc)
    try:
        feats = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)
        device = np.array([0, 5, 15, 2], dtype=np.int32)
        f = triton.InferInput("features", [4, 16], "FP32")
        f.set_data_from_numpy(feats, binary_data=binary)
        d = triton.InferInput("device_id", [4], "INT32")
        d.set_data_from_numpy(device, binary_data=binary)
        out = client.infer(
            "two_head", [f, d], outputs=[triton.InferRequestedOutput("cvr", binary_data=binary)]
        )
        assert [o["name"] for o in out.get_response()["outputs"]] == ["cvr"]
        want = score_batch(
            pa.record_batch({"features": pa.array(list(feats)), "device": pa.array(device)}),
            load_scorer(model),
        )
        np.testing.assert_allclose(out.as_numpy("cvr"), want.column("cvr").to_numpy(), atol=1e-6)
        meta = client.get_model_metadata("two_head")
        assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [
            ("features", "FP32"),
            ("device_id", "INT32"),
        ]
        wrong = triton.InferInput("device_id", [4], "INT64")
        wrong.set_data_from_numpy(device.astype(np.int64), binary_data=binary)
        with pytest.raises(InferenceServerException, match="'INT64', but input 'device_id' is INT32"):
            client.infer("two_head", [f, wrong])
        with pytest.raises(InferenceServerException, match=r"inputs\[device_id\]: missing"):
            client.infer("two_head", [f])
    finally:
        client.close()


def test_kserve_v2_variable_length_requests_are_padded_together_and_match_the_core(serve, typed_files):
    model = typed_model("text", typed_files["text"]["torchscript"])
    srv = serve(model=model)
    rows = [[5, 6, 7], [9, 8, 7, 6, 5, 4, 3], [11]]
    answers = []
    for ids in rows:
        body = {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, len(ids)], "data": ids}]}
        r = srv.post("/v2/models/text/infer", json=body)
        assert r.status_code == 200, r.text
        answers.append({o["name"]: o["data"] for o in r.json()["outputs"]})
    want = score_batch(pa.record_batch({"tokens": pa.array(rows, pa.list_(pa.int64()))}), load_scorer(model))
    for got, probs, label in zip(
        answers, want.column("probabilities").to_pylist(), want.column("label").to_pylist(), strict=True
    ):
        np.testing.assert_allclose(got["probabilities"], probs, atol=1e-6)
        assert got["label"] == [label]
    too_long = {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 65], "data": [1] * 65}]}
    r = srv.post("/v2/models/text/infer", json=too_long)
    assert r.status_code == 422 and "sequence too long: input_ids has 65 values, max_length is 64" in r.text


class FailsOnMarker(torch.nn.Module):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if bool((ids == 666).any()):
            raise RuntimeError("index 666 is out of range")
        return ids.double().sum(1)


def test_a_row_the_model_raises_for_fails_alone_and_is_counted_in_the_metrics(serve, tmp_path):
    path = tmp_path / "marker.pt"
    torch.jit.save(torch.jit.script(FailsOnMarker()), str(path))
    table = {
        "path": str(path),
        "name": "marker",
        "device": "cpu",
        "inputs": [{"name": "ids", "columns": ["a", "b"], "dtype": "int64"}],
    }
    srv = serve(model=resolve(from_dict(ModelSpec, table, where="model")))
    r = srv.post("/predict", json={"instances": [{"inputs": {"ids": [1, 2]}}, {"inputs": {"ids": [666, 2]}}]})
    predictions = r.json()["predictions"]
    assert predictions[0]["score"] == 3.0
    assert predictions[1]["status"] == 422 and "model error: " in predictions[1]["error"]
    assert "index 666 is out of range" in predictions[1]["error"]
    metrics = srv.get("/metrics").text
    count = [line for line in metrics.splitlines() if line.startswith("sparkscore_model_error_rows_total")]
    assert count and float(count[0].split()[-1]) >= 1


class Flagged(torch.nn.Module):
    def forward(self, x: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
        return x.double().sum(1) + 10 * flag.double()


@pytest.mark.parametrize("binary", [True, False])
def test_kserve_v2_takes_fp64_and_bool_tensors(serve, tmp_path, binary):
    path = tmp_path / "flagged.pt"
    torch.jit.save(torch.jit.script(Flagged()), str(path))
    table = {
        "path": str(path),
        "name": "flagged",
        "device": "cpu",
        "inputs": [
            {"name": "x", "column": "x", "shape": [2], "dtype": "float64"},
            {"name": "flag", "column": "flag", "shape": [], "dtype": "bool"},
        ],
    }
    srv = serve(model=resolve(from_dict(ModelSpec, table, where="model")))
    client = triton.InferenceServerClient(url=urlparse(srv.url).netloc)
    try:
        x = triton.InferInput("x", [2, 2], "FP64")
        x.set_data_from_numpy(np.array([[1.5, 2.0], [3.0, 4.0]]), binary_data=binary)
        flag = triton.InferInput("flag", [2], "BOOL")
        flag.set_data_from_numpy(np.array([True, False]), binary_data=binary)
        out = client.infer("flagged", [x, flag])
        np.testing.assert_array_equal(out.as_numpy("score"), [13.5, 7.0])
    finally:
        client.close()
