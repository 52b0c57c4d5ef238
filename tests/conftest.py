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

# The local brokers (Apache Kafka, Tansu), one each per session for every folder that needs one.
from tests.streaming.brokers import (  # noqa: E402, F401
    apache,
    apache_kafka,
    broker,
    kafka,
    tansu,
    tansu_broker,
)


@pytest.fixture(scope="session")
def spark():
    """local[2] with Spark's JVM Kafka connector (build/jars, from ``make jars``) on the classpath.

    Both Kafka sources are then available in-process; ``source = "auto"`` without the
    connector is tested through spark-submit subprocesses (tests/streaming/test_backends.py).
    """
    from pyspark.sql import SparkSession

    from streaming.backends import local_jars

    session = (
        SparkSession.builder.master("local[2]")
        .config("spark.jars", ",".join(local_jars()))
        .appName("sparkscore-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.python.worker.reuse", "true")
        .config("spark.sql.session.timeZone", "UTC")
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
