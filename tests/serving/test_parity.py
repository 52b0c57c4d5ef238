"""Online and offline agree: the same rows through /predict (and KServe v2) and through the
Spark transform give the same predictions, and bad rows the same error reasons."""

from __future__ import annotations

import json
import math

import pytest

from udfs.demo import CTR_FEATURES
from udfs.spark import with_predictions

ROWS = [
    (1, 25.0, 3.0, 19.99, 4.0),
    (2, 61.0, 0.0, 300.0, 17.0),
    (3, 40.0, 2.0, None, 1.0),  # null feature
    (4, 33.0, 5.0, math.nan, 2.0),  # NaN
    (5, math.inf, 1.0, 10.0, 3.0),  # infinite
    (6, 18.0, 12.0, 0.5, 0.0),
]


@pytest.mark.spark
def test_predict_and_the_spark_transform_agree_on_scores_and_error_reasons(spark, serve, ctr_model):
    df = spark.createDataFrame(
        ROWS, "id long, age double, purchase_count double, price double, category_id double"
    )
    offline = {r["id"]: r for r in df.transform(with_predictions(ctr_model, keep=["id"])).collect()}

    srv = serve(batcher={"max_batch_size": 4, "max_wait_ms": 5.0})
    instances = [{"user_id": r[0], "features": dict(zip(CTR_FEATURES, r[1:], strict=True))} for r in ROWS]
    # json.dumps writes NaN / Infinity tokens, as a Python client would.
    resp = srv.post("/predict", content=json.dumps(instances), headers={"content-type": "application/json"})
    assert resp.status_code == 200, resp.text
    online = resp.json()["predictions"]

    assert len(online) == len(ROWS)
    for r, got in zip(ROWS, online, strict=True):
        want = offline[r[0]]
        if want["error"] is None:
            assert got["score"] == want["prediction"], r
            assert got["model_version"] == want["model_version"]
        else:
            assert got == {"error": want["error"], "status": 422}, r
    assert sum(1 for o in online if "error" in o) == 3


@pytest.mark.spark
def test_kserve_v2_and_the_spark_transform_agree(spark, serve, ctr_model):
    good = [r for r in ROWS if all(v is not None and math.isfinite(v) for v in r[1:])]
    df = spark.createDataFrame(
        good, "id long, age double, purchase_count double, price double, category_id double"
    )
    offline = [
        r["prediction"]
        for r in df.transform(with_predictions(ctr_model, keep=["id"])).orderBy("id").collect()
    ]
    srv = serve()
    inputs = [
        {"name": c, "shape": [len(good)], "datatype": "FP64", "data": [r[i + 1] for r in good]}
        for i, c in enumerate(CTR_FEATURES)
    ]
    body = srv.post("/v2/models/demo_ctr/infer", {"inputs": inputs}).json()
    (score,) = [o for o in body["outputs"] if o["name"] == "score"]
    assert score["data"] == offline
