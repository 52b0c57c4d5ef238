"""The batch job over Spark's catalog and file formats: tables, partitions, write modes, options."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from chispa import assert_approx_df_equality, assert_df_equality

from jobs import batch_score
from udfs import demo
from udfs.batch import InputConfig, read_input
from udfs.core import load_scorer, score_batch
from udfs.spec import ModelSpec, resolve

pytestmark = pytest.mark.spark

CTR = list(demo.CTR_FEATURES)
DB = "sparkscore_io"


def config(
    tmp_path: Path, model: str, *, input: str, output: str, version: str = "v1", name: str = "b.toml"
) -> Path:
    cfg = tmp_path / name
    cfg.write_text(
        textwrap.dedent(
            f"""
            [model]
            path = "{model}"
            version = "{version}"
            input_columns = {CTR!r}
            batch_size = 64
            [input]
            {input}
            [output]
            {output}
            """
        ).replace("'", '"')
    )
    return cfg


def run_job(cfg: Path, *args: str) -> int:
    return batch_score.main(["--config", str(cfg), *args])


@pytest.fixture(scope="module")
def events(spark):
    """Two days of demo rows (some bad) as the catalog table sparkscore_io.events."""
    days = [demo.synthetic_ctr(120, seed=s, bad_fraction=0.05) for s in (1, 2)]
    table = pa.concat_tables(
        t.append_column("ds", pa.array([day] * t.num_rows)).set_column(
            0, "user_id", pa.array(range(i * 1000, i * 1000 + t.num_rows), pa.int64())
        )
        for i, (t, day) in enumerate(zip(days, ["d1", "d2"], strict=True))
    )
    spark.sql(f"CREATE DATABASE IF NOT EXISTS {DB}")
    spark.createDataFrame(table).write.mode("overwrite").saveAsTable(f"{DB}.events")
    yield table
    spark.sql(f"DROP DATABASE IF EXISTS {DB} CASCADE")


def expected(spark, table: pa.Table, model_path: str, version: str):
    """The rows scored directly through the core: user_id, ds and the prediction columns."""
    model = resolve(ModelSpec(path=model_path, input_columns=tuple(CTR), version=version))
    preds = score_batch(table, load_scorer(model))
    out = pa.table(
        [table["user_id"], table["ds"], *preds.columns], names=["user_id", "ds", *preds.schema.names]
    )
    return spark.createDataFrame(out).select("user_id", "prediction", "model_version", "error", "ds")


@pytest.mark.parametrize("target", ["table", "path"])
def test_partitioned_output_overwrite_replaces_only_the_partitions_written(
    spark, models, events, tmp_path, target
):
    out = (
        f'table = "{DB}.preds_{target}"'
        if target == "table"
        else f'path = "{tmp_path / "preds"}"\nformat = "orc"'
    )
    out += '\npartition_by = ["ds"]\nkeep_columns = ["user_id", "ds"]\nmode = "overwrite"'
    first = config(tmp_path, models["torchscript"], input=f'table = "{DB}.events"', output=out)
    assert run_job(first) == 0
    second = config(
        tmp_path, models["export"], input=f'table = "{DB}.events"', output=out, version="v2", name="2.toml"
    )
    assert run_job(second, "--where", "ds = 'd2'") == 0

    written = (
        spark.table(f"{DB}.preds_table") if target == "table" else spark.read.orc(str(tmp_path / "preds"))
    )
    d1, d2 = events.filter(pc.equal(events["ds"], "d1")), events.filter(pc.equal(events["ds"], "d2"))
    want = expected(spark, d1, models["torchscript"], "v1").unionByName(
        expected(spark, d2, models["export"], "v2")
    )
    assert_approx_df_equality(written.select(*want.columns), want, 1e-6, ignore_row_order=True)
    if target == "table":
        partitions = [c.name for c in spark.catalog.listColumns(f"{DB}.preds_table") if c.isPartition]
        assert partitions == ["ds"]


def poisoned_view(spark, path: Path, name: str) -> str:
    """A temporary view of the parquet at ``path`` whose read fails a task on the row with age 666
    (the scoring core turns model errors into row errors, so the failure comes from Spark)."""
    from pyspark.sql import functions as F

    df = spark.read.parquet(str(path))
    age = F.when(F.col("age") == 666.0, F.raise_error(F.lit("poisoned row"))).otherwise(F.col("age"))
    df.withColumn("age", age.cast("double")).createOrReplaceTempView(name)
    return name


@pytest.mark.parametrize("target", ["path", "table"])
def test_unpartitioned_overwrite_that_fails_leaves_the_old_output_whole(spark, models, tmp_path, target):
    rows = [(i, 30.0 + i, 1.0, 5.0, 1.0) for i in range(20)]
    schema = "user_id long, age double, purchase_count double, price double, category_id double"
    spark.createDataFrame(rows, schema).write.parquet(str(tmp_path / "good"))
    spark.createDataFrame([*rows, (99, 666.0, 1.0, 1.0, 1.0)], schema).write.parquet(str(tmp_path / "bad"))
    name = f"{DB}.overwritten_{target}"
    out = f'table = "{name}"' if target == "table" else f'path = "{tmp_path / "preds"}"'
    out += '\nkeep_columns = ["user_id"]\nmode = "overwrite"'
    good = config(tmp_path, models["torchscript"], input=f'path = "{tmp_path / "good"}"', output=out)
    spark.sql(f"CREATE DATABASE IF NOT EXISTS {DB}")
    assert run_job(good) == 0

    def read():
        return spark.table(name) if target == "table" else spark.read.parquet(str(tmp_path / "preds"))

    before = sorted(read().collect())
    assert len(before) == 20
    view = poisoned_view(spark, tmp_path / "bad", f"poisoned_{target}")
    bad = config(tmp_path, models["torchscript"], input=f'table = "{view}"', output=out, name="bad.toml")
    with pytest.raises(Exception, match="poisoned row"):
        run_job(bad)
    if target == "table":
        spark.catalog.refreshTable(name)
    assert sorted(read().collect()) == before
    # Nothing staged is left beside the output.
    parent = (
        tmp_path
        if target == "path"
        else Path(spark.conf.get("spark.sql.warehouse.dir").removeprefix("file:"))
    )
    assert not [p.name for p in parent.rglob("*sparkscore-*")]
    # A run that succeeds replaces the output whole.
    again = config(
        tmp_path,
        models["torchscript"],
        input=f'path = "{tmp_path / "good"}"',
        output=out,
        name="again.toml",
        version="v2",
    )
    assert run_job(again) == 0
    assert read().count() == 20 and read().filter("error is not null").count() == 0
    assert {r["model_version"] for r in read().collect()} == {"v2"}


def test_append_adds_rows_to_an_existing_table(spark, models, events, tmp_path, capsys):
    out = f'table = "{DB}.appended"\nkeep_columns = ["user_id", "ds"]'
    cfg = config(tmp_path, models["torchscript"], input=f'table = "{DB}.events"', output=out)
    assert run_job(cfg, "--where", "ds = 'd1'") == 0
    assert run_job(cfg) == 2  # the default mode never writes into an existing table
    assert f"output table '{DB}.appended' already exists; set mode = 'overwrite'" in capsys.readouterr().err
    assert run_job(cfg, "--where", "ds = 'd2'", "--mode", "append") == 0
    want = expected(spark, events, models["torchscript"], "v1")
    assert_approx_df_equality(
        spark.table(f"{DB}.appended").select(*want.columns), want, 1e-6, ignore_row_order=True
    )


def test_file_formats_are_read_with_their_options_and_schema(spark, tmp_path):
    rows = spark.createDataFrame([(1, 30.0, "a"), (2, 41.5, "b")], "id long, age double, tag string")
    rows.write.option("header", True).option("sep", ";").csv(str(tmp_path / "csv"))
    rows.write.json(str(tmp_path / "json"))
    rows.write.orc(str(tmp_path / "orc"))
    rows.write.parquet(str(tmp_path / "parquet"))
    schema = "id long, age double, tag string"
    sources = [
        InputConfig(
            path=str(tmp_path / "csv"), format="csv", options={"header": True, "sep": ";"}, schema=schema
        ),
        InputConfig(path=str(tmp_path / "json"), format="json", schema=schema),
        InputConfig(path=str(tmp_path / "orc"), format="orc"),
        InputConfig(path=str(tmp_path / "parquet")),
    ]
    for source in sources:
        assert_df_equality(read_input(spark, source), rows, ignore_row_order=True)
    filtered = read_input(spark, InputConfig(path=str(tmp_path / "orc"), format="orc", where="age > 40"))
    assert [r.id for r in filtered.collect()] == [2]


@pytest.mark.parametrize(
    ("input", "output", "message"),
    [
        (
            f'table = "{DB}.nope"',
            'path = "OUT"',
            rf"input table '{DB}.nope' does not exist; tables there: \[.*'{DB}.events'",
        ),
        ('path = "IN"\nformat = "avroish"', 'path = "OUT"', "input format 'avroish' is not available"),
        (
            f'table = "{DB}.events"\nwhere = "no_such_column > 1"',
            'path = "OUT"',
            r"\[input\] where 'no_such_column > 1' is not a filter on the input: .*no_such_column",
        ),
        (
            f'table = "{DB}.events"',
            'path = "OUT"\npartition_by = ["ds"]\nkeep_columns = ["user_id"]',
            r"partition_by \['ds'\] are not among the output columns",
        ),
        (
            f'table = "{DB}.events"',
            f'table = "{DB}.events"\nmode = "append"',
            rf"output table '{DB}.events' has columns .* but the run writes",
        ),
        (
            f'table = "{DB}.events"\nformat = "csv"',
            'path = "OUT"',
            "format and options apply to a path input",
        ),
    ],
    ids=[
        "missing-table",
        "unknown-format",
        "bad-where",
        "partition-not-kept",
        "table-columns",
        "table-format",
    ],
)
def test_table_and_format_mistakes_stop_before_scoring_with_one_sentence(
    models, events, tmp_path, capsys, input, output, message
):
    (tmp_path / "IN").mkdir()
    cfg = config(
        tmp_path,
        models["torchscript"],
        input=input.replace("IN", str(tmp_path / "IN")),
        output=output.replace("OUT", str(tmp_path / "out")),
    )
    assert run_job(cfg) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(message, err), err
    assert err.startswith("[sparkscore] error:") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
