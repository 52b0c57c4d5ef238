"""Typed signatures on Spark: with_predictions and predict_udf over several columns, array and
nested array columns, several outputs as columns / struct fields, and bad rows mixed in."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from udfs import examples, predict_udf, with_predictions
from udfs.config import from_dict
from udfs.errors import ColumnTypeError
from udfs.spec import ModelSpec, resolve

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("typed-examples")
    return {
        "dlrm": examples.save("dlrm", examples.dlrm_module(), out, ("torchscript",)),
        "text": examples.save("text", examples.text_module(), out, ("onnx",)),
        "two_head": examples.save("two_head", examples.two_head_module(), out, ("torchscript", "export")),
    }


def model_of(name: str, path) -> object:
    spec = from_dict(
        ModelSpec, {**examples.model_table(name), "name": name, "path": str(path)}, where="model"
    )
    return resolve(spec)


def test_dlrm_reads_13_float_and_8_long_columns_and_flags_bad_ids(spark, files):
    table = examples.table("dlrm", 40)
    rows = table.to_pylist()
    rows[3]["c2"] = 500  # table 2 has 500 rows
    rows[5]["i4"] = None
    df = spark.createDataFrame(rows, schema=spark.createDataFrame(table.to_pandas()).schema)
    out = df.transform(with_predictions(model_of("dlrm", files["dlrm"]["torchscript"]), keep=["id", "c2"]))
    got = {r["id"]: r for r in out.collect()}
    assert got[3]["error"] == "id out of range: sparse['c2'] = 500, expected 0 <= id < 500"
    assert got[5]["error"] == "null input: dense ('i4')"
    assert got[3]["c2"] == 500 and got[3]["ctr"] is None
    assert sum(r["error"] is None for r in got.values()) == 38
    assert all(0 < r["ctr"] < 1 for r in got.values() if r["error"] is None)


def test_udf_takes_a_variable_length_array_column_and_returns_probabilities_and_label(spark, files):
    model = model_of("text", files["text"]["onnx"])
    df = spark.createDataFrame(
        [(1, [5, 6, 7]), (2, [1] * 70), (3, [9]), (4, None)], "id long, tokens array<bigint>"
    )
    out = df.select("id", predict_udf(model)("tokens").alias("p")).select("id", "p.*").orderBy("id").collect()
    assert [r["error"] for r in out] == [
        None,
        "sequence too long: input_ids has 70 values, max_length is 64",
        None,
        "null input: input_ids",
    ]
    assert len(out[0]["probabilities"]) == 3 and abs(sum(out[0]["probabilities"]) - 1) < 1e-5
    assert out[0]["label"] == int(np.argmax(out[0]["probabilities"]))
    same = df.transform(with_predictions(model, keep=["id"])).orderBy("id").collect()
    assert [r["probabilities"] for r in same] == [r["probabilities"] for r in out]


def test_two_outputs_come_back_as_two_columns_and_two_struct_fields(spark, files):
    model = model_of("two_head", files["two_head"]["export"])
    table = examples.table("two_head", 6)
    df = spark.createDataFrame(table.to_pandas(), "id long, features array<float>, device int")
    scored = df.transform(with_predictions(model, keep=["id"]))
    assert scored.columns == ["id", "ctr", "cvr", "model_version", "error"]
    via_udf = df.select("id", predict_udf(model)("features", "device").alias("s")).select(
        "id", "s.ctr", "s.cvr"
    )
    a = sorted((r["id"], r["ctr"], r["cvr"]) for r in scored.collect())
    b = sorted((r["id"], r["ctr"], r["cvr"]) for r in via_udf.collect())
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-6)


class Nested(torch.nn.Module):
    """Takes [batch, 2, 3] and writes into it in place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.sum(dim=(1, 2)).double()
        x.mul_(0)
        return out


