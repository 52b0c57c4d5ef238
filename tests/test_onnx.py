"""ONNX Runtime as a second engine behind the one core: torch exports, scikit-learn and LightGBM.

Models are trained on generated data in ``conftest.onnx_models`` and converted with skl2onnx /
onnxmltools; their predictions through the core and the batch job must equal the library's own
``predict_proba`` to 1e-5. The HTTP scorer's side is in tests/serving/test_onnx_http.py.
"""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from onnx import TensorProto, helper

from jobs import batch_score
from serving import __main__ as serve_main
from udfs import demo, model_cache, onnx_engine
from udfs.core import check_model, load_scorer, score_batch
from udfs.errors import ModelLoadError
from udfs.spec import MemberSpec, ModelSpec, resolve, with_overrides

CTR = demo.CTR_FEATURES
TOL = 1e-5


def features_table(x: np.ndarray, bad: bool = True) -> pa.Table:
    """Rows of one ``features`` array column (plus an id); with ``bad``, three bad rows at the end."""
    rows: list[list[float] | None] = [list(map(float, r)) for r in x]
    if bad:
        rows += [None, [1.0, 2.0], [1.0, float("nan"), 0.0, 0.0, 0.0]]
    return pa.table({"id": list(range(len(rows))), "features": pa.array(rows, pa.list_(pa.float64()))})


def clf_spec(path: str, **kw) -> ModelSpec:
    return ModelSpec(
        path=path, input_columns=("features",), num_features=5, output="probabilities", device="cpu", **kw
    )


# -- format selection -----------------------------------------------------------------------


def test_onnx_suffix_or_format_key_selects_the_onnx_engine(onnx_models, models, tmp_path):
    assert resolve(ModelSpec(path=onnx_models["ctr"], input_columns=CTR)).format == "onnx"
    renamed = tmp_path / "ctr.model"
    renamed.write_bytes(Path(onnx_models["ctr"]).read_bytes())
    spec = ModelSpec(path=str(renamed), input_columns=CTR, format="onnx")
    assert resolve(spec).format == "onnx"
    assert isinstance(load_scorer(resolve(spec)).modules[0], onnx_engine.OnnxModel)
    # Ensemble members inherit the ensemble's format unless they name their own.
    ens = ModelSpec(
        input_columns=CTR,
        format="onnx",
        members=(
            MemberSpec(path=str(renamed), name="a"),
            MemberSpec(path=models["torchscript"], name="b", format="torchscript"),
        ),
    )
    assert [m.format for m in resolve(ens).members] == ["onnx", "torchscript"]
    # --model with a known suffix drops the configured format; with an unknown one it keeps it.
    assert with_overrides(spec, path=models["torchscript"]).format == "auto"
    assert with_overrides(spec, path=str(tmp_path / "other.model")).format == "onnx"


# -- the core: same predictions, reasons, activations and output kinds as torch ---------------


