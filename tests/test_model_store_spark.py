"""A registry model through Spark: resolved on the driver, fetched by executors from the artifact
location (never the registry), its version in every row and in the batch job's summary."""

from __future__ import annotations

import shutil
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import batch_score
from udfs import demo, mlflow_demo, model_cache, model_store
from udfs.core import load_scorer, score_batch
from udfs.spark import with_predictions
from udfs.spec import ModelSpec, resolve

pytestmark = pytest.mark.spark
CTR = demo.CTR_FEATURES


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    mlflow_demo.log_pytorch(demo.ctr_module(0), root, alias="champion")
    return {"root": root, "uri": mlflow_demo.registry_uri(root)}


def test_executors_score_a_registry_model_without_asking_the_registry(spark, registry, tmp_path):
    spec = ModelSpec(
        path="models:/demo_ctr@champion",
        input_columns=CTR,
        registry_uri=registry["uri"],
        cache_dir=str(tmp_path / "cache"),
        device="cpu",
    )
    model = resolve(spec)
    # The registry goes away after the driver resolved the model: executors must not need it.
    db = registry["root"] / "mlflow.db"
    shutil.move(db, tmp_path / "mlflow.db.away")
    try:
        table = demo.synthetic_ctr(200, seed=3, bad_fraction=0.05)
        got = spark.createDataFrame(table.to_pandas()).transform(with_predictions(model)).toPandas()
    finally:
        shutil.move(tmp_path / "mlflow.db.away", db)
    model_cache.clear()
    model_store.forget()
    expected = score_batch(table, load_scorer(model)).to_pandas()
    got = got.sort_values("user_id").reset_index(drop=True)
    np.testing.assert_allclose(got["prediction"].fillna(-1), expected["prediction"].fillna(-1), rtol=1e-6)
    assert set(got["model_version"]) == {model.version}
    assert model.version.startswith("1+")


def test_batch_job_with_a_models_uri_reports_the_resolved_version(spark, registry, tmp_path, capsys):
    pq.write_table(demo.synthetic_ctr(100, seed=5), tmp_path / "events.parquet")
    cfg = tmp_path / "batch.toml"
    cfg.write_text(
        textwrap.dedent(
            f"""
            [model]
            path = "build/demo/ctr.pt"
            input_columns = {list(CTR)!r}
            registry_uri = "{registry["uri"]}"
            cache_dir = "{tmp_path / "cache"}"

            [input]
            path = "{tmp_path / "events.parquet"}"

            [output]
            path = "{tmp_path / "out"}"
            """
        ).replace("'", '"')
    )
    assert batch_score.main(["--config", str(cfg), "--model", "models:/demo_ctr@champion"]) == 0
    out = capsys.readouterr().out
    version = pq.read_table(tmp_path / "out")["model_version"].unique().to_pylist()
    assert len(version) == 1 and version[0].startswith("1+")
    assert f"[sparkscore] model version: {version[0]} (models:/demo_ctr@champion (version 1, " in out


def test_batch_job_with_an_unknown_alias_exits_2_before_reading_data(registry, tmp_path, capsys):
    cfg = tmp_path / "batch.toml"
    cfg.write_text(
        textwrap.dedent(
            f"""
            [model]
            path = "models:/demo_ctr@nope"
            input_columns = {list(CTR)!r}
            registry_uri = "{registry["uri"]}"

            [input]
            path = "{tmp_path / "never-read.parquet"}"

            [output]
            path = "{tmp_path / "out"}"
            """
        ).replace("'", '"')
    )
    pq.write_table(pa.table({"x": [1]}), tmp_path / "never-read.parquet")
    assert batch_score.main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no alias 'nope'" in err[0]
    assert not (tmp_path / "out").exists()
