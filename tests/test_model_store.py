"""Models from MLflow and object storage: URIs resolved once on the driver, fetched per host.

Every test uses a real local MLflow registry (MLflow's default sqlite store, as `make demo`
builds), never a mocked client. The s3:// tests are in tests/test_model_store_s3.py (moto server).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from streaming.broker import free_port
from udfs import demo, mlflow_demo, model_cache, model_store
from udfs.core import check_model, load_scorer, score_batch
from udfs.errors import ModelLoadError
from udfs.model_store import ModelStoreError, parse_uri
from udfs.spec import ModelSpec, resolve, with_overrides

CTR = demo.CTR_FEATURES


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A sqlite registry with demo_ctr v1 (@champion) and v2 (@challenger), both pt2."""
    root = tmp_path_factory.mktemp("mlflow")
    v1 = mlflow_demo.log_pytorch(demo.ctr_module(0), root, alias="champion")
    v2 = mlflow_demo.log_pytorch(demo.ctr_module(1), root, alias="challenger")
    return {"root": root, "uri": mlflow_demo.registry_uri(root), "v1": v1, "v2": v2}


@pytest.fixture
def cache(tmp_path):
    model_store.forget()
    model_cache.clear()
    yield str(tmp_path / "cache")
    model_store.forget()
    model_cache.clear()


def spec_for(registry, path: str, cache: str, **kw) -> ModelSpec:
    kw.setdefault("input_columns", CTR)
    return ModelSpec(path=path, registry_uri=registry["uri"], cache_dir=cache, device="cpu", **kw)


def rows(n: int = 6) -> pa.Table:
    return demo.synthetic_ctr(n)


def reference(module: torch.nn.Module, table: pa.Table) -> np.ndarray:
    x = np.column_stack([table[c].to_numpy() for c in CTR]).astype(np.float32)
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy().reshape(-1)


# -- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "kind", "field", "value"),
    [
        ("models:/ctr/3", "registry", "version", "3"),
        ("models:/ctr@champion", "registry", "alias", "champion"),
        ("models:/m-0123456789abcdef0123", "model_id", "model_id", "m-0123456789abcdef0123"),
        ("runs:/abc123/model", "runs", "artifact_path", "model"),
        ("s3://bucket/models/ctr.pt", "object", "uri", "s3://bucket/models/ctr.pt"),
        ("gs://bucket/ctr", "object", "uri", "gs://bucket/ctr"),
        ("hdfs://nn:8020/models/ctr.onnx", "object", "uri", "hdfs://nn:8020/models/ctr.onnx"),
        ("file:///models/ctr.pt", "object", "uri", "file:///models/ctr.pt"),
    ],
)
def test_model_uris_parse_into_what_they_name(uri, kind, field, value):
    parsed = parse_uri(uri)
    assert parsed.kind == kind
    assert getattr(parsed, field) == value


@pytest.mark.parametrize("uri", ["models:/ctr", "models:/ctr/latest-ish", "models:/@x", "runs:/abc"])
def test_malformed_model_uris_are_one_sentence(uri):
    with pytest.raises(ModelStoreError, match="models:/|runs:/"):
        parse_uri(uri)


def test_a_plain_file_is_not_a_store_uri_but_an_mlflow_model_directory_is(tmp_path, models):
    assert not model_store.is_store_uri(models["torchscript"])
    (tmp_path / "MLmodel").write_text("flavors: {}\n")
    assert model_store.is_store_uri(str(tmp_path))


# -- resolution on the driver ---------------------------------------------------------------


def test_alias_resolves_to_its_version_and_content_hash(registry, cache):
    model = resolve(spec_for(registry, "models:/demo_ctr@champion", cache))
    ref = model.members[0].store
    assert ref is not None
    assert ref.registry_version == registry["v1"]
    assert model.version == f"{registry['v1']}+{ref.content_hash[:12]}"
    assert ref.format == "export"
    # What travels to executors names the artifacts' location, not the registry.
    assert ref.location.startswith("file://") and "models:/" not in ref.location
    assert "sqlite" not in repr(ref)