def test_exported_ctr_model_scores_like_torchscript_with_the_same_bad_row_reasons(onnx_models, models):
    table = demo.synthetic_ctr(300, seed=11, bad_fraction=0.05)
    outs = {}
    for name, path in (("torch", models["torchscript"]), ("onnx", onnx_models["ctr"])):
        model = resolve(ModelSpec(path=path, input_columns=CTR, batch_size=64, device="cpu"))
        outs[name] = score_batch(table, load_scorer(model))
    errors = outs["onnx"]["error"].to_pylist()
    assert errors == outs["torch"]["error"].to_pylist()
    assert 0 < sum(e is not None for e in errors) < table.num_rows
    torch_p = np.array(outs["torch"]["prediction"].to_pylist(), dtype=float)
    onnx_p = np.array(outs["onnx"]["prediction"].to_pylist(), dtype=float)
    assert np.array_equal(np.isnan(torch_p), np.isnan(onnx_p))
    np.testing.assert_allclose(onnx_p, torch_p, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("name", ["gbc", "gbc_tensor", "lgbm"])
def test_converted_classifier_probabilities_equal_predict_proba(onnx_models, name):
    """skl2onnx / onnxmltools write a label and probabilities (a map per row, or a tensor with
    zipmap=False): the probabilities are read, in the estimator's class order."""
    x = onnx_models["X"][:120]
    estimator = onnx_models[name.removesuffix("_tensor") + "_estimator"]
    out = score_batch(features_table(x), load_scorer(resolve(clf_spec(onnx_models[name], batch_size=50))))
    probs = np.array(out["probabilities"].to_pylist()[: len(x)])
    np.testing.assert_allclose(probs, estimator.predict_proba(x), atol=TOL)
    # The label is the index of the most probable class, in the estimator's class order.
    assert list(estimator.classes_) == list(range(len(estimator.classes_)))
    assert out["label"].to_pylist()[: len(x)] == list(estimator.predict(x))
    assert out["error"].to_pylist()[len(x) :] == [
        "null feature: 'features'",
        "wrong length: expected 5 features, got 2",
        "non-finite feature: features[1] = nan",
    ]
    assert out["probabilities"].to_pylist()[len(x) :] == [None, None, None]


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_activation_applies_to_onnx_outputs_as_to_torch(models, tmp_path, activation):
    torch.manual_seed(4)
    logits = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).eval()
    paths = {
        "torch": str(demo.save_torchscript(logits, tmp_path / "logits.pt")),
        "onnx": str(demo.save_onnx(logits, tmp_path / "logits.onnx", 6)),
    }
    x = np.random.default_rng(2).normal(scale=3, size=(40, 6)).astype(np.float32)
    outs = {}
    for engine, path in paths.items():
        spec = ModelSpec(
            path=path, input_columns=("f",), num_features=6, output="probabilities", activation=activation
        )
        outs[engine] = score_batch(pa.table({"f": x.tolist()}), load_scorer(resolve(spec)))
    np.testing.assert_allclose(
        np.array(outs["onnx"]["probabilities"].to_pylist()),
        np.array(outs["torch"]["probabilities"].to_pylist()),
        atol=1e-6,
    )
    assert outs["onnx"]["label"].to_pylist() == outs["torch"]["label"].to_pylist()


def test_ensemble_of_an_onnx_and_a_torchscript_member_is_their_weighted_mean(onnx_models, tmp_path):
    torch.manual_seed(9)
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).eval()
    other_path = str(demo.save_torchscript(other, tmp_path / "other.pt"))
    spec = ModelSpec(
        input_columns=CTR,
        device="cpu",
        member_outputs=True,
        members=(
            MemberSpec(path=onnx_models["ctr"], name="onnx_ctr", weight=1.0),
            MemberSpec(path=other_path, name="torch_other", weight=3.0),
        ),
    )
    model = resolve(spec)
    assert model.format == "mixed"
    check_model(model)
    out = score_batch(demo.synthetic_ctr(50, seed=3), load_scorer(model))
    a = np.array(out["member_onnx_ctr"].to_pylist())
    b = np.array(out["member_torch_other"].to_pylist())
    np.testing.assert_allclose(np.array(out["prediction"].to_pylist()), 0.25 * a + 0.75 * b, atol=1e-12)
    alone = score_batch(
        demo.synthetic_ctr(50, seed=3),
        load_scorer(resolve(ModelSpec(path=onnx_models["ctr"], input_columns=CTR, device="cpu"))),
    )
    np.testing.assert_allclose(a, np.array(alone["prediction"].to_pylist()), atol=1e-12)


@pytest.fixture(scope="module")
def per_column_model(tmp_path_factory):
    """A scikit-learn pipeline over named columns, converted with one ONNX input per column."""
    import pandas as pd
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(8)
    frame = pd.DataFrame(rng.normal(size=(200, 3)).astype(np.float32), columns=["a", "b", "c"])
    y = (frame["a"] - 2 * frame["c"] > 0).astype(int)
    pipe = Pipeline(
        [
            ("cols", ColumnTransformer([("scale", StandardScaler(), ["a", "b", "c"])])),
            ("lr", LogisticRegression()),
        ]
    ).fit(frame, y)
    onx = to_onnx(
        pipe, initial_types=[(c, FloatTensorType([None, 1])) for c in "abc"], options={"zipmap": False}
    )
    path = tmp_path_factory.mktemp("per-column") / "pipe.onnx"
    path.write_bytes(onx.SerializeToString())
    return str(path), pipe, frame


