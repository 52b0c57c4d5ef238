"""Typed signatures in the core, without Spark: several named inputs of their own dtype and shape,
several outputs, per-row reasons before the model, bisection when the model raises."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from udfs import examples
from udfs.config import from_dict
from udfs.core import STATS, check_input, check_model, load_scorer, score_batch
from udfs.errors import ColumnTypeError, ConfigError, ModelLoadError
from udfs.features import check_columns
from udfs.signature import InputError, decode_arrow, row_from_inputs, rows_to_batch
from udfs.spec import ModelSpec, resolve


@pytest.fixture(scope="module")
def example_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("examples")
    return {name: examples.save(name, make(), out) for name, make in examples.MODULES.items()}


def spec_of(name: str, path: str, **extra) -> ModelSpec:
    return from_dict(
        ModelSpec, {**examples.model_table(name), "name": name, "path": path, **extra}, where="model"
    )


def scorer_of(name: str, path: str, **extra):
    model = resolve(spec_of(name, path, **extra))
    check_model(model)
    return load_scorer(model)


def script(module: torch.nn.Module, path) -> str:
    torch.jit.save(torch.jit.script(module), str(path))
    return str(path)


@pytest.mark.parametrize("name", sorted(examples.MODULES))
def test_every_example_gives_the_same_outputs_in_all_three_formats(example_files, name):
    batch = examples.table(name, 50)
    outs = {fmt: score_batch(batch, scorer_of(name, str(p))) for fmt, p in example_files[name].items()}
    ref = outs["torchscript"]
    assert ref.column("error").null_count == 50
    for fmt in ("export", "onnx"):
        for col in ref.schema.names:
            if col in ("model_version", "error"):
                continue
            a, b = ref.column(col).to_pylist(), outs[fmt].column(col).to_pylist()
            np.testing.assert_allclose(np.array(a, dtype=float), np.array(b, dtype=float), atol=1e-6)


def test_example_outputs_equal_the_module_called_directly(example_files):
    module = examples.two_head_module()
    batch = examples.table("two_head", 8)
    feats = torch.tensor(np.stack(batch.column("features").to_pylist()), dtype=torch.float32)
    device = torch.tensor(batch.column("device").to_numpy())
    with torch.no_grad():
        want = module(feats, device)
    out = score_batch(batch, scorer_of("two_head", str(example_files["two_head"]["torchscript"])))
    np.testing.assert_allclose(out.column("ctr").to_numpy(), torch.sigmoid(want["ctr"]).numpy(), rtol=1e-6)
    np.testing.assert_allclose(out.column("cvr").to_numpy(), torch.sigmoid(want["cvr"]).numpy(), rtol=1e-6)


def test_bad_rows_of_each_kind_get_a_reason_naming_the_input(example_files):
    scorer = scorer_of("two_head", str(example_files["two_head"]["torchscript"]))
    good = [0.5] * 16
    batch = pa.record_batch(
        {
            "features": pa.array(
                [good, good[:15], None, [*good[:3], float("nan"), *good[4:]], good, good, good]
            ),
            "device": pa.array([1.0, 1.0, 1.0, 1.0, 3.5, 16.0, None]),
        }
    )
    out = score_batch(batch, scorer)
    assert out.column("error").to_pylist() == [
        None,
        "wrong shape: features expects [16], got 15 values",
        "null input: features",
        "non-finite value: features[3] = nan",
        "not an int32 id: device_id = 3.5",
        "id out of range: device_id = 16, expected 0 <= id < 16",
        "null input: device_id",
    ]
    assert out.column("ctr").to_pylist()[1:] == [None] * 6
    assert out.column("ctr").to_pylist()[0] is not None


def test_sequences_are_checked_against_max_length_and_the_embedding_table(example_files):
    scorer = scorer_of("text", str(example_files["text"]["torchscript"]))
    batch = pa.record_batch(
        {"tokens": pa.array([[5, 6, 7], [1] * 65, [], [5, 1000], [5, -1], [2, 3]], pa.list_(pa.int64()))}
    )
    out = score_batch(batch, scorer)
    assert out.column("error").to_pylist() == [
        None,
        "sequence too long: input_ids has 65 values, max_length is 64",
        "empty sequence: input_ids",
        "id out of range: input_ids[1] = 1000, expected 0 <= id < 1000",
        "id out of range: input_ids[1] = -1, expected 0 <= id < 1000",
        None,
    ]
    assert out.column("label").to_pylist()[0] in (0, 1, 2)


def test_per_position_tables_bound_each_categorical_id(example_files):
    scorer = scorer_of("dlrm", str(example_files["dlrm"]["onnx"]))
    batch = examples.table("dlrm", 3)
    bad = batch.column("c7").to_pylist()
    bad[1] = 20  # table 7 has 20 rows; 20 fits every other table
    batch = batch.set_column(batch.schema.get_field_index("c7"), "c7", pa.array(bad))
    out = score_batch(batch, scorer)
    assert out.column("error").to_pylist() == [
        None,
        "id out of range: sparse['c7'] = 20, expected 0 <= id < 20",
        None,
    ]


def test_padding_per_length_bucket_gives_the_same_outputs_as_one_padded_batch(example_files):
    path = str(example_files["text"]["torchscript"])
    batch = examples.table("text", 200, seed=4)
    bucketed = score_batch(batch, scorer_of("text", path, batch_size=16))
    plain = score_batch(batch, scorer_of("text", path, batch_size=16, bucket_by_length=False))
    whole = score_batch(batch, scorer_of("text", path, batch_size=4096))
    for other in (plain, whole):
        np.testing.assert_allclose(
            np.array(bucketed.column("probabilities").to_pylist()),
            np.array(other.column("probabilities").to_pylist()),
            atol=1e-6,
        )


class FailsOnMarker(torch.nn.Module):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if bool((ids == 666).any()):
            raise RuntimeError("index 666 is out of range")
        return ids.double().sum(1)


def test_a_model_error_is_bisected_to_the_failing_rows_and_the_rest_are_scored(tmp_path):
    path = script(FailsOnMarker(), tmp_path / "marker.pt")
    spec = ModelSpec(
        path=path,
        inputs=(from_dict_input({"name": "ids", "columns": ["a", "b"], "dtype": "int64"}),),
    )
    scorer = load_scorer(resolve(spec))
    a = list(range(100))
    a[17], a[80] = 666, 666
    before = STATS.snapshot()
    out = score_batch(pa.record_batch({"a": pa.array(a), "b": pa.array([1] * 100)}), scorer)
    errors = out.column("error").to_pylist()
    assert [i for i, e in enumerate(errors) if e] == [17, 80]
    assert errors[17].startswith("model error: ") and "index 666 is out of range" in errors[17]
    assert out.column("prediction").to_pylist()[16] == 17.0
    model_errors, calls = (x - y for x, y in zip(STATS.snapshot(), before, strict=True))
    assert model_errors == 2 and 0 < calls <= 64


def test_bisection_stops_at_max_bisect_calls_and_the_rest_keep_the_model_error(tmp_path):
    path = script(FailsOnMarker(), tmp_path / "marker.pt")
    spec = ModelSpec(
        path=path,
        max_bisect_calls=2,
        inputs=(from_dict_input({"name": "ids", "columns": ["a"], "dtype": "int64"}),),
    )
    out = score_batch(
        pa.record_batch({"a": pa.array([1, 2, 3, 666, 5, 6, 7, 8])}), load_scorer(resolve(spec))
    )
    # Two extra calls: the halves [1..4] (fails: its rows keep the error) and [5..8] (scored).
    assert [e is not None for e in out.column("error").to_pylist()] == [True] * 4 + [False] * 4


def from_dict_input(d):
    from udfs.signature import InputSpec

    return from_dict(InputSpec, d, where="model.inputs")


class WritesItsInput(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.sum(1)
        x.mul_(0)
        return out


class Sums(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(1)


@pytest.mark.parametrize("typed", [False, True])
def test_a_model_writing_into_its_input_changes_neither_the_batch_nor_the_next_member(tmp_path, typed):
    paths = [script(WritesItsInput(), tmp_path / "w.pt"), script(Sums(), tmp_path / "s.pt")]
    members = [{"path": p, "name": n} for p, n in zip(paths, ("writer", "reader"), strict=True)]
    layout = (
        {"inputs": [{"name": "x", "column": "f", "shape": [3]}]}
        if typed
        else {"input_columns": ["f"], "num_features": 3}
    )
    spec = from_dict(ModelSpec, {"members": members, **layout, "member_outputs": not typed}, where="model")
    f = pa.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], pa.list_(pa.float32()))
    batch = pa.record_batch({"f": f})
    out = score_batch(batch, load_scorer(resolve(spec)))
    assert batch.column("f").to_pylist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    assert out.column("prediction").to_pylist() == [6.0, 15.0]  # both members saw the original rows


class Identity(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def test_int64_ids_above_2_to_the_24_reach_the_model_exactly(tmp_path):
    path = script(Identity(), tmp_path / "id.pt")
    spec = ModelSpec(
        path=path, inputs=(from_dict_input({"name": "x", "column": "id", "shape": [], "dtype": "int64"}),)
    )
    big = 2**24 + 1
    out = score_batch(pa.record_batch({"id": pa.array([big, 2**40 + 3])}), load_scorer(resolve(spec)))
    assert out.column("prediction").to_pylist() == [float(big), float(2**40 + 3)]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"path": "m.pt", "input_columns": ["x"], "activation": "softmax"}, "every prediction 1.0"),
        (
            {
                "path": "m.pt",
                "inputs": [{"name": "x", "columns": ["a"]}],
                "outputs": [{"name": "p", "activation": "softmax"}],
            },
            "every prediction 1.0",
        ),
        ({"path": "m.pt", "inputs": [{"name": "x", "column": "a"}]}, "set shape"),
        ({"path": "m.pt", "inputs": [{"name": "x", "columns": ["a"], "shape": [-1]}]}, "does not hold"),
        (
            {"path": "m.pt", "inputs": [{"name": "x", "columns": ["a"]}, {"name": "m", "mask_of": "x"}]},
            "must name a variable-length input",
        ),
        (
            {"path": "m.pt", "inputs": [{"name": "x", "columns": ["a"], "range": [0, 5]}]},
            "applies to int64/int32",
        ),
        ({"path": "m.pt", "input_columns": ["a"], "inputs": [{"name": "x", "columns": ["a"]}]}, "not both"),
        (
            {
                "members": [{"path": "a.pt"}, {"path": "b.pt"}],
                "combiner": "majority_vote",
                "inputs": [{"name": "x", "columns": ["a"]}],
                "outputs": [{"name": "e", "kind": "vector"}],
            },
            "votes on labels",
        ),
        ({"path": "m.pt", "inputs": [{"name": "x", "columns": ["a"], "colour": 1}]}, "unknown key"),
    ],
)
def test_bad_signature_configs_are_one_sentence(table, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ModelSpec, table, where="model")


def test_num_features_with_one_scalar_column_is_refused_before_any_task():
    schema = pa.schema([("x", pa.float64())])
    with pytest.raises(ColumnTypeError, match="scalar double but num_features = 4"):
        check_columns(schema, ("x",), 4)


def test_a_config_that_does_not_match_the_declared_signature_names_what_the_model_expects(example_files):
    table = examples.model_table("dlrm")
    table["inputs"][1]["dtype"] = "float32"
    del table["inputs"][1]["embedding"]
    for fmt in ("export", "onnx"):
        spec = from_dict(ModelSpec, {**table, "path": str(example_files["dlrm"][fmt])}, where="model")
        with pytest.raises(
            ModelLoadError,
            match=r"expects 2 input\(s\).*'sparse' is configured as float32: set dtype = 'int64'",
        ):
            check_model(resolve(spec))
    renamed = examples.model_table("dlrm")
    renamed["inputs"][0]["name"] = "numeric"
    spec = from_dict(ModelSpec, {**renamed, "path": str(example_files["dlrm"]["onnx"])}, where="model")
    with pytest.raises(ModelLoadError, match=r"\['numeric'\] are not among them"):
        check_model(resolve(spec))


def test_an_embedding_table_the_model_lacks_is_refused(example_files):
    table = examples.model_table("text")
    table["inputs"][0]["embedding"] = "words"
    spec = from_dict(ModelSpec, {**table, "path": str(example_files["text"]["torchscript"])}, where="model")
    with pytest.raises(ModelLoadError, match="no embedding table 'words'"):
        check_model(resolve(spec))


def test_columns_of_the_wrong_nesting_or_type_are_refused_before_scoring(example_files):
    model = resolve(spec_of("text", str(example_files["text"]["torchscript"])))
    with pytest.raises(ColumnTypeError, match=r"\(2 array levels\), but its shape \[-1\] needs 1"):
        check_input(pa.schema([("tokens", pa.list_(pa.list_(pa.int64())))]), model)
    with pytest.raises(ColumnTypeError, match="holds string"):
        check_input(pa.schema([("tokens", pa.list_(pa.string()))]), model)


def test_json_rows_decode_to_the_same_inputs_and_reasons_as_arrow_columns():
    sig = spec_of("two_tower", "x.pt").signature
    rows = [
        {"user_id": 3, "items": [1, 2, 3], "dense": [30, 1.5]},
        {"user_id": 3.5, "items": [1], "dense": [30, 1.5]},
        {"user_id": 4, "items": [], "dense": [30, None]},
    ]
    dec = decode_arrow(rows_to_batch(sig, [row_from_inputs(sig, r) for r in rows]), sig)
    arrow = pa.record_batch(
        {
            "user_id": pa.array([3, 3.5, 4]),
            "recent_items": pa.array([[1, 2, 3], [1], []]),
            "age": pa.array([30.0, 30.0, 30.0]),
            "tenure": pa.array([1.5, 1.5, None]),
        }
    )
    assert (
        dec.errors
        == decode_arrow(arrow, sig).errors
        == [None, "not an int64 id: user_id = 3.5", "empty sequence: items"]
    )
    assert dec.inputs["user_id"].tolist() == [3]


def test_a_missing_unknown_or_misshapen_input_names_the_input():
    sig = spec_of("two_tower", "x.pt").signature
    ok = {"user_id": 3, "items": [1, 2], "dense": [30, 1.5]}
    for inputs, name, text in [
        ({k: v for k, v in ok.items() if k != "items"}, "items", "missing input 'items'"),
        ({**ok, "colour": 1}, "colour", "unknown input 'colour'"),
        ({**ok, "items": [[1]]}, "items", "inputs.items: expected a list nested 1 deep"),
        ({**ok, "dense": [1, 2, 3]}, "dense", "inputs.dense: expected a list of 2 numbers"),
    ]:
        with pytest.raises(InputError, match=text) as err:
            row_from_inputs(sig, inputs)
        assert err.value.input == name
