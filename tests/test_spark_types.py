"""Every column type a real table has reaches the output unchanged: timestamps (with and without a time
zone), dates, decimals, binaries, maps, structs, intervals, variants and names with dots, whether they
are kept or only carried past, through with_predictions, predict_udf and the batch job."""

from __future__ import annotations

import datetime as dt
import textwrap

import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F

from jobs import batch_score
from udfs import predict_udf, with_predictions
from udfs.errors import ColumnTypeError
from udfs.spark import quoted
from udfs.spec import ModelSpec, resolve

pytestmark = pytest.mark.spark

CTR = ("age", "purchase_count", "price", "category_id")
# One row of every type, plus the four features. `a.b` is a plain column whose name holds a dot.
TYPED = """
    select id, age, purchase_count, price, category_id,
      date'2024-01-02' + cast(id as int) as d,
      timestamp'2024-01-02 03:04:05.123456' + make_interval(0, 0, 0, 0, 0, 0, id) as ts,
      timestamp_ntz'2024-01-02 03:04:05' as tsn,
      cast(id / 4 as decimal(12, 3)) as dec,
      cast(cast(id as string) as binary) as bin,
      map('k', id) as m,
      named_struct('x', id, 'y', cast(id as string)) as st,
      make_dt_interval(1, 2, 3, 4.5) as dti,
      make_ym_interval(1, cast(id as int)) as ymi,
      parse_json('{"a": ' || id || '}') as v,
      id * 10 as `a.b`
    from values
      (1L, 30.0d, 1.0d, 5.0d, 1.0d), (2L, 41.0d, 2.0d, 6.0d, 3.0d), (3L, 61.0d, 0.0d, 300.0d, 17.0d)
      as t(id, age, purchase_count, price, category_id)
"""
# Variant has no equality in Spark and PySpark cannot collect interval year to month: they are
# compared as text.
COMPARABLE = [
    "id",
    "d",
    "ts",
    "tsn",
    "dec",
    "bin",
    "m",
    "st",
    "dti",
    "cast(ymi as string) as ymi",
    "`a.b`",
    "to_json(v) as v",
]


@pytest.fixture(scope="module")
def ctr(models):
    return resolve(ModelSpec(path=models["torchscript"], input_columns=CTR, name="ctr"))


@pytest.fixture
def typed(spark):
    return spark.sql(TYPED)


def rows(df) -> list:
    """The rows by id (maps cannot be sorted by Spark, so chispa's ignore_row_order cannot)."""
    return sorted(df.collect(), key=lambda r: r["id"])


def scores(spark, ctr):
    """The predictions of the three rows, from a frame of the features alone."""
    plain = spark.sql(TYPED).select("id", *CTR)
    return plain.transform(with_predictions(ctr, keep=["id"])).select("id", "prediction")


def test_every_type_is_kept_unchanged_beside_the_predictions(spark, ctr, typed):
    scored = typed.transform(with_predictions(ctr))
    assert scored.filter("error is not null").count() == 0
    assert rows(scored.selectExpr(*COMPARABLE)) == rows(typed.selectExpr(*COMPARABLE))
    assert_df_equality(
        scored.select("id", "prediction"), scores(spark, ctr), ignore_row_order=True, ignore_nullable=True
    )
    assert dict(scored.dtypes)["ts"] == "timestamp" and dict(scored.dtypes)["tsn"] == "timestamp_ntz"


def test_arrow_types_are_kept_through_python_and_the_rest_stay_in_the_jvm(spark, ctr, typed):
    arrow_only = typed.drop("ymi")
    plan = arrow_only.transform(with_predictions(ctr))._jdf.queryExecution().executedPlan().toString()
    assert "MapInArrow" in plan
    # interval year to month has no Arrow form: kept through the Column UDF instead.
    plan = typed.transform(with_predictions(ctr))._jdf.queryExecution().executedPlan().toString()
    assert "ArrowEvalPython" in plan and "MapInArrow" not in plan


def test_columns_carried_past_but_not_kept_do_not_matter(spark, ctr, typed):
    scored = typed.transform(with_predictions(ctr, keep=["id", "a.b"]))
    assert scored.columns == ["id", "a.b", "prediction", "model_version", "error"]
    assert sorted(r["a.b"] for r in scored.collect()) == [10, 20, 30]


def test_a_feature_column_whose_name_has_a_dot_is_read_as_that_column(spark, models, typed):
    model = resolve(
        ModelSpec(path=models["torchscript"], input_columns=("age", "a.b", "price", "category_id"))
    )
    via_dot = typed.transform(with_predictions(model, keep=["id"])).select("id", "prediction")
    renamed = typed.withColumn("purchase_count", quoted("a.b").cast("double"))
    plain = resolve(ModelSpec(path=models["torchscript"], input_columns=CTR))
    expected = renamed.transform(with_predictions(plain, keep=["id"])).select("id", "prediction")
    assert_df_equality(via_dot, expected, ignore_row_order=True, ignore_nullable=True)
    by_udf = typed.select("id", predict_udf(model)().prediction.alias("prediction"))
    assert_df_equality(by_udf, expected, ignore_row_order=True, ignore_nullable=True)


def test_udf_scores_beside_every_type(spark, ctr, typed):
    scored = typed.selectExpr(*COMPARABLE, *CTR).select(
        "*", predict_udf(ctr)(*CTR).prediction.alias("prediction")
    )
    assert_df_equality(
        scored.select("id", "prediction"), scores(spark, ctr), ignore_row_order=True, ignore_nullable=True
    )
    assert scored.count() == 3


@pytest.mark.parametrize("column", ["ts", "d", "v", "ymi", "m"])
def test_a_feature_of_a_non_numeric_type_is_one_sentence(spark, models, typed, column):
    model = resolve(ModelSpec(path=models["torchscript"], input_columns=(column,), num_features=1))
    with pytest.raises(ColumnTypeError, match=f"input column '{column}'"):
        typed.transform(with_predictions(model))


def test_batch_job_scores_a_table_of_every_type(spark, models, typed, tmp_path, capsys):
    src, out = tmp_path / "typed", tmp_path / "out"
    # Parquet stores every type here but the two intervals.
    stored = typed.drop("dti", "ymi")
    stored.write.parquet(str(src))
    cfg = tmp_path / "batch.toml"
    cfg.write_text(
        textwrap.dedent(
            f"""
            [model]
            path = "{models["torchscript"]}"
            name = "ctr"
            input_columns = {list(CTR)!r}

            [input]
            path = "{src}"

            [output]
            path = "{out}"
            """
        ).replace("'", '"')
    )
    assert batch_score.main(["--config", str(cfg)]) == 0, capsys.readouterr().err
    written = spark.read.parquet(str(out))
    keep = [c for c in COMPARABLE if c != "dti" and "ymi" not in c]
    assert rows(written.selectExpr(*keep)) == rows(stored.selectExpr(*keep))
    assert written.filter("error is null").count() == 3
    assert dict(written.dtypes)["ts"] == "timestamp"
    assert written.filter(F.col("ts") == F.lit(dt.datetime(2024, 1, 2, 3, 4, 6, 123456))).count() == 1
