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
# Every test JVM (the session's, each spark-submit's) lives seconds: C1 alone and the serial GC cut
# its start-up CPU by about a third, and the suite is CPU-bound on 2 cores.
os.environ.setdefault("SPARK_SUBMIT_OPTS", "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")
# The same for the Apache Kafka brokers the tests start (C1 alone: 8.9 -> 5.1 CPU-s for a broker's
# start, five small topics and 20 s idle); the broker keeps its own G1 collector.
os.environ.setdefault("KAFKA_OPTS", "-XX:TieredStopAtLevel=1")

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
def spark(tmp_path_factory):
    """local[2] with Spark's JVM Kafka connector and Delta Lake (build/jars, from ``make jars``) on the
    classpath, Delta's extension and catalog configured.

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
        # Delta Lake (its jars are in build/jars too): the extension and catalog a Delta job gets.
        .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
        .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
        .config("spark.databricks.delta.snapshotPartitions", "2")
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


@pytest.fixture(scope="session")
def onnx_models(models, tmp_path_factory):
    """ONNX models and what they were made from.

    ``ctr``: the demo CTR model exported from torch. ``gbc`` / ``gbc_tensor``: a scikit-learn
    gradient-boosted classifier (3 classes) converted with skl2onnx, with the converter's default
    sequence-of-maps probabilities and with ``zipmap=False``. ``lgbm``: a LightGBM binary
    classifier converted with onnxmltools (default outputs). ``X``: the generated data they were
    fitted on (5 features); the fitted estimators are under ``*_estimator``.
    """
    import lightgbm
    import numpy as np
    import onnxmltools
    from onnxmltools.convert.common.data_types import FloatTensorType as MlFloat
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.ensemble import GradientBoostingClassifier

    from udfs import demo

    out = tmp_path_factory.mktemp("onnx-models")
    rng = np.random.default_rng(5)
    x = rng.normal(size=(400, 5)).astype(np.float32)
    y3 = (x[:, 0] + x[:, 1] * x[:, 2] > 0).astype(int) + (x[:, 3] > 0.8).astype(int)
    gbc = GradientBoostingClassifier(n_estimators=20, max_depth=3, random_state=0).fit(x, y3)
    lgbm = lightgbm.LGBMClassifier(n_estimators=25, num_leaves=8, min_child_samples=5, verbose=-1)
    lgbm.fit(x, (y3 > 0).astype(int))
    paths = {"ctr": str(demo.save_onnx(models["module"], out / "ctr.onnx", 4))}
    features = [("features", FloatTensorType([None, 5]))]
    for name, zipmap in (("gbc", True), ("gbc_tensor", False)):
        onx = to_onnx(gbc, initial_types=features, options={"zipmap": zipmap})
        (out / f"{name}.onnx").write_bytes(onx.SerializeToString())
        paths[name] = str(out / f"{name}.onnx")
    onx = onnxmltools.convert_lightgbm(lgbm, initial_types=[("features", MlFloat([None, 5]))])
    (out / "lgbm.onnx").write_bytes(onx.SerializeToString())
    paths["lgbm"] = str(out / "lgbm.onnx")
    return {**paths, "X": x, "gbc_estimator": gbc, "lgbm_estimator": lgbm}
