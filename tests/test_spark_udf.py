"""The Spark transform: predictions equal direct torch, bad rows keep their place, model loads once."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from chispa import assert_approx_df_equality
from pyspark.sql import functions as F

from udfs.errors import ColumnTypeError, MissingColumnsError
from udfs.spark import ColumnConflictError, model_load_tracker, with_predictions
from udfs.spec import ModelSpec, resolve

pytestmark = pytest.mark.spark

CTR = ("age", "purchase_count", "price", "category_id")


def torch_scores(module, rows) -> list[float]:
    with torch.no_grad():
        return module(torch.tensor(rows, dtype=torch.float32)).numpy().reshape(-1).astype(float).tolist()


@pytest.mark.parametrize("fmt", ["torchscript", "export"])
def test_predictions_equal_direct_torch_for_numeric_columns(spark, models, fmt):
    rows = [(i, 20.0 + i, float(i % 7), 9.5 * i, float(i % 5)) for i in range(40)]
    df = spark.createDataFrame(
        rows, "user_id long, age double, purchase_count double, price double, category_id double"
    )
    model = resolve(ModelSpec(path=models[fmt], input_columns=CTR, name="ctr"))
    actual = df.transform(with_predictions(model, keep=["user_id"]))
    scores = torch_scores(models["module"], [r[1:] for r in rows])
    expected = spark.createDataFrame(
        [(r[0], s, model.version, None) for r, s in zip(rows, scores, strict=True)],
        "user_id long, prediction double, model_version string, error string",
    )
    assert_approx_df_equality(actual, expected, 1e-6, ignore_row_order=True)


def test_predictions_equal_direct_torch_for_one_array_column(spark, models):
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(30, 6)).astype(np.float32)
    df = spark.createDataFrame([(i, f.tolist()) for i, f in enumerate(feats)], "id int, f array<float>")
    model = resolve(
        ModelSpec(
            path=models["classifier"],
            input_columns=("f",),
            num_features=6,
            output="probabilities",
            activation="softmax",
        )
    )
    actual = df.transform(with_predictions(model, keep=["id"])).drop("probabilities")
    with torch.no_grad():
        labels = torch.softmax(models["classifier_module"](torch.from_numpy(feats)), -1).argmax(1).tolist()
    expected = spark.createDataFrame(
        [(i, lab, model.version, None) for i, lab in enumerate(labels)],
        "id int, label int, model_version string, error string",
    )
    assert_approx_df_equality(actual, expected, 1e-6, ignore_row_order=True)


def test_bad_rows_get_null_prediction_and_reason_while_others_are_scored(spark, models):
    rows = [
        (1, [30.0, 1.0, 5.0, 1.0]),
        (2, None),
        (3, [30.0, 1.0]),
        (4, [30.0, math.nan, 5.0, 1.0]),
        (5, [30.0, 1.0, math.inf, 1.0]),
        (6, [30.0, None, 5.0, 1.0]),
        (7, [41.0, 2.0, 6.0, 3.0]),
    ]
    df = spark.createDataFrame(rows, "id int, features array<double>")
    model = resolve(ModelSpec(path=models["torchscript"], input_columns=("features",), num_features=4))
    actual = df.transform(with_predictions(model, keep=["id"]))
    good = torch_scores(models["module"], [rows[0][1], rows[6][1]])
    v = model.version
    expected = spark.createDataFrame(
        [
            (1, good[0], v, None),
            (2, None, v, "null feature: 'features'"),
            (3, None, v, "wrong length: expected 4 features, got 2"),
            (4, None, v, "non-finite feature: features[1] = nan"),
            (5, None, v, "non-finite feature: features[2] = inf"),
            (6, None, v, "null feature: features[1]"),
            (7, good[1], v, None),
        ],
        "id int, prediction double, model_version string, error string",
    )
    assert_approx_df_equality(actual, expected, 1e-6, ignore_row_order=True)


def test_model_loads_once_per_python_worker_across_tasks_and_batches(spark, models, tmp_path):
    # A fresh file (new content hash) so no earlier test has it cached.
    module = torch.nn.Sequential(torch.nn.Linear(4, 1))
    path = tmp_path / "fresh.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    model = resolve(ModelSpec(path=str(path), input_columns=CTR, batch_size=16))
    df = (
        spark.range(4000)
        .select(F.col("id"), *[(F.col("id") % (i + 3)).cast("double").alias(c) for i, c in enumerate(CTR)])
        .repartition(12)
    )
    tracker = model_load_tracker(df)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "50")
    try:
        assert df.transform(with_predictions(model, keep=["id"], tracker=tracker)).count() == 4000
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
    loads = tracker.value
    assert loads, "no task reported"
    # 12 tasks of many batches each, yet every worker process loaded the model exactly once.
    assert set(loads.values()) == {1}
    # Fewer loads than tasks: workers were reused across tasks. How many workers the pool holds
    # depends on earlier tests and scheduling, so the bound is the task count, not the core count.
    assert sum(loads.values()) < 12


def test_missing_input_columns_name_what_exists(spark, models):
    df = spark.createDataFrame([(1, 2.0)], "id int, age double")
    model = resolve(ModelSpec(path=models["torchscript"], input_columns=CTR))
    with pytest.raises(
        MissingColumnsError, match=r"\['purchase_count', 'price', 'category_id'\].*\['id', 'age'\]"
    ):
        df.transform(with_predictions(model))


def test_non_numeric_column_type_says_to_use_array(spark, models):
    df = spark.createDataFrame([(1, {"a": 1.0})], "id int, age map<string,double>")
    model = resolve(ModelSpec(path=models["torchscript"], input_columns=("age",)))
    with pytest.raises(ColumnTypeError, match="use `array`"):
        df.transform(with_predictions(model))


def test_input_that_already_has_a_prediction_column_is_refused(spark, models):
    df = spark.createDataFrame(
        [(1.0, 1.0, 1.0, 1.0, 0.5)],
        "age double, purchase_count double, price double, category_id double, prediction double",
    )
    model = resolve(ModelSpec(path=models["torchscript"], input_columns=CTR))
    with pytest.raises(ColumnConflictError, match="prediction"):
        df.transform(with_predictions(model))
