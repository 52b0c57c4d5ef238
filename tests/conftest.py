"""Shared fixtures: one local SparkSession for the whole run, and small demo models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Workers must run this interpreter (the venv's), or they cannot import torch/pyarrow.
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("sparkscore-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.python.worker.reuse", "true")
        .config("spark.sql.session.timeZone", "UTC")
        # Spark's own catalog, with its tables in a throwaway warehouse folder.
        .config("spark.sql.warehouse.dir", str(tmp_path_factory.mktemp("warehouse")))
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """The demo CTR model saved as TorchScript and torch.export, plus an array-input classifier."""
    import torch

    from udfs import demo

    out = tmp_path_factory.mktemp("models")
    ctr = demo.ctr_module()
    torch.manual_seed(3)
    clf = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    return {
        "module": ctr,
        "torchscript": str(demo.save_torchscript(ctr, out / "ctr.pt")),
        "export": str(demo.save_export(ctr, out / "ctr.pt2", 4)),
        "classifier_module": clf,
        "classifier": str(demo.save_torchscript(clf, out / "clf.pt")),
    }