def test_version_number_alias_and_model_id_reach_the_same_artifacts(registry, cache):
    by_alias = resolve(spec_for(registry, "models:/demo_ctr@challenger", cache))
    by_version = resolve(spec_for(registry, f"models:/demo_ctr/{registry['v2']}", cache))
    model_id = by_alias.members[0].store.location.rstrip("/").split("/")[-2]
    by_id = resolve(spec_for(registry, f"models:/{model_id}", cache))
    assert by_alias.content_hash == by_version.content_hash == by_id.content_hash
    assert by_id.members[0].store.registry_version == ""  # a logged model outside the registry


def test_a_runs_uri_reaches_the_model_logged_in_that_run(registry, cache):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=registry["uri"], registry_uri=registry["uri"])
    run_id = client.get_model_version("demo_ctr", registry["v1"]).run_id
    by_run = resolve(spec_for(registry, f"runs:/{run_id}/model", cache))
    by_version = resolve(spec_for(registry, f"models:/demo_ctr/{registry['v1']}", cache))
    assert by_run.content_hash == by_version.content_hash
    assert by_run.format == "export"


def test_registry_model_scores_like_the_module_it_was_logged_from(registry, cache):
    model = resolve(spec_for(registry, "models:/demo_ctr@champion", cache))
    check_model(model)
    table = rows()
    out = score_batch(table, load_scorer(model))
    np.testing.assert_allclose(out["prediction"].to_numpy(), reference(demo.ctr_module(0), table), rtol=1e-5)
    assert set(out["model_version"].to_pylist()) == {model.version}


def test_a_tensor_signature_fills_num_features_for_an_array_column(registry, cache):
    spec = spec_for(registry, "models:/demo_ctr@champion", cache, input_columns=("features",))
    assert resolve(spec).spec.num_features == 4


def test_a_config_that_does_not_fit_the_signature_is_one_sentence(registry, cache):
    with pytest.raises(ModelLoadError, match=r"takes 4 features by its signature, but the config gives 3"):
        resolve(spec_for(registry, "models:/demo_ctr@champion", cache, input_columns=CTR[:3]))


def test_a_tensor_signature_without_input_columns_asks_for_them(registry, cache):
    with pytest.raises(ModelLoadError, match=r"takes one \[batch, 4\] tensor by its signature"):
        resolve(spec_for(registry, "models:/demo_ctr@champion", cache, input_columns=()))


def test_command_line_model_uri_replaces_the_file_and_its_format(models):
    spec = ModelSpec(path=models["torchscript"], input_columns=CTR, format="torchscript")
    moved = with_overrides(spec, path="models:/demo_ctr@champion")
    assert moved.path == "models:/demo_ctr@champion" and moved.format == "auto" and moved.version is None


# -- faults: one sentence, before any data --------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("models:/nope@champion", "no registered model 'nope'"),
        ("models:/demo_ctr/99", r"has no version 99 .*its versions: 1, 2"),
        ("models:/demo_ctr@gone", r"has no alias 'gone' .*@champion -> 1"),
        ("models:/m-00000000000000000000000000000000", "no logged model"),
        ("runs:/0123456789abcdef/model", "no run '0123456789abcdef'"),
    ],
)
def test_unknown_model_version_alias_or_run_is_one_sentence(registry, cache, uri, message):
    with pytest.raises(ModelStoreError, match=message):
        resolve(spec_for(registry, uri, cache))


def test_a_missing_sqlite_registry_is_one_sentence_and_is_not_created(tmp_path, cache):
    db = tmp_path / "absent" / "mlflow.db"
    spec = ModelSpec(path="models:/demo_ctr@champion", input_columns=CTR, registry_uri=f"sqlite:///{db}")
    with pytest.raises(ModelStoreError, match="does not exist; run `make demo`"):
        resolve(spec)
    assert not db.exists()


def test_an_unreachable_registry_server_is_one_sentence(cache):

    port = free_port()  # a port nothing listens on
    spec = ModelSpec(
        path="models:/demo_ctr@champion", input_columns=CTR, registry_uri=f"http://127.0.0.1:{port}"
    )
    with pytest.raises(ModelStoreError, match=f"registry http://127.0.0.1:{port} is unreachable"):
        resolve(spec)


# -- executors: fetched once per host, checked, never from the registry ---------------------


