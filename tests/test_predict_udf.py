"""udfs.predict_udf: the scoring core as a Column function, in the DataFrame API and in SQL."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from chispa import assert_approx_df_equality
from pyspark.util import PythonEvalType

from udfs import model_cache, predict_udf, with_predictions
from udfs.core import load_scorer
from udfs.spark import ArgumentCountError, _score_arrays
from udfs.spec import MemberSpec, ModelSpec, resolve

pytestmark = pytest.mark.spark

CTR = ("age", "purchase_count", "price", "category_id")
ROWS = [
    (1, 30.0, 1.0, 5.0, 1.0),
    (2, None, 1.0, 5.0, 1.0),
    (3, 41.0, math.nan, 6.0, 3.0),
    (4, 41.0, 2.0, 1e300, 3.0),
    (5, 61.0, 0.0, 300.0, 17.0),
]
SCHEMA = "id long, age double, purchase_count double, price double, category_id double"


@pytest.fixture(scope="module")
def ctr(models):
    return resolve(ModelSpec(path=models["torchscript"], input_columns=CTR, name="ctr"))


def test_udf_in_with_column_equals_the_transform_row_for_row(spark, ctr):
    df = spark.createDataFrame(ROWS, SCHEMA)
    score = predict_udf(ctr)
    actual = df.withColumn("p", score(*CTR)).select("id", "p.*")
    expected = df.transform(with_predictions(ctr, keep=["id"]))
    assert_approx_df_equality(actual, expected, 1e-6, ignore_row_order=True)
    assert actual.filter("error is not null").count() == 3
    # One Python evaluation feeds every struct field (no re-scoring per field).
    assert actual._jdf.queryExecution().executedPlan().toString().count("ArrowEvalPython") == 1


def test_udf_registered_for_sql_scores_the_same_rows(spark, ctr):
    spark.createDataFrame(ROWS, SCHEMA).createOrReplaceTempView("udf_events")
    spark.udf.register("ctr_score", predict_udf(ctr))
    actual = spark.sql(
        "SELECT id, s.prediction, s.error FROM "
        "(SELECT id, ctr_score(age, purchase_count, price, category_id) AS s FROM udf_events)"
    )
    expected = (
        spark.table("udf_events")
        .transform(with_predictions(ctr, keep=["id"]))
        .select("id", "prediction", "error")
    )
    assert_approx_df_equality(actual, expected, 1e-6, ignore_row_order=True)


def test_array_column_gives_probabilities_and_label_in_the_struct(spark, models):
    clf = resolve(
        ModelSpec(
            path=models["classifier"],
            input_columns=("f",),
            num_features=6,
            output="probabilities",
            activation="softmax",
        )
    )
    feats = np.random.default_rng(2).normal(size=(8, 6)).astype(np.float32)
    df = spark.createDataFrame(
        [(i, f.tolist()) for i, f in enumerate(feats)] + [(8, None)], "id int, f array<float>"
    )
    actual = df.select("id", predict_udf(clf)("f").alias("p")).select("id", "p.*")
    assert actual.columns == ["id", "probabilities", "label", "model_version", "error"]
    expected = df.transform(with_predictions(clf, keep=["id"]))
    assert_approx_df_equality(actual, expected, 1e-5, ignore_row_order=True)


def test_ensemble_struct_carries_degraded_missing_and_member_columns(spark, models):
    ens = resolve(
        ModelSpec(
            input_columns=CTR,
            members=(
                MemberSpec(path=models["torchscript"], name="ts"),
                MemberSpec(path=models["export"], name="ep"),
            ),
            member_outputs=True,
        )
    )
    df = spark.createDataFrame(ROWS, SCHEMA)
    actual = df.select("id", predict_udf(ens)(*CTR).alias("p")).select("id", "p.*")
    assert {"degraded", "missing_members", "member_ts", "member_ep"} <= set(actual.columns)
    assert_approx_df_equality(
        actual, df.transform(with_predictions(ens, keep=["id"])), 1e-6, ignore_row_order=True
    )


def test_udf_shares_the_per_worker_model_cache_with_the_transform(ctr):
    model_cache.clear()
    load_scorer(ctr)  # what with_predictions did earlier in this worker
    body = _score_arrays(ctr, None)
    batch = [pa.array([30.0]), pa.array([1.0]), pa.array([5.0]), pa.array([1.0])]
    (out,) = list(body(iter([tuple(batch)])))
    assert out.field("error").null_count == 1
    assert model_cache.total_loads() == 1


def test_udf_called_with_the_wrong_number_of_columns_says_what_it_takes(spark, ctr):
    score = predict_udf(ctr)
    with pytest.raises(ArgumentCountError, match=r"takes 4 column\(s\), \['age', .*\] in that order"):
        score("age")
    # Without arguments it reads the columns input_columns names.
    df = spark.createDataFrame(ROWS, SCHEMA)
    assert df.select(score().alias("p")).filter("p.error is null").count() == 2


def test_without_arrow_udf_it_falls_back_to_an_iterator_pandas_udf(spark, ctr, monkeypatch):
    from udfs import spark as spark_api

    monkeypatch.setattr(spark_api, "_arrow_udf", lambda: None)
    score = predict_udf(ctr, check=False)
    assert score.evalType == PythonEvalType.SQL_SCALAR_PANDAS_ITER_UDF
    # Spark hands pandas a null double as NaN, so the NaN row (whose reason would differ) is left out.
    df = spark.createDataFrame([r for r in ROWS if r[0] != 3], SCHEMA)
    actual = df.select("id", score(*CTR).alias("p")).select("id", "p.*")
    assert_approx_df_equality(
        actual, df.transform(with_predictions(ctr, keep=["id"])), 1e-6, ignore_row_order=True
    )


def test_a_wrong_model_fails_when_the_udf_is_made_not_inside_a_task(models):
    from udfs.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="output = 'probabilities'"):
        predict_udf(ModelSpec(path=models["classifier"], input_columns=("f",), num_features=6))


def test_the_udf_is_named_after_the_model_in_plans_and_column_names(spark, ctr):
    df = spark.createDataFrame(ROWS, SCHEMA)
    scored = df.select(predict_udf(ctr)(*CTR))
    assert scored.columns == ["sparkscore_ctr(age, purchase_count, price, category_id)"]
    plan = scored._jdf.queryExecution().executedPlan().toString()
    assert "sparkscore_ctr(" in plan and "score(" not in plan.replace("sparkscore_ctr(", "")


def test_a_nondeterministic_udf_keeps_the_argument_checks_and_scores_the_same(spark, ctr):
    score = predict_udf(ctr).asNondeterministic()
    assert score.deterministic is False
    with pytest.raises(ArgumentCountError, match=r"takes 4 column\(s\)"):
        score("age")
    df = spark.createDataFrame(ROWS, SCHEMA)
    actual = df.select("id", score().alias("p")).select("id", "p.*")
    expected = df.transform(with_predictions(ctr, keep=["id"]))
    assert_approx_df_equality(actual, expected, 1e-6, ignore_row_order=True)
    spark.udf.register("ctr_score_nd", score)
    assert spark.sql("SELECT ctr_score_nd(30d, 1d, 5d, 1d).error AS e").first()["e"] is None