def test_nested_array_column_feeds_a_2d_input_and_kept_columns_survive_an_in_place_model(spark, tmp_path):
    path = tmp_path / "nested.pt"
    torch.jit.save(torch.jit.script(Nested()), str(path))
    spec = from_dict(
        ModelSpec,
        {"path": str(path), "inputs": [{"name": "x", "column": "grid", "shape": [2, 3], "dtype": "float64"}]},
        where="model",
    )
    df = spark.createDataFrame(
        [(1, [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), (2, [[1.0, 2.0], [3.0, 4.0]])],
        "id long, grid array<array<double>>",
    )
    out = df.transform(with_predictions(resolve(spec))).orderBy("id").collect()
    assert out[0]["grid"] == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]] and out[0]["prediction"] == 21.0
    assert out[1]["error"] == "wrong shape: x expects [2, 3], got a row of 2 values at depth 1"


def test_a_string_column_for_an_id_input_is_refused_before_any_task(spark, files):
    df = spark.createDataFrame([(1, "7")], "id long, device string").selectExpr(
        "id", "array_repeat(cast(0.5 as float), 16) as features", "device"
    )
    with pytest.raises(ColumnTypeError, match="column 'device' of input 'device_id' holds string"):
        df.transform(with_predictions(model_of("two_head", files["two_head"]["torchscript"])))


class FailsOnMarker(torch.nn.Module):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if bool((ids == 666).any()):
            raise RuntimeError("index 666 is out of range")
        return ids.double().sum(1)


def test_batch_job_bisects_a_failing_batch_and_counts_model_errors_in_its_summary(spark, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs import batch_score

    model = tmp_path / "marker.pt"
    torch.jit.save(torch.jit.script(FailsOnMarker()), str(model))
    a = list(range(200))
    a[7] = a[150] = 666
    pq.write_table(pa.table({"id": list(range(200)), "a": a, "b": [1] * 200}), tmp_path / "in.parquet")
    cfg = tmp_path / "job.toml"
    cfg.write_text(
        f"""
[model]
path = "{model}"
batch_size = 100

[[model.inputs]]
name = "ids"
columns = ["a", "b"]
dtype = "int64"

[input]
path = "{tmp_path / "in.parquet"}"

[output]
path = "{tmp_path / "out"}"
keep_columns = ["id"]
"""
    )
    assert batch_score.main(["--config", str(cfg)]) == 0
    printed = capsys.readouterr().out
    calls = int(re.search(r"model errors: 2 rows \(found with (\d+) extra model calls\)", printed).group(1))
    assert 0 < calls <= 128  # two batches of 100 rows, at most max_bisect_calls = 64 each
    out = spark.read.parquet(str(tmp_path / "out"))
    bad = {r["id"]: r["error"] for r in out.where("error is not null").collect()}
    assert sorted(bad) == [7, 150] and all(e.startswith("model error: ") for e in bad.values())
    assert out.where("error is null and prediction = id + 1").count() == 198


def test_stream_events_may_carry_each_input_by_name(spark, files):
    from streaming.pipeline import by_input_name, check_event_schema, score_events

    model = model_of("dlrm", files["dlrm"]["torchscript"])
    table = examples.table("dlrm", 3).to_pylist()
    events = [
        (
            f"u{i}",
            [r[c] for c in examples.DENSE][: 12 if i == 2 else 13],
            [r[c] for c in examples.CATS],
        )
        for i, r in enumerate(table)
    ]
    df = spark.createDataFrame(events, "user_id string, dense array<float>, sparse array<bigint>").selectExpr(
        "cast(null as binary) key",
        "cast(null as binary) value",
        "'t' topic",
        "0 partition",
        "cast(0 as bigint) offset",
        "user_id",
        "timestamp'2026-01-01 00:00:00' timestamp",
        "cast(null as string) parse_error",
        "dense",
        "sparse",
    )
    check_event_schema(df.schema, user_id="user_id", timestamp="timestamp", model=model)
    assert sorted(by_input_name(model, df.columns)) == sorted([*examples.DENSE, *examples.CATS])
    got = {r["user_id"]: r for r in df.transform(score_events(model)).collect()}
    columns = spark.createDataFrame([{"id": i, **r} for i, r in enumerate(table)])
    want = {
        f"u{r['id']}": r["ctr"] for r in columns.transform(with_predictions(model, keep=["id"])).collect()
    }
    assert got["u0"]["ctr"] == pytest.approx(want["u0"], abs=1e-6)
    assert got["u1"]["ctr"] == pytest.approx(want["u1"], abs=1e-6)
    assert got["u2"]["error"] == "null input: dense ('i13')"