def test_executor_fetch_downloads_once_per_host_and_checks_the_hash(registry, cache, tmp_path):
    model = resolve(spec_for(registry, "models:/demo_ctr@champion", cache))
    ref = model.members[0].store
    # Another host: an empty cache. Its first fetch downloads from the location, the next is memoised.
    other = ref.__class__(**{**ref.__dict__, "cache_dir": str(tmp_path / "other-host")})
    model_store.forget()
    first = model_store.fetch(other)
    assert model_store.fetch(other) == first
    assert model_store.downloads() == {ref.content_hash: 1}
    # A second Python worker on that host finds the finished entry and does not download again.
    model_store.forget()
    assert model_store.fetch(other) == first
    assert model_store.downloads() == {}
    assert oct(os.stat(tmp_path / "other-host").st_mode & 0o777) == "0o700"


def test_artifacts_changed_after_the_driver_resolved_them_are_refused(registry, cache, tmp_path):
    model = resolve(spec_for(registry, "models:/demo_ctr@champion", cache))
    ref = model.members[0].store
    moved = tmp_path / "copy"
    shutil.copytree(ref.location.removeprefix("file://"), moved)
    (moved / "MLmodel").write_text((moved / "MLmodel").read_text() + "\n# edited\n")
    tampered = ref.__class__(**{**ref.__dict__, "location": str(moved), "cache_dir": str(tmp_path / "h2")})
    model_store.forget()
    with pytest.raises(ModelStoreError, match="changed after the driver resolved them"):
        model_store.fetch(tampered)


# -- flavors ----------------------------------------------------------------------------------


