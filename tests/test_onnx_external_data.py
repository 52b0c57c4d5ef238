"""ONNX models whose weights live in an external data file (``model.onnx.data``): the weights are in
the content hash and the version, a missing data file is one sentence, and the job ships both files."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pytest

from udfs import demo, model_cache
from udfs.core import load_scorer, score_batch
from udfs.errors import ModelLoadError
from udfs.spark import ship_model_files, with_predictions
from udfs.spec import ModelSpec, resolve

CTR = demo.CTR_FEATURES


def save_external(module, folder: Path, name: str) -> Path:
    """The CTR model as ONNX with every weight in ``<name>.onnx.data`` beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    inline = demo.save_onnx(module, folder / f"{name}-inline.onnx", len(CTR))
    model = onnx.load(str(inline))
    inline.unlink()
    path = folder / f"{name}.onnx"
    onnx.save_model(
        model, str(path), save_as_external_data=True, location=f"{name}.onnx.data", size_threshold=0
    )
    assert (folder / f"{name}.onnx.data").stat().st_size > 0
    return path


def rows() -> pa.Table:
    x = np.random.default_rng(4).normal(size=(16, len(CTR))) * 10 + 30
    return pa.table({c: x[:, i] for i, c in enumerate(CTR)} | {"id": list(range(16))})


def test_new_weights_in_the_data_file_make_a_new_version(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = demo.ctr_module()
    path = save_external(module, tmp_path / "a", "ctr")
    first = resolve(ModelSpec(path=str(path), input_columns=CTR)).members[0]
    assert first.files == (str(path), str(tmp_path / "a" / "ctr.onnx.data"))
    # Same graph file, other weights: only the .data file differs.
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    other = save_external(module, tmp_path / "b", "ctr")
    assert other.read_bytes() == path.read_bytes()
    second = resolve(ModelSpec(path=str(other), input_columns=CTR)).members[0]
    assert second.content_hash != first.content_hash and second.version != first.version


def test_a_missing_data_file_is_one_sentence_naming_it(tmp_path):
    path = save_external(demo.ctr_module(), tmp_path, "ctr")
    (tmp_path / "ctr.onnx.data").unlink()
    with pytest.raises(ModelLoadError, match=r"external data file '.*ctr\.onnx\.data', which does not exist"):
        resolve(ModelSpec(path=str(path), input_columns=CTR))


@pytest.mark.spark
def test_shipped_model_and_data_files_score_where_the_original_folder_is_gone(spark, tmp_path):
    name = f"ctr{uuid.uuid4().hex[:8]}"  # a file name once per SparkContext
    folder = tmp_path / "models"
    module = demo.ctr_module()
    path = save_external(module, folder, name)
    model = resolve(ModelSpec(path=str(path), input_columns=CTR))
    want = score_batch(rows(), load_scorer(model)).column("prediction").to_pylist()
    model_cache.clear()
    shipped = ship_model_files(spark, model, force=True)
    assert sorted(Path(f).name for f in shipped) == [f"{name}.onnx", f"{name}.onnx.data"]
    spark.range(2).collect()  # a task fetches the shipped files (local mode fetches from the source)
    shutil.rmtree(folder)  # from now on the executors have only what was shipped
    got = (
        spark.createDataFrame(rows().to_pandas())
        .transform(with_predictions(model, keep=["id"]))
        .orderBy("id")
        .collect()
    )
    assert [r["error"] for r in got] == [None] * 16
    assert np.allclose([r["prediction"] for r in got], want, atol=1e-5)
