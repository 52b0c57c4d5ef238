"""Rough edges a new user hit with their own models and dirty data (issue 10, item 3), without Spark."""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import pytest
import torch

from udfs import demo, model_cache
from udfs.batch import Summary, plural, rate
from udfs.core import check_model, load_scorer, score_batch
from udfs.errors import ModelLoadError, whole_sentences
from udfs.features import extract_features
from udfs.spec import MemberSpec, ModelSpec, resolve

CTR = demo.CTR_FEATURES


def test_the_same_value_gets_the_same_reason_whatever_the_column_type():
    text = pa.record_batch({"x": pa.array(["1e400", "inf", "-1e400", "1e300", "2.5"])})
    double = pa.record_batch({"x": pa.array([np.inf, np.inf, -np.inf, 1e300, 2.5])})
    expected = [
        "non-finite feature: 'x' = inf",
        "non-finite feature: 'x' = inf",
        "non-finite feature: 'x' = -inf",
        "out-of-range feature: 'x' = 1e+300 (beyond float32)",
        None,
    ]
    assert extract_features(text, ("x",), None).errors == expected
    assert extract_features(double, ("x",), None).errors == expected
    arrays = pa.record_batch({"f": pa.array([[1.0, 1e300], [1.0, 2.0]], pa.list_(pa.float64()))})
    feats = extract_features(arrays, ("f",), 2)
    assert feats.errors == ["out-of-range feature: f[1] = 1e+300 (beyond float32)", None]
    np.testing.assert_array_equal(feats.matrix, [[1.0, 2.0]])


def test_doubles_beyond_float32_raise_no_numpy_warning():
    batch = pa.record_batch({"x": pa.array([1e300, -1e300, 1.0]), "y": pa.array(["1e300", "1", "1e400"])})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        feats = extract_features(batch, ("x", "y"), None)
    assert feats.valid.tolist() == [False, False, False]


def test_load_errors_keep_whole_sentences():
    torch_message = (
        "PytorchStreamReader failed reading zip archive: failed finding central directory. This is an "
        "internal miniz error. If you are seeing this error, there is a high likelihood that your "
        "checkpoint file is corrupted. This can happen if the checkpoint was not saved properly, was "
        "transferred incorrectly, or the file was modified after saving."
    )
    short = whole_sentences(torch_message)
    assert short.endswith("likelihood that your checkpoint file is corrupted.")
    assert whole_sentences(
        'Expected hasRecord("version") to be true, but got false.  (Could this error '
        "message be improved?  If so, please report it.)"
    ) == ('Expected hasRecord("version") to be true, but got false.')
    assert whole_sentences("one long sentence " * 40) == ("one long sentence " * 40).strip()


def test_a_corrupt_model_file_is_reported_in_whole_sentences(tmp_path):
    # The first 64 bytes of a zip archive with no central directory: torch's long miniz message.
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"PK\x03\x04" + b"\x00" * 60)
    with pytest.raises(ModelLoadError) as info:
        check_model(resolve(ModelSpec(path=str(bad), input_columns=CTR)))
    message = str(info.value)
    assert message.endswith(".") and "\n" not in message, message


def test_a_pt2_exported_with_a_fixed_batch_says_to_export_a_dynamic_batch(tmp_path):
    program = torch.export.export(demo.ctr_module(), (torch.zeros(4, 4),))
    path = tmp_path / "fixed.pt2"
    torch.export.save(program, str(path))
    with pytest.raises(
        ModelLoadError, match="exported with a fixed batch size of 4; export it with a dynamic"
    ):
        check_model(resolve(ModelSpec(path=str(path), input_columns=CTR)))


def test_one_input_column_without_num_features_hints_at_num_features(models):
    with pytest.raises(ModelLoadError, match="if 'features' is an array column, set num_features"):
        check_model(
            resolve(ModelSpec(path=models["classifier"], input_columns=("features",), output="probabilities"))
        )


def test_an_ensemble_larger_than_the_cache_loads_each_member_once(tmp_path):
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        path = tmp_path / f"m{seed}.pt"
        torch.jit.save(torch.jit.script(torch.nn.Linear(4, 1)), str(path))
        paths.append(str(path))
    spec = ModelSpec(
        input_columns=CTR,
        cache_size=2,
        members=tuple(MemberSpec(path=p, name=f"m{i}") for i, p in enumerate(paths)),
    )
    model = resolve(spec)
    model_cache.clear()
    try:
        for _ in range(5):  # five tasks in one reused worker
            scorer = load_scorer(model)
        assert model_cache.total_loads() == 3
        batch = pa.record_batch({c: pa.array([1.0, 2.0]) for c in CTR})
        assert score_batch(batch, scorer).column("error").null_count == 2
    finally:
        model_cache.clear()


def test_a_scoring_task_that_loses_a_row_fails_before_anything_is_committed(monkeypatch, models):
    from udfs import spark as spark_api

    model = resolve(ModelSpec(path=models["torchscript"], input_columns=CTR))
    real = spark_api.score_batch
    monkeypatch.setattr(spark_api, "score_batch", lambda batch, scorer: real(batch, scorer).slice(1))
    batch = pa.record_batch({"id": pa.array([1, 2])} | {c: pa.array([1.0, 2.0]) for c in CTR})
    score_partition = spark_api._score_partitions(model, ["id", *CTR], ["id"], None)
    with pytest.raises(spark_api.RowCountError, match="returned 1 rows for a batch of 2"):
        list(score_partition(iter([batch])))


def test_summary_speaks_plainly_for_tiny_inputs():
    assert plural(1, "row") == "1 row" and plural(2_000, "row") == "2,000 rows"
    assert rate(1, 2.0) == "0.5" and rate(300, 2.0) == "150" and rate(0, 0.0) == "n/a"
    text = Summary(1, 1, 1, 0, startup_seconds=4.0, scoring_seconds=2.0, model_loads={"w": 1}).render()
    assert "model loads: 1 across 1 Python worker " in text
    assert "scoring 2.0 s: 0.5 rows/s" in text and "(0 rows/s)" not in text