def test_one_input_per_column_is_fed_by_name_whatever_the_column_order(per_column_model):
    path, pipe, frame = per_column_model
    spec = ModelSpec(path=path, input_columns=("c", "a", "b"), output="probabilities", device="cpu")
    table = pa.Table.from_pandas(frame[["b", "c", "a"]], preserve_index=False)
    out = score_batch(table, load_scorer(resolve(spec)))
    np.testing.assert_allclose(
        np.array(out["probabilities"].to_pylist()), pipe.predict_proba(frame), atol=TOL
    )


# -- inputs that do not fit: one sentence naming what the model expects ----------------------


def _fixed_batch_model(path) -> str:
    torch.manual_seed(0)
    torch.onnx.export(
        torch.nn.Linear(4, 1).eval(), (torch.zeros(8, 4),), str(path), dynamo=False, input_names=["x"]
    )
    return str(path)


def _int_input_model(path) -> str:
    graph = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["out"], to=TensorProto.FLOAT)],
        "ints",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, str(path))
    return str(path)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (
            "width",
            r"takes 1 input 'features' of shape \[batch, 4\] \(float\), but the config gives 6 features "
            r"\(input_columns = \['features'\], num_features = 6\); list 4 input_columns or set num_features = 4",
        ),
        (
            "names",
            r"takes 3 inputs 'a' of shape \[batch, 1\] \(float\), 'b' .*, 'c' .*, one per column, but the "
            r"config gives input_columns = \['a', 'b', 'x'\]; set input_columns = \['a', 'b', 'c'\]",
        ),
        ("fixed_batch", r"takes 1 input 'x' of shape \[8, 4\] \(float\): a fixed batch of 8 rows; export it"),
        ("int_input", r"takes 1 input 'ids' of shape \[batch, 4\] \(int64\), but sparkscore feeds float"),
    ],
)
def test_an_onnx_model_whose_inputs_do_not_fit_fails_the_check_in_one_sentence(
    onnx_models, per_column_model, tmp_path, case, message
):
    import re

    specs = {
        "width": lambda: ModelSpec(path=onnx_models["ctr"], input_columns=("features",), num_features=6),
        "names": lambda: ModelSpec(path=per_column_model[0], input_columns=("a", "b", "x")),
        "fixed_batch": lambda: ModelSpec(path=_fixed_batch_model(tmp_path / "fixed.onnx"), input_columns=CTR),
        "int_input": lambda: ModelSpec(path=_int_input_model(tmp_path / "ints.onnx"), input_columns=CTR),
    }
    with pytest.raises(ModelLoadError) as err:
        check_model(resolve(specs[case]()))
    text = str(err.value)
    assert re.search(message, text), text
    assert "\n" not in text


def _onnx_config(tmp_path, model: str, section: str) -> str:
    cfg = tmp_path / f"{section}.toml"
    cfg.write_text(
        textwrap.dedent(
            f"""
            [model]
            path = "{model}"
            input_columns = ["features"]
            num_features = 6

            [input]
            path = "{tmp_path}"

            [output]
            path = "{tmp_path / "out"}"
            """
        )
        if section == "batch"
        else f'[model]\npath = "{model}"\ninput_columns = ["features"]\nnum_features = 6\n'
    )
    return str(cfg)


