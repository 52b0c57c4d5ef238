"""The job on Spark's local-cluster master, with the code shipped the way a cluster gets it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from chispa import assert_approx_df_equality

from udfs import demo
from udfs.core import load_scorer, score_batch
from udfs.spec import ModelSpec, resolve

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.spark]


@pytest.fixture(scope="module")
def package() -> Path:
    """`make package`'s artifact, built fresh from this checkout."""
    subprocess.run(["make", "-s", "package"], cwd=ROOT, check=True, capture_output=True)
    zip_path = ROOT / "dist" / "sparkscore.zip"
    assert zip_path.is_file()
    return zip_path


def executor_python(tmp_path: Path) -> Path:
    """An interpreter like a cluster node's: the dependencies, but not this checkout's code.

    ``-S`` skips site processing, so the editable install's import hook is gone
    and executors can only import sparkscore from the --py-files archive.
    """
    wrapper = tmp_path / "executor-python"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'PYTHONPATH="{sysconfig.get_paths()["purelib"]}${{PYTHONPATH:+:$PYTHONPATH}}" exec {sys.executable} -S "$@"\n'
    )
    wrapper.chmod(0o755)
    probe = subprocess.run([str(wrapper), "-c", "import udfs"], cwd=tmp_path, capture_output=True)
    assert probe.returncode != 0, "the executor interpreter must not see the checkout"
    return wrapper


def test_job_on_local_cluster_with_py_files_scores_and_loads_once_per_executor(spark, package, tmp_path):
    table = demo.synthetic_ctr(3000, seed=5, bad_fraction=0.01)
    pq.write_table(table, tmp_path / "events.parquet", row_group_size=400)
    model_path = demo.save_torchscript(demo.ctr_module(), tmp_path / "ctr.pt")
    cfg = tmp_path / "batch.toml"
    cfg.write_text(
        textwrap.dedent(
            f"""
            [model]
            path = "{model_path}"
            input_columns = ["age", "purchase_count", "price", "category_id"]
            batch_size = 100
            [input]
            path = "{tmp_path / "events.parquet"}"
            [output]
            path = "{tmp_path / "out"}"
            keep_columns = ["user_id"]
            [spark]
            "spark.sql.files.maxPartitionBytes" = "16000"
            """
        )
    )
    py = executor_python(tmp_path)
    env = {
        **os.environ,
        "PYSPARK_PYTHON": str(py),
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "SPARK_WORKER_DIR": str(tmp_path / "work"),
    }
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "spark-submit"),
            "--master",
            "local-cluster[2,1,1024]",
            # The executors are JVMs of their own: the same short-lived-JVM options as the driver's
            # (tests/conftest.py), about a third less CPU to start them.
            "--conf",
            f"spark.executor.extraJavaOptions={os.environ.get('SPARK_SUBMIT_OPTS', '')}",
            "--conf",
            f"spark.pyspark.python={py}",
            "--py-files",
            str(package),
            str(ROOT / "jobs" / "batch_score.py"),
            "--config",
            str(cfg),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rows in: 3,000  out: 3,000" in proc.stdout
    # Two executors, one core each: two Python workers, each loaded the model exactly once.
    assert re.search(r"model loads: 2 across 2 Python workers ", proc.stdout), proc.stdout

    model = resolve(ModelSpec(path=str(model_path), input_columns=demo.CTR_FEATURES))
    preds = score_batch(table, load_scorer(model))
    expected = spark.createDataFrame(
        table.select(["user_id"])
        .to_pandas()
        .assign(**{n: preds.column(n).to_pandas() for n in preds.schema.names})
    )
    actual = spark.read.parquet(str(tmp_path / "out"))
    assert_approx_df_equality(actual, expected, 1e-6, ignore_row_order=True)
