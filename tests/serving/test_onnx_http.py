"""The real-time scorer serves ONNX models through the same core: no serving code knows the engine."""

from __future__ import annotations

import numpy as np
import pytest

from udfs.spec import ModelSpec, resolve


@pytest.mark.parametrize("name", ["gbc", "lgbm"])
def test_http_scorer_serves_sklearn_and_lightgbm_models_equal_to_predict_proba(serve, onnx_models, name):
    model = resolve(
        ModelSpec(
            path=onnx_models[name],
            name=name,
            input_columns=("features",),
            num_features=5,
            output="probabilities",
            device="cpu",
        )
    )
    srv = serve(model=model)
    x = onnx_models["X"][:40]
    estimator = onnx_models[f"{name}_estimator"]
    # One request per row (micro-batched together by the scorer) and one request of all rows.
    singles = [srv.post("/predict", {"features": row.tolist()}) for row in x]
    assert all(r.status_code == 200 for r in singles), singles[0].text
    batch = srv.post("/predict", [{"features": row.tolist()} for row in x])
    assert batch.status_code == 200, batch.text
    for answers in ([r.json() for r in singles], batch.json()["predictions"]):
        probs = np.array([a["probabilities"] for a in answers])
        np.testing.assert_allclose(probs, estimator.predict_proba(x), atol=1e-5)
        assert [a["label"] for a in answers] == list(estimator.predict(x))
        assert {a["model_version"] for a in answers} == {model.version}
    short = srv.post("/predict", {"features": [1.0, 2.0]})
    assert short.status_code == 422
    assert short.json()["error"] == "wrong length: expected 5 features, got 2"