class Doubler(torch.nn.Module):
    """A module defined in this test file: importable here, by its qualified name."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=1, keepdim=True) * 2


def test_a_torchscript_module_logged_with_pickle_loads_without_unpickling(registry, cache, monkeypatch):
    scripted = torch.jit.script(demo.ctr_module(0))
    version = mlflow_demo.log_pytorch(
        scripted, registry["root"], name="ctr_ts", alias=None, serialization_format="pickle"
    )
    model = resolve(spec_for(registry, f"models:/ctr_ts/{version}", cache))
    assert model.format == "pytorch"
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    check_model(model)
    table = rows()
    out = score_batch(table, load_scorer(model))
    np.testing.assert_allclose(out["prediction"].to_numpy(), reference(demo.ctr_module(0), table), rtol=1e-5)


def test_a_pickled_nn_module_scores_when_its_code_imports_and_pickles_are_allowed(
    registry, cache, monkeypatch
):
    version = mlflow_demo.log_pytorch(
        Doubler(), registry["root"], name="doubler", alias=None, serialization_format="pickle"
    )
    model = resolve(spec_for(registry, f"models:/doubler/{version}", cache))
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with pytest.raises(ModelLoadError, match="MLFLOW_ALLOW_PICKLE_DESERIALIZATION is false"):
        check_model(model)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    out = score_batch(pa.table({c: [1.0, 2.0] for c in CTR}), load_scorer(model))
    assert out["prediction"].to_pylist() == [8.0, 16.0]


def test_a_pickled_nn_module_whose_code_is_missing_is_one_sentence(tmp_path, cache, monkeypatch):
    import mlflow.pytorch

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    pkg = tmp_path / "gone_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import torch\nclass Net(torch.nn.Module):\n    def forward(self, x):\n        return x[:, :1]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import gone_pkg

    mlflow_demo.quiet()
    mlflow.pytorch.save_model(
        gone_pkg.Net(), str(tmp_path / "m"), serialization_format="pickle", pip_requirements=["torch"]
    )
    shutil.rmtree(pkg)
    monkeypatch.delitem(__import__("sys").modules, "gone_pkg")
    model = resolve(ModelSpec(path=str(tmp_path / "m"), input_columns=CTR, cache_dir=cache, device="cpu"))
    with pytest.raises(ModelLoadError, match="needs code that is not importable here .*gone_pkg"):
        check_model(model)


def test_an_onnx_flavored_model_scores_with_onnx_runtime(registry, cache, onnx_models):
    import onnx

    from udfs import onnx_engine

    version = mlflow_demo.log_model("onnx", onnx.load(onnx_models["ctr"]), registry["root"], name="ctr_onnx")
    model = resolve(spec_for(registry, f"models:/ctr_onnx/{version}", cache))
    assert model.format == "onnx"
    scorer = load_scorer(model)
    assert isinstance(scorer.modules[0], onnx_engine.OnnxModel)
    table = rows()
    out = score_batch(table, scorer)
    np.testing.assert_allclose(out["prediction"].to_numpy(), reference(demo.ctr_module(), table), rtol=1e-4)


def test_a_flavor_that_cannot_be_scored_is_one_sentence(tmp_path, cache):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "MLmodel").write_text("flavors:\n  transformers: {}\n")
    with pytest.raises(ModelStoreError, match=r"flavor\(s\) \['transformers'\], none of which"):
        resolve(ModelSpec(path=str(model_dir), input_columns=CTR, cache_dir=cache))


def test_a_local_mlflow_model_directory_is_a_model_path(tmp_path, cache):
    import mlflow.pytorch

    mlflow_demo.quiet()
    path = tmp_path / "ctr_model"
    mlflow.pytorch.save_model(
        demo.ctr_module(0),
        str(path),
        signature=mlflow_demo.ctr_signature(),
        input_example=np.zeros((2, 4), np.float32),
        serialization_format="pt2",
        pip_requirements=["torch"],
    )
    model = resolve(ModelSpec(path=str(path), input_columns=CTR, cache_dir=cache, device="cpu"))
    assert model.format == "export" and model.members[0].store.registry_version == ""
    table = rows()
    np.testing.assert_allclose(
        score_batch(table, load_scorer(model))["prediction"].to_numpy(),
        reference(demo.ctr_module(0), table),
        rtol=1e-5,
    )


def test_a_file_uri_of_a_model_file_hashes_like_the_file(models, cache):
    uri = Path(models["torchscript"]).as_uri()
    model = resolve(ModelSpec(path=uri, input_columns=CTR, cache_dir=cache, device="cpu"))
    assert (
        model.members[0].content_hash
        == resolve(ModelSpec(path=models["torchscript"], input_columns=CTR)).members[0].content_hash
    )
    assert model.format == "torchscript"


# -- pyfunc: scikit-learn pipelines with string columns, XGBoost ----------------------------


@pytest.fixture(scope="module")
def sklearn_pipeline():
    from sklearn.compose import make_column_transformer
    from sklearn.linear_model import LinearRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder

    frame = pd.DataFrame({"city": ["a", "b", "c", "a"] * 10, "age": np.arange(40, dtype=np.float64)})
    y = frame["age"] * 0.5 + frame["city"].map({"a": 1.0, "b": 2.0, "c": 3.0})
    pipe = make_pipeline(
        make_column_transformer((OneHotEncoder(handle_unknown="ignore"), ["city"]), remainder="passthrough"),
        LinearRegression(),
    ).fit(frame, y)
    return pipe, frame


def test_pyfunc_pipeline_with_a_string_column_fills_columns_from_its_signature(
    registry, cache, sklearn_pipeline
):
    from mlflow.models import infer_signature

    pipe, frame = sklearn_pipeline
    version = mlflow_demo.log_model(
        "sklearn",
        pipe,
        registry["root"],
        name="city_age",
        signature=infer_signature(frame, pipe.predict(frame)),
    )
    model = resolve(spec_for(registry, f"models:/city_age/{version}", cache, input_columns=()))
    assert model.format == "pyfunc"
    assert model.spec.input_columns == ("city", "age")
    check_model(model)
    table = pa.table({"city": ["a", None, "c", "b"], "age": [10.0, 3.0, float("nan"), 4.0]})
    out = score_batch(table, load_scorer(model))
    expected = pipe.predict(pd.DataFrame({"city": ["a", "b"], "age": [10.0, 4.0]}))
    got = out["prediction"].to_pylist()
    np.testing.assert_allclose([got[0], got[3]], expected, rtol=1e-6)
    # The same reasons as the torch and ONNX engines: nulls and non-finite values, row by row.
    assert out["error"].to_pylist() == [None, "null feature: 'city'", "non-finite feature: 'age' = nan", None]


def test_pyfunc_xgboost_native_model_scores_numeric_columns(registry, cache):
    import xgboost as xgb

    rng = np.random.default_rng(0)
    x = pd.DataFrame(rng.random((64, 2)), columns=["f0", "f1"])
    booster = xgb.XGBRegressor(n_estimators=4, max_depth=2).fit(x, x["f0"] * 2)
    version = mlflow_demo.log_model("xgboost", booster, registry["root"], name="xgb", model_format="ubj")
    model = resolve(spec_for(registry, f"models:/xgb/{version}", cache, input_columns=("f0", "f1")))
    assert model.format == "pyfunc"
    out = score_batch(pa.table({"f0": [0.5, None], "f1": [0.1, 0.2]}), load_scorer(model))
    np.testing.assert_allclose(
        out["prediction"].to_pylist()[0], booster.predict(x.iloc[:0].assign(f0=[0.5], f1=[0.1]))[0], rtol=1e-6
    )
    assert out["error"].to_pylist() == [None, "null feature: 'f0'"]


# -- MLflow tensor signatures onto the typed signature ([[model.inputs]]) ----------------------


def two_input_onnx():
    """dense float32 [N, 3] and ids int64 [N, 2] -> sum(dense) + sum(ids), [N, 1]."""
    import onnx
    from onnx import TensorProto, helper

    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["dense", "axes"], ["d"], keepdims=1),
            helper.make_node("Cast", ["ids"], ["idsf"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["idsf", "axes"], ["i"], keepdims=1),
            helper.make_node("Add", ["d", "i"], ["out"]),
        ],
        "two_inputs",
        [
            helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 2]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 1])],
        initializer=[axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_named_mlflow_tensors_become_typed_inputs_read_from_columns_of_their_names(registry, cache):
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    sig = ModelSignature(
        inputs=Schema(
            [
                TensorSpec(np.dtype(np.float32), (-1, 3), "dense"),
                TensorSpec(np.dtype(np.int64), (-1, 2), "ids"),
            ]
        ),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1))]),
    )
    version = mlflow_demo.log_model("onnx", two_input_onnx(), registry["root"], name="two_in", signature=sig)
    model = resolve(spec_for(registry, f"models:/two_in/{version}", cache, input_columns=()))
    assert [(i.name, i.column, i.dtype, i.shape) for i in model.spec.inputs] == [
        ("dense", "dense", "float32", (3,)),
        ("ids", "ids", "int64", (2,)),
    ]
    check_model(model)
    table = pa.table(
        {
            "dense": pa.array([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5], None], pa.list_(pa.float32())),
            "ids": pa.array([[1, 2], [10, 20], [1, 1]], pa.list_(pa.int64())),
        }
    )
    out = score_batch(table, load_scorer(model))
    assert out["prediction"].to_pylist()[:2] == [9.0, 31.5]
    assert out["error"].to_pylist()[0] is None and out["error"].to_pylist()[2] is not None


# -- the stream job's refresher (driver side; the Kafka runs are in tests/streaming/test_model_refresh.py)


def test_refresher_keeps_the_version_through_a_registry_outage_and_refuses_a_broken_one(
    registry, cache, tmp_path, capsys
):
    from streaming.model_refresh import ModelRefresher, record_of

    mlflow_demo.set_alias(registry["root"], "demo_ctr", "champion", registry["v1"])
    spec = spec_for(registry, "models:/demo_ctr@champion", cache)
    v1 = resolve(spec)
    refresher = ModelRefresher(spec, v1, refresh_s=1e-9)
    db = registry["root"] / "mlflow.db"
    shutil.move(db, tmp_path / "away.db")
    try:
        assert refresher.for_batch(1) is v1
        assert refresher.for_batch(2) is v1
    finally:
        shutil.move(tmp_path / "away.db", db)
    out = capsys.readouterr().out
    assert out.count("cannot refresh the model") == 1 and "keeps scoring" in out  # once a minute
    # A replay names the version its first attempt recorded, whatever the alias says now.
    mlflow_demo.set_alias(registry["root"], "demo_ctr", "champion", registry["v2"])
    assert refresher.for_batch(3, recorded=record_of(v1)).version == v1.version
    assert refresher.for_batch(4).version.startswith(f"{registry['v2']}+")
    mlflow_demo.set_alias(registry["root"], "demo_ctr", "champion", registry["v1"])


def test_the_scorer_refuses_an_unknown_alias_with_exit_2_and_one_sentence(registry, tmp_path):
    import subprocess
    import sys

    cfg = tmp_path / "serve.toml"
    cfg.write_text(
        f"""
[model]
path = "models:/demo_ctr@nope"
registry_uri = "{registry["uri"]}"
name = "demo_ctr"
input_columns = {list(CTR)!r}
""".replace("'", '"')
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "serving", "--config", str(cfg)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "has no alias 'nope'" in lines[0]