def test_the_batch_job_and_the_scorer_refuse_to_start_on_a_model_that_does_not_fit(
    onnx_models, tmp_path, capsys
):
    want = "takes 1 input 'features' of shape [batch, 4] (float), but the config gives 6 features"
    assert batch_score.main(["--config", _onnx_config(tmp_path, onnx_models["ctr"], "batch")]) == 2
    err = capsys.readouterr().err.strip()
    assert want in err and err.startswith("[sparkscore] error:") and len(err.splitlines()) == 1
    assert serve_main.main(["--config", _onnx_config(tmp_path, onnx_models["ctr"], "serve")]) == 2
    err = capsys.readouterr().err.strip()
    assert want in err and err.startswith("[sparkscore] error:") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_corrupt_onnx_file_fails_in_one_sentence(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a protobuf at all")
    with pytest.raises(ModelLoadError, match=r"could not be loaded as an ONNX model \(is it corrupt") as err:
        check_model(resolve(ModelSpec(path=str(bad), input_columns=CTR)))
    assert "\n" not in str(err.value)


# -- sessions: providers, threads, one per worker -------------------------------------------


def test_cpu_device_gets_the_cpu_provider_and_a_gpu_gets_cuda_on_that_gpu():
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_engine.providers_for("cpu", available) == ["CPUExecutionProvider"]
    assert onnx_engine.providers_for("cuda:1", available) == [
        ("CUDAExecutionProvider", {"device_id": 1}),
        "CPUExecutionProvider",
    ]
    assert onnx_engine.providers_for("cuda", available)[0] == ("CUDAExecutionProvider", {"device_id": 0})


def test_a_gpu_without_the_cuda_provider_runs_on_the_cpu_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="udfs.onnx_engine"):
        assert onnx_engine.providers_for("cuda:0", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert "onnxruntime-gpu" in caplog.text


def test_sessions_take_task_cpus_threads_and_do_not_spin(onnx_models, monkeypatch):
    monkeypatch.setattr(onnx_engine, "task_threads", lambda: 3)
    session = onnx_engine.load(onnx_models["ctr"], "cpu").session
    opts = session.get_session_options()
    assert opts.intra_op_num_threads == 3
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert session.get_providers() == ["CPUExecutionProvider"]


def test_one_session_per_process_through_the_model_cache(onnx_models, tmp_path):
    path = tmp_path / "fresh.onnx"  # a fresh content hash: no earlier test has it cached
    torch.manual_seed(12)
    demo.save_onnx(torch.nn.Linear(4, 1).eval(), path, 4)
    model = resolve(ModelSpec(path=str(path), input_columns=CTR, device="cpu"))
    first = load_scorer(model).modules[0]
    assert load_scorer(model).modules[0] is first
    assert model_cache.stats().loads[model.members[0].content_hash] == 1


@pytest.mark.spark
def test_an_onnx_model_loads_once_per_python_worker(spark, tmp_path):
    from pyspark.sql import functions as F

    from udfs.spark import model_load_tracker, with_predictions

    path = tmp_path / "worker.onnx"
    torch.manual_seed(13)
    demo.save_onnx(torch.nn.Linear(4, 1).eval(), path, 4)
    model = resolve(ModelSpec(path=str(path), input_columns=CTR, batch_size=16))
    df = (
        spark.range(2000)
        .select(F.col("id"), *[(F.col("id") % (i + 3)).cast("double").alias(c) for i, c in enumerate(CTR)])
        .repartition(8)
    )
    tracker = model_load_tracker(df)
    assert df.transform(with_predictions(model, keep=["id"], tracker=tracker)).count() == 2000
    loads = tracker.value
    assert loads and set(loads.values()) == {1}


# -- the batch job end to end ----------------------------------------------------------------


@pytest.mark.spark
@pytest.mark.parametrize("name", ["gbc", "lgbm"])
def test_batch_job_scores_sklearn_and_lightgbm_models_equal_to_predict_proba(
    spark, onnx_models, tmp_path, capsys, name
):
    x = onnx_models["X"]
    estimator = onnx_models[f"{name}_estimator"]
    src = tmp_path / "rows.parquet"
    pq.write_table(features_table(x), src)
    cfg = tmp_path / "batch.toml"
    cfg.write_text(
        textwrap.dedent(
            f"""
            [model]
            path = "{onnx_models[name]}"
            name = "{name}"
            input_columns = ["features"]
            num_features = 5
            output = "probabilities"
            batch_size = 128

            [input]
            path = "{src}"

            [output]
            path = "{tmp_path / "out"}"
            keep_columns = ["id"]
            """
        )
    )
    assert batch_score.main(["--config", str(cfg)]) == 0
    assert f"(onnx: {onnx_models[name]})" in capsys.readouterr().out
    out = pq.read_table(tmp_path / "out").sort_by("id").to_pydict()
    n = len(x)
    np.testing.assert_allclose(np.array(out["probabilities"][:n]), estimator.predict_proba(x), atol=TOL)
    assert out["label"][:n] == list(estimator.predict(x))
    assert out["error"][:n] == [None] * n
    assert out["error"][n:] == [
        "null feature: 'features'",
        "wrong length: expected 5 features, got 2",
        "non-finite feature: features[1] = nan",
    ]
