"""jobs/batch_score.py end to end: summaries, clear errors, quarantine, error-rate limit, write modes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from chispa import assert_approx_df_equality

from jobs import batch_score
from udfs import demo
from udfs.core import load_scorer, score_batch
from udfs.spec import ModelSpec, resolve

ROOT = Path(__file__).resolve().parents[1]
CTR = list(demo.CTR_FEATURES)


def write_config(
    tmp_path: Path, model: str, *, extra: str = "", model_extra: str = "", output: str | None = None
) -> Path:
    cfg = tmp_path / "batch.toml"
    cfg.write_text(
        textwrap.dedent(
            f"""
            [model]
            path = "{model}"
            name = "ctr"
            input_columns = {CTR!r}
            batch_size = 64
            {model_extra}

            [input]
            path = "{tmp_path / "events.parquet"}"

            [output]
            path = "{output or tmp_path / "out"}"
            keep_columns = ["user_id"]
            {extra}
            """
        ).replace("'", '"')
    )
    return cfg


@pytest.fixture
def table(tmp_path) -> pa.Table:
    t = demo.synthetic_ctr(300, seed=11, bad_fraction=0.05)
    pq.write_table(t, tmp_path / "events.parquet")
    return t


def expected_frame(spark, table: pa.Table, model_path: str):
    """The same rows scored directly through the core, as a Spark frame."""
    model = resolve(ModelSpec(path=model_path, input_columns=tuple(CTR), name="ctr"))
    preds = score_batch(table, load_scorer(model))
    out = pa.table([table["user_id"], *preds.columns], names=["user_id", *preds.schema.names])
    return spark.createDataFrame(out.to_pandas()).select("user_id", "prediction", "model_version", "error")


def run_job(*args: str) -> int:
    return batch_score.main(list(args))


@pytest.mark.spark
def test_job_writes_one_prediction_per_row_equal_to_the_core(spark, models, table, tmp_path, capsys):
    cfg = write_config(tmp_path, models["torchscript"])
    assert run_job("--config", str(cfg)) == 0
    summary = capsys.readouterr().out
    expected = expected_frame(spark, table, models["torchscript"])
    bad = expected.filter("error is not null").count()
    assert bad > 0
    assert f"rows in: {table.num_rows:,}" in summary and f"errors: {bad:,}" in summary
    actual = spark.read.parquet(str(tmp_path / "out"))
    assert_approx_df_equality(actual, expected, 1e-6, ignore_row_order=True)


@pytest.mark.spark
def test_quarantine_holds_exactly_the_bad_rows_with_reasons(spark, models, table, tmp_path):
    cfg = write_config(tmp_path, models["torchscript"])
    assert run_job("--config", str(cfg), "--quarantine", str(tmp_path / "q")) == 0
    q = spark.read.parquet(str(tmp_path / "q"))
    out = spark.read.parquet(str(tmp_path / "out"))
    assert q.count() == out.filter("error is not null").count() > 0
    assert q.filter("error is null or prediction is not null").count() == 0
    assert set(q.columns) >= {"user_id", "error"}


@pytest.mark.spark
def test_quarantine_mode_still_checks_the_columns_to_keep(models, table, tmp_path, capsys):
    cfg = write_config(tmp_path, models["torchscript"])
    cfg.write_text(
        cfg.read_text().replace('keep_columns = ["user_id"]', 'keep_columns = ["user_id", "nope"]')
    )
    assert run_job("--config", str(cfg), "--quarantine", str(tmp_path / "q")) == 2
    err = capsys.readouterr().err.strip()
    assert "columns to keep ['nope'] are not in the data" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "q").exists() and not (tmp_path / "out").exists()


@pytest.mark.spark
def test_arrow_batches_follow_their_own_option_not_the_model_batch_size(spark, models, table, tmp_path):
    key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    before = spark.conf.get(key)
    try:
        cfg = write_config(tmp_path, models["torchscript"])  # batch_size = 64
        assert run_job("--config", str(cfg)) == 0
        assert spark.conf.get(key) == "10000"
        cfg.write_text(cfg.read_text() + "\n[job]\narrow_batch_rows = 700\n")
        assert run_job("--config", str(cfg), "--mode", "overwrite") == 0
        assert spark.conf.get(key) == "700"
    finally:
        spark.conf.set(key, before)


@pytest.mark.spark
def test_error_rate_above_limit_fails_and_writes_nothing(models, table, tmp_path, capsys):
    cfg = write_config(tmp_path, models["torchscript"])
    assert run_job("--config", str(cfg), "--max-error-rate", "0.001") == 2
    err = capsys.readouterr().err
    assert "above --max-error-rate 0.10%" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.spark
def test_error_rate_above_limit_still_writes_the_quarantine_and_says_where(
    spark, models, table, tmp_path, capsys
):
    cfg = write_config(tmp_path, models["torchscript"])
    q = tmp_path / "q"
    assert run_job("--config", str(cfg), "--max-error-rate", "0.001", "--quarantine", str(q)) == 2
    err = capsys.readouterr().err
    assert f"nothing was written to the output (the bad rows, with their reasons, are in {q})" in err
    assert not (tmp_path / "out").exists()
    bad = expected_frame(spark, table, models["torchscript"]).filter("error is not null")
    assert_approx_df_equality(
        spark.read.parquet(str(q)).select(*bad.columns), bad, 1e-6, ignore_row_order=True
    )


@pytest.mark.spark
def test_cuda_on_a_host_without_cuda_is_one_sentence_before_any_data_and_leaves_nothing(
    models, table, tmp_path, capsys
):
    import torch

    assert not torch.cuda.is_available(), "this test needs a host without CUDA"
    cfg = write_config(tmp_path, models["torchscript"], model_extra="device = 'cuda'")
    assert run_job("--config", str(cfg)) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(
        r"\[sparkscore\] error: device 'cuda' was requested but CUDA is not available on this host "
        r"\((a CPU-only torch build|no GPU or CUDA driver found)\); set device = 'auto' or 'cpu' in "
        r"\[model\], or run where a GPU is",
        err,
    ), err
    assert not (tmp_path / "out").exists()
    # The rerun with the fix is not stopped by a leftover output folder.
    fixed = write_config(tmp_path, models["torchscript"], model_extra="device = 'auto'")
    assert run_job("--config", str(fixed)) == 0


@pytest.mark.spark
def test_array_column_without_num_features_asks_for_num_features(models, tmp_path, capsys):
    pq.write_table(
        pa.table({"user_id": [1], "features": pa.array([[1.0, 2.0, 3.0, 4.0]])}), tmp_path / "events.parquet"
    )
    cfg = tmp_path / "arr.toml"
    cfg.write_text(
        write_config(tmp_path, models["torchscript"])
        .read_text()
        .replace(str(CTR).replace("'", '"'), '["features"]')
    )
    assert run_job("--config", str(cfg)) == 2
    err = capsys.readouterr().err
    assert "input column 'features' is an array: set num_features in [model] to its fixed length" in err


@pytest.mark.spark
def test_error_rate_under_limit_passes(models, table, tmp_path):
    cfg = write_config(tmp_path, models["torchscript"])
    assert run_job("--config", str(cfg), "--max-error-rate", "0.5") == 0


@pytest.mark.spark
def test_existing_output_is_refused_by_default_and_replaced_with_overwrite(
    spark, models, table, tmp_path, capsys
):
    cfg = write_config(tmp_path, models["torchscript"])
    (tmp_path / "out").mkdir()
    assert run_job("--config", str(cfg)) == 2
    assert "already exists; pass --mode overwrite" in capsys.readouterr().err
    assert run_job("--config", str(cfg), "--mode", "overwrite") == 0
    assert spark.read.parquet(str(tmp_path / "out")).count() == table.num_rows


@pytest.mark.spark
def test_missing_input_columns_stop_the_job_naming_existing_columns(spark, models, tmp_path, capsys):
    pq.write_table(pa.table({"user_id": [1], "age": [3.0]}), tmp_path / "events.parquet")
    cfg = write_config(tmp_path, models["torchscript"])
    assert run_job("--config", str(cfg)) == 2
    err = capsys.readouterr().err
    assert "input columns ['purchase_count', 'price', 'category_id'] are not in the data" in err
    assert "['user_id', 'age']" in err


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p, m: write_config(p, str(p / "missing.pt")), "model file .* does not exist"),
        (lambda p, m: write_config(p, _corrupt(p)), "could not be loaded as a torchscript program"),
        (
            lambda p, m: write_config(p, m, extra="colour = 'red'"),
            r"unknown key\(s\) \['colour'\] in \[batch config.output\]",
        ),
        (lambda p, m: write_config(p, m, model_extra="cache_size = 'big'"), "cache_size must be an integer"),
        (lambda p, m: _no_input(write_config(p, m)), "input path .* does not exist"),
    ],
    ids=["missing-model", "corrupt-model", "unknown-key", "wrong-type", "missing-input"],
)
def test_user_mistakes_stop_before_scoring_with_one_sentence(models, table, tmp_path, capsys, setup, message):
    import re

    cfg = setup(tmp_path, models["torchscript"])
    assert run_job("--config", str(cfg)) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(message, err), err
    assert err.startswith("[sparkscore] error:") and "Traceback" not in err and len(err.splitlines()) == 1


def _corrupt(p: Path) -> str:
    bad = p / "corrupt.pt"
    bad.write_bytes(b"\x00" * 64)
    return str(bad)


def _no_input(cfg: Path) -> Path:
    (cfg.parent / "events.parquet").unlink()
    return cfg


@pytest.mark.slow
@pytest.mark.spark
def test_spark_submit_runs_the_job_on_a_small_table(spark, models, table, tmp_path):
    cfg = write_config(tmp_path, models["export"])
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    spark_submit = Path(sys.executable).parent / "spark-submit"
    proc = subprocess.run(
        [
            str(spark_submit),
            "--master",
            "local[2]",
            str(ROOT / "jobs" / "batch_score.py"),
            "--config",
            str(cfg),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"rows in: {table.num_rows:,}" in proc.stdout
    actual = spark.read.parquet(str(tmp_path / "out"))
    assert_approx_df_equality(
        actual, expected_frame(spark, table, models["export"]), 1e-6, ignore_row_order=True
    )


@pytest.mark.slow
@pytest.mark.spark
def test_under_spark_submit_the_error_sentence_goes_to_stderr_and_the_exit_code_is_2(models, table, tmp_path):
    cfg = write_config(tmp_path, models["torchscript"], model_extra="device = 'cuda'")
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "spark-submit"),
            "--master",
            "local[1]",
            str(ROOT / "jobs" / "batch_score.py"),
            "--config",
            str(cfg),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "[sparkscore] error: device 'cuda' was requested" in proc.stderr
    assert "[sparkscore] error" not in proc.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.spark
def test_job_scores_an_ensemble_config_with_member_outputs(spark, models, table, tmp_path):
    cfg = tmp_path / "ens.toml"
    cfg.write_text(
        textwrap.dedent(
            f"""
            [model]
            name = "ctr_ens"
            input_columns = {CTR!r}
            combiner = "weighted_mean"
            [[model.members]]
            path = "{models["torchscript"]}"
            name = "ts"
            weight = 1.0
            [[model.members]]
            path = "{models["export"]}"
            name = "ep"
            weight = 3.0
            [input]
            path = "{tmp_path / "events.parquet"}"
            [output]
            path = "{tmp_path / "out"}"
            keep_columns = ["user_id"]
            """
        ).replace("'", '"')
    )
    assert run_job("--config", str(cfg), "--member-outputs") == 0
    out = spark.read.parquet(str(tmp_path / "out"))
    assert {"member_ts", "member_ep", "degraded"} <= set(out.columns)
    single = expected_frame(spark, table, models["torchscript"]).select("user_id", "prediction")
    # Both members are the same network, so the weighted mean equals either one.
    joined = out.join(single.withColumnRenamed("prediction", "single"), "user_id")
    assert joined.filter("abs(prediction - single) > 1e-6 or abs(member_ep - single) > 1e-6").count() == 0
    assert out.select("model_version").distinct().first()[0].startswith("ens-")


def test_member_outputs_on_a_single_model_is_a_clear_error(models, table, tmp_path, capsys):
    cfg = write_config(tmp_path, models["torchscript"])
    assert run_job("--config", str(cfg), "--member-outputs") == 2
    assert "--member-outputs applies to ensembles" in capsys.readouterr().err
