"""The batch job on Delta Lake: paths and catalog tables in and out, atomic overwrite, replace_where,
MERGE by key (a rerun changes nothing), time travel, and the mistakes it refuses with one sentence."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest
from chispa import assert_approx_df_equality

from jobs import batch_score
from udfs import demo
from udfs.core import load_scorer, score_batch
from udfs.spec import ModelSpec, resolve

pytestmark = pytest.mark.spark

ROOT = Path(__file__).resolve().parents[1]
CTR = list(demo.CTR_FEATURES)
DB = "sparkscore_delta"


def config(
    tmp_path: Path, model: str, *, input: str, output: str, name: str = "d.toml", version="v1"
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


def events(n: int, start: int = 0, seed: int = 1, ds: str = "d1") -> pa.Table:
    t = demo.synthetic_ctr(n, seed=seed, bad_fraction=0.05)
    t = t.set_column(0, "user_id", pa.array(range(start, start + n), pa.int64()))
    return t.append_column("ds", pa.array([ds] * n))


def expected(spark, table: pa.Table, model_path: str, version: str = "v1"):
    model = resolve(ModelSpec(path=model_path, input_columns=tuple(CTR), version=version))
    preds = score_batch(table, load_scorer(model))
    out = pa.table(
        [table["user_id"], table["ds"], *preds.columns], names=["user_id", "ds", *preds.schema.names]
    )
    return spark.createDataFrame(out).select("user_id", "ds", "prediction", "model_version", "error")


def write_delta(spark, table: pa.Table, path: Path, mode: str = "errorifexists") -> None:
    spark.createDataFrame(table).write.format("delta").mode(mode).save(str(path))


def history(spark, path: Path) -> list[str]:
    return [
        r["operation"] for r in spark.sql(f"DESCRIBE HISTORY delta.`{path}`").orderBy("version").collect()
    ]


KEEP = 'keep_columns = ["user_id", "ds"]'


def poisoned(t: pa.Table) -> pa.Table:
    i = t.schema.get_field_index("age")
    return t.set_column(i, "age", pa.array([666.0] * t.num_rows, t.schema.field(i).type))


def test_delta_path_in_and_out_with_append_and_an_atomic_overwrite(spark, models, tmp_path):
    first, more = events(40), events(20, start=100, seed=2)
    write_delta(spark, first, tmp_path / "in")
    out = f'path = "{tmp_path / "out"}"\nformat = "delta"\n{KEEP}'
    cfg = config(
        tmp_path, models["torchscript"], input=f'path = "{tmp_path / "in"}"\nformat = "delta"', output=out
    )
    assert run_job(cfg) == 0
    write_delta(spark, more, tmp_path / "in", "append")
    assert run_job(cfg, "--where", "user_id >= 100", "--mode", "append") == 0
    written = spark.read.format("delta").load(str(tmp_path / "out"))
    want = expected(spark, pa.concat_tables([first, more]), models["torchscript"])
    assert_approx_df_equality(written.select(*want.columns), want, 1e-6, ignore_row_order=True)
    assert history(spark, tmp_path / "out") == ["WRITE", "WRITE"]

    # A failing overwrite commits nothing: the table stays at its version, rows unchanged.
    write_delta(spark, poisoned(events(1, start=999, seed=3)), tmp_path / "in", "append")
    from pyspark.sql import functions as F

    age = F.when(F.col("age") == 666.0, F.raise_error(F.lit("poisoned row"))).otherwise(F.col("age"))
    spark.read.format("delta").load(str(tmp_path / "in")).withColumn(
        "age", age.cast("double")
    ).createOrReplaceTempView("poisoned_in")
    bad = config(tmp_path, models["torchscript"], input='table = "poisoned_in"', output=out, name="bad.toml")
    before = sorted(written.collect())
    with pytest.raises(Exception, match="poisoned row"):
        run_job(bad, "--mode", "overwrite")
    assert sorted(spark.read.format("delta").load(str(tmp_path / "out")).collect()) == before
    assert history(spark, tmp_path / "out") == ["WRITE", "WRITE"]
    # And one that succeeds replaces the table in one commit.
    assert run_job(cfg, "--mode", "overwrite", "--where", "user_id < 10") == 0
    assert spark.read.format("delta").load(str(tmp_path / "out")).count() == 10
    assert spark.read.format("delta").option("versionAsOf", 1).load(str(tmp_path / "out")).count() == 60


def test_replace_where_rescoring_one_day_leaves_the_others(spark, models, tmp_path):
    days = pa.concat_tables([events(30, ds="d1"), events(30, start=100, seed=2, ds="d2")])
    write_delta(spark, days, tmp_path / "in")
    inp = f'path = "{tmp_path / "in"}"\nformat = "delta"'
    out = f'path = "{tmp_path / "out"}"\nformat = "delta"\npartition_by = ["ds"]\n{KEEP}'
    assert run_job(config(tmp_path, models["torchscript"], input=inp, output=out)) == 0
    rescore = config(
        tmp_path,
        models["export"],
        input=inp + '\nwhere = "ds = \\u0027d2\\u0027"',
        output=out + '\nreplace_where = "ds = \\u0027d2\\u0027"',
        name="2.toml",
        version="v2",
    )
    assert run_job(rescore) == 0
    assert run_job(rescore) == 0  # a rerun: the same rows again
    written = spark.read.format("delta").load(str(tmp_path / "out"))
    d1, d2 = days.slice(0, 30), days.slice(30)
    want = expected(spark, d1, models["torchscript"]).unionByName(expected(spark, d2, models["export"], "v2"))
    assert_approx_df_equality(written.select(*want.columns), want, 1e-6, ignore_row_order=True)


def test_merge_on_upserts_by_key_and_a_rerun_changes_nothing(spark, models, tmp_path):
    base = events(50)
    write_delta(spark, base, tmp_path / "in")
    inp = f'path = "{tmp_path / "in"}"\nformat = "delta"'
    out = f'path = "{tmp_path / "out"}"\nformat = "delta"\nmerge_on = ["user_id"]\n{KEEP}'
    assert run_job(config(tmp_path, models["torchscript"], input=inp, output=out)) == 0
    # Rescore half the keys with a new model version, plus 5 new keys.
    changed = pa.concat_tables([base.slice(25), events(5, start=500, seed=4)])
    write_delta(spark, changed, tmp_path / "in2")
    second = config(
        tmp_path,
        models["export"],
        input=f'path = "{tmp_path / "in2"}"\nformat = "delta"',
        output=out,
        name="2.toml",
        version="v2",
    )
    assert run_job(second) == 0
    target = tmp_path / "out"
    rows = sorted(spark.read.format("delta").load(str(target)).collect())
    assert run_job(second) == 0  # the same run again
    assert sorted(spark.read.format("delta").load(str(target)).collect()) == rows
    want = expected(spark, base.slice(0, 25), models["torchscript"]).unionByName(
        expected(spark, changed, models["export"], "v2")
    )
    written = spark.read.format("delta").load(str(target))
    assert_approx_df_equality(written.select(*want.columns), want, 1e-6, ignore_row_order=True)
    assert history(spark, target) == ["WRITE", "MERGE", "MERGE"]


def test_catalog_delta_tables_in_and_out_and_time_travel(spark, models, tmp_path):
    spark.sql(f"CREATE DATABASE IF NOT EXISTS {DB}")
    try:
        spark.createDataFrame(events(20)).write.format("delta").saveAsTable(f"{DB}.events")
        spark.createDataFrame(events(30, start=100, seed=2)).write.format("delta").mode("append").saveAsTable(
            f"{DB}.events"
        )
        inp = f'table = "{DB}.events"\nformat = "delta"\nversion_as_of = 0'
        out = f'table = "{DB}.scores"\nformat = "delta"\n{KEEP}'
        assert run_job(config(tmp_path, models["torchscript"], input=inp, output=out)) == 0
        assert spark.table(f"{DB}.scores").count() == 20  # version 0 had 20 rows
        info = spark.sql(f"DESCRIBE DETAIL {DB}.scores").first()
        assert info["format"] == "delta"
        # Merge the whole current table (30 new keys) into the catalog table.
        merge = config(
            tmp_path,
            models["torchscript"],
            input=f'table = "{DB}.events"',
            output=f'table = "{DB}.scores"\nmerge_on = ["user_id"]\n{KEEP}',
            name="m.toml",
        )
        assert run_job(merge) == 0
        assert spark.table(f"{DB}.scores").count() == 50
    finally:
        spark.sql(f"DROP DATABASE IF EXISTS {DB} CASCADE")


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (
            lambda p: ("version_as_of = 7", 'merge_on = ["user_id"]'),
            r"input '.*' has no version_as_of = 7: Cannot time travel Delta table to version 7",
        ),
        (lambda p: ("", 'merge_on = ["nope"]'), r"merge_on \['nope'\] are not among the output columns"),
        (
            lambda p: ("", 'merge_on = ["ds"]\nkeep_columns = ["user_id", "ds", "age"]'),
            r"merge_on \['ds'\] are not columns of the target",
        ),
        (lambda p: ("incremental = true", ""), "an incremental run needs checkpoint"),
    ],
    ids=["missing-version", "merge-key-not-written", "merge-key-not-in-target", "incremental-no-checkpoint"],
)
def test_delta_mistakes_are_one_sentence_and_write_nothing(spark, models, tmp_path, capsys, setup, message):
    write_delta(spark, events(10), tmp_path / "in")
    # A target that exists, of other columns than the run writes for the key check.
    spark.createDataFrame([(1, "x")], "user_id long, other string").write.format("delta").save(
        str(tmp_path / "out")
    )
    inp_extra, out_extra = setup(tmp_path)
    keep = "" if "keep_columns" in out_extra else KEEP
    cfg = config(
        tmp_path,
        models["torchscript"],
        input=f'path = "{tmp_path / "in"}"\nformat = "delta"\n{inp_extra}',
        output=f'path = "{tmp_path / "out"}"\nformat = "delta"\n{out_extra}\n{keep}',
    )
    assert run_job(cfg) == 2
    err = capsys.readouterr().err.strip()
    assert re_search(message, err), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert history(spark, tmp_path / "out") == ["WRITE"]


def re_search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None


@pytest.mark.slow
def test_delta_without_its_jars_is_one_sentence_naming_the_package(models, tmp_path):
    out = tmp_path / "out"
    cfg = config(
        tmp_path,
        models["torchscript"],
        input=f'path = "{tmp_path / "missing-ok"}"\nformat = "delta"',
        output=f'path = "{out}"\nformat = "delta"',
    )
    (tmp_path / "missing-ok").mkdir()
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "spark-submit"), "--master", "local[1]", str(ROOT / "jobs" / "batch_score.py"),
         "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "[sparkscore] error" in line]
    assert lines and "--packages io.delta:delta-spark_2.13:4.4.0" in lines[0], proc.stderr[-2000:]
    assert not out.exists()


def test_incremental_runs_score_only_the_new_rows_and_say_how_many(spark, models, tmp_path, capsys):
    first = events(40)
    write_delta(spark, first, tmp_path / "in")
    inp = f'path = "{tmp_path / "in"}"\nformat = "delta"\ncheckpoint = "{tmp_path / "ckpt"}"'
    out = f'path = "{tmp_path / "out"}"\nformat = "delta"\n{KEEP}'
    cfg = config(tmp_path, models["torchscript"], input=inp, output=out)
    assert run_job(cfg, "--incremental") == 0
    assert "incremental: 40 new rows since the last run" in capsys.readouterr().out
    more = events(4, start=100, seed=2)
    write_delta(spark, more, tmp_path / "in", "append")
    assert run_job(cfg, "--incremental") == 0
    assert "incremental: 4 new rows since the last run" in capsys.readouterr().out
    assert run_job(cfg, "--incremental") == 0  # nothing new: nothing written
    assert "incremental: 0 new rows since the last run (0 micro-batches)" in capsys.readouterr().out
    written = spark.read.format("delta").load(str(tmp_path / "out"))
    want = expected(spark, pa.concat_tables([first, more]), models["torchscript"])
    assert_approx_df_equality(written.select(*want.columns), want, 1e-6, ignore_row_order=True)
    assert history(spark, tmp_path / "out") == ["WRITE", "WRITE"]

    # The same checkpoint for another table: one sentence, nothing read or written.
    write_delta(spark, events(5, seed=9), tmp_path / "other")
    other = config(
        tmp_path,
        models["torchscript"],
        input=inp.replace(str(tmp_path / "in"), str(tmp_path / "other")),
        output=out,
        name="other.toml",
    )
    assert run_job(other, "--incremental") == 2
    err = capsys.readouterr().err.strip()
    assert f"incremental checkpoint '{tmp_path / 'ckpt'}' belongs to input '{tmp_path / 'in'}'" in err, err
    assert len(err.splitlines()) == 1
    assert history(spark, tmp_path / "out") == ["WRITE", "WRITE"]
