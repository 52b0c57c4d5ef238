"""The scoring core without Spark: feature extraction, bad-row reasons, model cache, outputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from udfs import model_cache
from udfs.core import check_model, load_scorer, score_batch
from udfs.errors import ConfigError, ModelLoadError
from udfs.features import extract_features
from udfs.spec import ModelSpec, resolve

CTR = ("age", "purchase_count", "price", "category_id")


def ctr_spec(path: str, **kw) -> ModelSpec:
    return ModelSpec(path=path, input_columns=CTR, name="ctr", **kw)


def direct(module, rows) -> np.ndarray:
    with torch.no_grad():
        return module(torch.tensor(rows, dtype=torch.float32)).numpy().reshape(-1)


@pytest.mark.parametrize("fmt", ["torchscript", "export"])
def test_score_batch_matches_direct_torch_for_both_formats(models, fmt):
    rows = [[25.0, 3.0, 19.99, 4.0], [61.0, 0.0, 300.0, 17.0]]
    batch = pa.record_batch({c: pa.array([r[i] for r in rows]) for i, c in enumerate(CTR)})
    out = score_batch(batch, load_scorer(resolve(ctr_spec(models[fmt]))))
    np.testing.assert_allclose(out.column("prediction").to_numpy(), direct(models["module"], rows), rtol=1e-6)
    assert out.column("error").null_count == 2


def test_every_bad_row_kind_gets_a_reason_and_the_rest_are_scored(models):
    batch = pa.record_batch(
        {
            "age": pa.array([30.0, None, 30.0, 30.0, 40.0]),
            "purchase_count": pa.array([1.0, 1.0, math.nan, 1.0, 2.0]),
            "price": pa.array([5.0, 5.0, 5.0, math.inf, 6.0]),
            "category_id": pa.array([1.0, 1.0, 1.0, 1.0, 2.0]),
        }
    )
    out = score_batch(batch, load_scorer(resolve(ctr_spec(models["torchscript"]))))
    assert out.column("error").to_pylist() == [
        None,
        "null feature: 'age'",
        "non-finite feature: 'purchase_count' = nan",
        "non-finite feature: 'price' = inf",
        None,
    ]
    preds = out.column("prediction").to_pylist()
    assert [p is None for p in preds] == [False, True, True, True, False]
    np.testing.assert_allclose(
        [preds[0], preds[4]], direct(models["module"], [[30, 1, 5, 1], [40, 2, 6, 2]]), rtol=1e-6
    )


def test_array_column_reasons_for_null_wrong_length_null_element_and_text():
    f32 = pa.list_(pa.float32())
    feats = extract_features(
        pa.record_batch({"f": pa.array([[1, 2, 3], None, [1, 2], [1, None, 3], [4, 5, 6]], f32)}), ("f",), 3
    )
    assert feats.errors == [
        None,
        "null feature: 'f'",
        "wrong length: expected 3 features, got 2",
        "null feature: f[1]",
        None,
    ]
    np.testing.assert_array_equal(feats.matrix, [[1, 2, 3], [4, 5, 6]])
    text = extract_features(pa.record_batch({"f": pa.array([["1", "x", "2"], ["1", "2", "3"]])}), ("f",), 3)
    assert text.errors == ["non-numeric feature: f[1] = 'x'", None]


def test_clean_float32_array_column_is_read_without_copying():
    values = np.arange(12, dtype=np.float32)
    col = pa.FixedSizeListArray.from_arrays(pa.array(values), 4)
    feats = extract_features(pa.record_batch({"f": col}), ("f",), 4)
    assert feats.errors is None
    assert np.shares_memory(feats.matrix, col.values.to_numpy(zero_copy_only=True))


def test_non_numeric_string_column_is_a_row_error_not_a_crash(models):
    batch = pa.record_batch(
        {
            "age": pa.array(["30", "abc"]),
            "purchase_count": pa.array([1.0, 1.0]),
            "price": pa.array([5.0, 5.0]),
            "category_id": pa.array([1, 1]),
        }
    )
    out = score_batch(batch, load_scorer(resolve(ctr_spec(models["torchscript"]))))
    assert out.column("error").to_pylist() == [None, "non-numeric feature: 'age' = 'abc'"]
    assert out.column("prediction").null_count == 1


def test_probabilities_output_has_label_and_version(models):
    spec = ModelSpec(
        path=models["classifier"],
        input_columns=("f",),
        num_features=6,
        output="probabilities",
        activation="softmax",
    )
    rows = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    out = score_batch(
        pa.record_batch({"f": pa.array(rows.tolist(), pa.list_(pa.float32()))}), load_scorer(resolve(spec))
    )
    with torch.no_grad():
        expected = torch.softmax(models["classifier_module"](torch.from_numpy(rows)), -1).numpy()
    np.testing.assert_allclose(np.array(out.column("probabilities").to_pylist()), expected, rtol=1e-5)
    assert out.column("label").to_pylist() == expected.argmax(1).tolist()
    assert set(out.column("model_version").to_pylist()) == {resolve(spec).version}


def test_version_defaults_to_content_hash_and_config_version_wins(models):
    auto = resolve(ctr_spec(models["torchscript"]))
    assert auto.version == auto.content_hash[:12]
    assert resolve(ctr_spec(models["torchscript"], version="v7")).version == "v7"


def test_model_is_loaded_once_per_process_and_keyed_by_content(models, tmp_path):
    model_cache.clear()
    resolved = resolve(ctr_spec(models["torchscript"]))
    for _ in range(5):
        load_scorer(resolved)
    assert model_cache.stats().loads == {resolved.content_hash: 1}
    copy = tmp_path / "same.pt"
    copy.write_bytes(Path(models["torchscript"]).read_bytes())
    load_scorer(resolve(ctr_spec(str(copy))))
    assert model_cache.stats().loads == {resolved.content_hash: 1}  # same bytes, same entry


def test_cache_is_bounded_lru(models, tmp_path):
    model_cache.clear()
    paths = []
    for i in range(3):
        m = torch.nn.Linear(4, 1)
        torch.manual_seed(i)
        p = tmp_path / f"m{i}.pt"
        torch.jit.save(torch.jit.script(m), str(p))
        paths.append(p)
    for p in paths:
        load_scorer(resolve(ctr_spec(str(p), cache_size=2)))
    assert model_cache.stats().entries == 2
    load_scorer(resolve(ctr_spec(str(paths[0]), cache_size=2)))  # evicted, so loaded again
    assert sum(model_cache.stats().loads.values()) == 4


def test_missing_and_corrupt_model_files_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve(ctr_spec(str(tmp_path / "nope.pt")))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="could not be loaded as a torchscript program"):
        check_model(resolve(ctr_spec(str(bad))))


def test_output_kind_mismatch_is_caught_before_scoring(models):
    spec = ModelSpec(path=models["classifier"], input_columns=("f",), num_features=6, output="score")
    with pytest.raises(ModelLoadError, match="output = 'probabilities'"):
        check_model(resolve(spec))


def test_array_input_without_num_features_says_what_to_set():
    with pytest.raises(ConfigError, match="set num_features"):
        extract_features(pa.record_batch({"f": pa.array([[1.0]])}), ("f",), None)


def test_probabilities_output_keeps_bad_rows_null(models):
    spec = ModelSpec(path=models["classifier"], input_columns=("f",), num_features=6, output="probabilities")
    batch = pa.record_batch({"f": pa.array([[0.1] * 6, None, [0.2] * 5], pa.list_(pa.float32()))})
    out = score_batch(batch, load_scorer(resolve(spec)))
    assert [p is None for p in out.column("probabilities").to_pylist()] == [False, True, True]
    assert out.column("label").null_count == 2
    assert out.column("error").to_pylist()[1:] == [
        "null feature: 'f'",
        "wrong length: expected 6 features, got 5",
    ]
