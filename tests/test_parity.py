"""One row, one prediction, whichever path scores it.

The same rows (good and bad) and the same model spec go through the three
entry points a user runs: ``jobs/batch_score.py`` (Parquet in and out),
``jobs/stream_score.py`` (Apache Kafka in and out, once with Spark's JVM
Kafka source and once with ``kafka_py``) and the
real-time scorer (``python -m serving``, over HTTP). Predictions must agree to
1e-6, bad rows must get the same reason, and an ensemble's version, member
outputs and degraded flag must be the same everywhere. Specs: a single model, a
weighted ensemble of four of both engines (TorchScript, torch.export and ONNX Runtime
members), and an ensemble with one member that always fails (quorum 2), so every row is
scored degraded.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
import torch

from jobs import batch_score, stream_score
from streaming.broker import free_port as _free_port
from streaming.sink import H_ERROR
from tests.streaming.conftest import Kafka
from udfs.spec import ModelSpec, resolve

pytestmark = [pytest.mark.spark, pytest.mark.kafka, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-6
NAN, INF = float("nan"), float("inf")

# (user_id, features): good rows, then one bad row of each kind all three paths can carry.
ROWS: list[tuple[str, list[float | None]]] = [
    *[(f"u{i}", [18.0 + 7 * i, float(i % 5), 4.5 + 11.25 * i, float(i % 7)]) for i in range(12)],
    ("bad-length", [30.0, 2.0, 10.0]),
    ("bad-nan", [30.0, NAN, 10.0, 1.0]),
    ("bad-inf", [30.0, 2.0, INF, 1.0]),
    ("bad-null", [30.0, None, 10.0, 1.0]),
]
GOOD = {u for u, _ in ROWS if not u.startswith("bad")}


@dataclass(frozen=True)
class Scored:
    """What one path said about one row: the prediction fields, or the error reason."""

    prediction: float | None
    model_version: str | None
    error: str | None
    extra: dict[str, Any]  # degraded, missing_members, member_<name>


# -- the model specs --------------------------------------------------------------------------


class FailsOnRealRows(torch.nn.Module):
    """Passes the all-zero probe that start-up checks and warm-up send, then fails on every real
    row: a member that breaks after the job or server has started."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x != 0).any()):
            raise RuntimeError("member is down")
        return x[:, :1]


def _save(module: torch.nn.Module, path: Path) -> str:
    torch.jit.save(torch.jit.script(module.eval()), str(path))
    return str(path)


@pytest.fixture(scope="module")
def model_toml(models, onnx_models, tmp_path_factory) -> dict[str, str]:
    """The ``[model]`` section of each spec, shared by the three paths' configs."""
    d = tmp_path_factory.mktemp("parity-models")
    extra = []
    for seed in (7, 8):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        extra.append(_save(net, d / f"m{seed}.pt"))
    broken = _save(FailsOnRealRows(), d / "broken.pt")
    head = 'name = "parity"\ninput_columns = ["features"]\nnum_features = 4\ndevice = "cpu"\n'

    def members(paths: list[tuple[str, str, float]]) -> str:
        return "".join(
            f'\n[[model.members]]\npath = "{p}"\nname = "{n}"\nweight = {w}\n' for p, n, w in paths
        )

    mixed = [
        (models["torchscript"], "ctr", 2.0),
        (models["export"], "ctr_export", 1.0),
        (onnx_models["ctr"], "ctr_onnx", 1.0),
        (extra[0], "m7", 1.0),
    ]
    return {
        "single": f'[model]\npath = "{models["torchscript"]}"\n{head}',
        "ensemble": f"[model]\n{head}member_outputs = true\n" + members(mixed),
        "degraded": f'[model]\n{head}member_outputs = true\nquorum = 2\ncombiner = "weighted_mean"\n'
        + members([(extra[1], "m8", 1.0), (extra[0], "m7", 3.0), (broken, "broken", 1.0)]),
    }


# -- path 1: the batch job --------------------------------------------------------------------


def score_batch_job(spark, model_section: str, tmp: Path) -> dict[str, Scored]:
    src = tmp / "rows.parquet"
    spark.createDataFrame(ROWS, "user_id string, features array<double>").write.parquet(str(src))
    out = tmp / "batch-out"
    cfg = tmp / "batch.toml"
    cfg.write_text(
        model_section + f'\n[input]\npath = "{src}"\n\n[output]\npath = "{out}"\nkeep_columns = ["user_id"]\n'
    )
    assert batch_score.main(["--config", str(cfg)]) == 0
    table = pq.read_table(out).to_pylist()
    return {r.pop("user_id"): _scored(r, "prediction") for r in table}


# -- path 2: the streaming job through a broker -----------------------------------------------


def score_stream_job(kafka: Kafka, model_section: str, tmp: Path, tag: str, source: str) -> dict[str, Scored]:
    """The stream job over the rows on the session's Apache Kafka broker (``kafka`` fixture)."""
    tag = f"{tag}-{source}"
    events = kafka.topic(partitions=2, prefix=f"parity-{tag}")
    kafka.produce(
        events,
        # json.dumps writes NaN / Infinity tokens, which Spark's JSON reader accepts.
        [
            json.dumps({"user_id": u, "features": f, "timestamp": "2026-01-01T00:00:00Z"}).encode()
            for u, f in ROWS
        ],
    )
    cfg = tmp / f"stream-{source}.toml"
    cfg.write_text(
        model_section
        + textwrap.dedent(
            f"""
            [kafka]
            bootstrap_servers = "{kafka.bootstrap}"
            source = "{source}"
            latest_offsets_by = "{kafka.latest_by}"
            poll_timeout_ms = 30000

            [input]
            topic = "{events}"
            starting_offsets = "earliest"

            [output]
            topic = "predictions-{tag}"
            dlq_topic = "dlq-{tag}"
            commit_topic = "commits-{tag}"

            [stats]
            enabled = false

            [job]
            checkpoint = "{tmp / ("checkpoint-" + source)}"
            query_name = "parity_{tag}"
            """
        )
    )
    assert stream_score.main(["--config", str(cfg), "--available-now"]) == 0
    got: dict[str, Scored] = {}
    for r in kafka.read(f"predictions-{tag}"):
        body = json.loads(r.value)
        got[body.pop("user_id")] = _scored(body, "prediction")
    for r in kafka.read(f"dlq-{tag}"):
        user = json.loads(r.value)["user_id"]
        got[user] = Scored(None, None, r.headers[H_ERROR].decode(), {})
    return got


# -- path 3: the real-time scorer over HTTP ---------------------------------------------------


def score_http(model_section: str, tmp: Path) -> dict[str, dict[str, Scored]]:
    cfg = tmp / "serve.toml"
    cfg.write_text(model_section + '\n[server]\nlog_level = "warning"\n\n[cache]\nenabled = false\n')
    port = _free_port()
    log = (tmp / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving", "--config", str(cfg), "--port", str(port)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp / "serve.log").read_text()
            try:
                if httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the scorer never became ready"
            time.sleep(0.2)
        # One request per row (the common online call) and one request for all rows (micro-batched).
        singles = [
            httpx.post(url + "/predict", content=json.dumps({"features": f}), timeout=30).json()
            for _, f in ROWS
        ]
        batch = httpx.post(
            url + "/predict", content=json.dumps([{"features": f} for _, f in ROWS]), timeout=30
        ).json()["predictions"]
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()

    # Per-row requests and one all-rows request are scored in different batch shapes (float sums may
    # differ in the last bits), so each is a path of its own for the comparison.
    return {
        name: {
            u: Scored(None, None, r["error"], {}) if "error" in r else _scored(dict(r), "score")
            for (u, _), r in zip(ROWS, responses, strict=True)
        }
        for name, responses in (("http", singles), ("http_batch", batch))
    }


def _scored(fields: dict[str, Any], prediction_key: str) -> Scored:
    extra = {
        k: v for k, v in fields.items() if k.startswith("member_") or k in ("degraded", "missing_members")
    }
    return Scored(fields.get(prediction_key), fields.get("model_version"), fields.get("error"), extra)


# -- the comparison ---------------------------------------------------------------------------


def assert_same(paths: dict[str, dict[str, Scored]]) -> None:
    for name, got in paths.items():
        assert set(got) == {u for u, _ in ROWS}, f"{name}: rows missing or extra: {sorted(got)}"
    reference_name, reference = next(iter(paths.items()))
    for user, want in reference.items():
        for name, got in paths.items():
            have = got[user]
            where = f"{user}: {reference_name} {want} vs {name} {have}"
            assert have.error == want.error, where
            if want.error is None:
                assert have.model_version == want.model_version, where
                assert have.prediction is not None and want.prediction is not None, where
                assert math.isclose(have.prediction, want.prediction, rel_tol=0, abs_tol=TOLERANCE), where
                # JSON records leave out null fields; a missing field and a null one say the same.
                for k in set(have.extra) | set(want.extra):
                    a, b = have.extra.get(k), want.extra.get(k)
                    if isinstance(b, float) and a is not None:
                        assert math.isclose(a, b, rel_tol=0, abs_tol=TOLERANCE), where
                    else:
                        assert a == b, where


@pytest.mark.parametrize("spec_name", ["single", "ensemble", "degraded"])
def test_batch_stream_and_http_give_every_row_the_same_prediction_or_reason(
    spark, kafka, models, model_toml, tmp_path, spec_name
):
    section = model_toml[spec_name]
    paths = {
        "batch": score_batch_job(spark, section, tmp_path),
        "stream_kafka": score_stream_job(kafka, section, tmp_path, tag=spec_name, source="kafka"),
        "stream_kafka_py": score_stream_job(kafka, section, tmp_path, tag=spec_name, source="kafka_py"),
        **score_http(section, tmp_path),
    }
    assert_same(paths)

    batch = paths["batch"]
    assert {u for u, s in batch.items() if s.error is None} == GOOD
    assert batch["bad-length"].error == "wrong length: expected 4 features, got 3"
    assert batch["bad-null"].error == "null feature: features[1]"
    versions = {s.model_version for s in batch.values() if s.error is None}
    if spec_name == "single":
        single = resolve(ModelSpec(path=models["torchscript"], input_columns=("features",), num_features=4))
        assert versions == {single.version}
        assert all(not s.extra for s in batch.values())
    else:
        (version,) = versions
        assert version.startswith("ens-")
        good = [batch[u] for u in GOOD]
        degraded = spec_name == "degraded"
        assert all(s.extra["degraded"] is degraded for s in good)
        assert all(s.extra["missing_members"] == ("broken" if degraded else None) for s in good)
        if spec_name == "ensemble":
            # The ONNX export of the CTR model agrees with its TorchScript original on every path.
            for s in good:
                assert math.isclose(s.extra["member_ctr_onnx"], s.extra["member_ctr"], abs_tol=TOLERANCE)
        if degraded:
            # Weights renormalised over the two that answered: (1 * m8 + 3 * m7) / 4.
            for s in good:
                want = 0.25 * s.extra["member_m8"] + 0.75 * s.extra["member_m7"]
                assert math.isclose(s.prediction, want, rel_tol=0, abs_tol=TOLERANCE)


# == the example models with typed signatures (issue 17) ======================================
# Each example model goes through the batch job, the Column UDF, the stream job (Spark's Kafka
# source) and the real-time scorer (KServe v2 through tritonclient.http, binary and JSON), with bad
# rows mixed in: the same outputs to 1e-6 and the same reasons everywhere. A row that KServe v2
# cannot carry (a null, an empty sequence, a fixed-length array of another length: a tensor has none
# of these) is compared on the other paths only.

EXAMPLE_ROWS = 6


def _bad_rows(name: str) -> list[tuple[dict[str, Any], bool]]:
    """(changes to a good row, whether KServe v2 can carry the row) for each bad row of ``name``."""
    if name == "dlrm":
        return [({"c2": 500}, True), ({"c1": -1}, True), ({"i3": NAN}, True), ({"i4": None}, False)]
    if name == "text":
        return [({"tokens": [1] * 70}, True), ({"tokens": [5, 1000]}, True), ({"tokens": []}, False)]
    if name == "two_tower":
        return [
            ({"user_id": 5000}, True),
            ({"recent_items": [3, 2000]}, True),
            ({"age": INF}, True),
            ({"recent_items": []}, False),
        ]
    return [
        ({"device": 16}, True),
        ({"features": [0.5] * 15}, False),
        ({"features": [NAN] + [0.5] * 15}, True),
    ]


def _example_rows(name: str) -> tuple[list[dict[str, Any]], set[str]]:
    """Rows (with a string ``row``) of ``name``: good ones, then its bad ones; and the keys KServe can carry."""
    from udfs import examples

    good = examples.table(name, EXAMPLE_ROWS, seed=9).to_pylist()
    rows = [{**{k: v for k, v in r.items() if k != "id"}, "row": f"g{i}"} for i, r in enumerate(good)]
    wire = {r["row"] for r in rows}
    for j, (change, carried) in enumerate(_bad_rows(name)):
        rows.append({**rows[0], **change, "row": f"bad{j}"})
        if carried:
            wire.add(f"bad{j}")
    return rows, wire


def _spark_schema(name: str) -> str:
    from udfs import examples

    cols = {
        "dlrm": [f"{c} float" for c in examples.DENSE] + [f"{c} bigint" for c in examples.CATS],
        "text": ["tokens array<bigint>"],
        "two_tower": ["user_id bigint", "recent_items array<bigint>", "age double", "tenure double"],
        "two_head": ["features array<float>", "device int"],
    }[name]
    return ", ".join(["row string", *cols])


def _outputs(name: str) -> list[str]:
    from udfs import examples

    return [o["name"] for o in examples.model_table(name)["outputs"]]


@pytest.fixture(scope="module")
def example_models(tmp_path_factory) -> dict[str, dict[str, str]]:
    from udfs import examples

    out = tmp_path_factory.mktemp("parity-examples")
    # Each model in the format that is slowest to get right: ONNX for two of them, torch.export and
    # TorchScript for the others (tests/test_signature.py checks all three formats agree).
    fmt = {"dlrm": "onnx", "text": "torchscript", "two_tower": "export", "two_head": "onnx"}
    return {
        name: {"path": str(examples.save(name, examples.MODULES[name](), out, (fmt[name],))[fmt[name]])}
        for name in examples.MODULES
    }


def _example_section(name: str, path: str) -> str:
    from udfs import examples

    return (
        f'[model]\nname = "{name}"\npath = "{path}"\ndevice = "cpu"\nbatch_size = 4\n'
        + examples.CONFIGS[name]
    )


def _from_fields(r: dict[str, Any], outputs: list[str]) -> dict[str, Any]:
    return {"error": r.get("error"), **{o: r.get(o) for o in outputs}}


def _example_batch(spark, name: str, section: str, rows: list[dict[str, Any]], tmp: Path) -> dict[str, dict]:
    src = tmp / f"{name}.parquet"
    spark.createDataFrame(rows, _spark_schema(name)).write.parquet(str(src))
    out = tmp / f"{name}-batch-out"
    cfg = tmp / f"{name}-batch.toml"
    cfg.write_text(
        section + f'\n[input]\npath = "{src}"\n\n[output]\npath = "{out}"\nkeep_columns = ["row"]\n'
    )
    assert batch_score.main(["--config", str(cfg)]) == 0
    return {r["row"]: _from_fields(r, _outputs(name)) for r in pq.read_table(out).to_pylist()}


def _example_udf(spark, name: str, section: str, rows: list[dict[str, Any]]) -> dict[str, dict]:
    import tomllib

    from udfs import predict_udf
    from udfs.config import from_dict

    model = resolve(from_dict(ModelSpec, tomllib.loads(section)["model"], where="model"))
    df = spark.createDataFrame(rows, _spark_schema(name))
    scored = df.select("row", predict_udf(model)().alias("p")).select("row", "p.*")
    return {r["row"]: _from_fields(r.asDict(), _outputs(name)) for r in scored.collect()}


def _example_stream(
    kafka: Kafka, name: str, section: str, rows: list[dict[str, Any]], tmp: Path
) -> dict[str, dict]:
    events = kafka.topic(partitions=2, prefix=f"parity-ex-{name}")
    kafka.produce(events, [json.dumps({**r, "timestamp": "2026-01-01T00:00:00Z"}).encode() for r in rows])
    ddl = _spark_schema(name).replace("row string", "row STRING") + ", timestamp TIMESTAMP"
    cfg = tmp / f"{name}-stream.toml"
    cfg.write_text(
        section
        + textwrap.dedent(
            f"""
            [events]
            schema = "{ddl}"
            user_id = "row"

            [kafka]
            bootstrap_servers = "{kafka.bootstrap}"
            source = "kafka"
            latest_offsets_by = "{kafka.latest_by}"
            poll_timeout_ms = 30000

            [input]
            topic = "{events}"
            starting_offsets = "earliest"

            [output]
            topic = "predictions-ex-{name}"
            dlq_topic = "dlq-ex-{name}"
            commit_topic = "commits-ex-{name}"

            [stats]
            enabled = false

            [job]
            checkpoint = "{tmp / ("checkpoint-" + name)}"
            query_name = "parity_ex_{name}"
            """
        )
    )
    assert stream_score.main(["--config", str(cfg), "--available-now"]) == 0
    got: dict[str, dict] = {}
    for r in kafka.read(f"predictions-ex-{name}"):
        body = json.loads(r.value)
        got[body["row"]] = _from_fields(body, _outputs(name))
    for r in kafka.read(f"dlq-ex-{name}"):
        got[json.loads(r.value)["row"]] = {"error": r.headers[H_ERROR].decode()}
    return got


def _kserve_inputs(name: str, row: dict[str, Any], binary: bool) -> list[Any]:
    import numpy as np
    import tritonclient.http as triton

    from udfs import examples

    def tensor(input_name: str, values: Any, datatype: str, dtype: Any) -> Any:
        arr = np.asarray([values], dtype=dtype)
        t = triton.InferInput(input_name, list(arr.shape), datatype)
        t.set_data_from_numpy(arr, binary_data=binary)
        return t

    if name == "dlrm":
        return [
            tensor("dense", [row[c] for c in examples.DENSE], "FP32", np.float32),
            tensor("sparse", [row[c] for c in examples.CATS], "INT64", np.int64),
        ]
    if name == "text":
        return [tensor("input_ids", row["tokens"], "INT64", np.int64)]
    if name == "two_tower":
        return [
            tensor("user_id", row["user_id"], "INT64", np.int64),
            tensor("items", row["recent_items"], "INT64", np.int64),
            tensor("dense", [row["age"], row["tenure"]], "FP32", np.float32),
        ]
    return [
        tensor("features", row["features"], "FP32", np.float32),
        tensor("device_id", row["device"], "INT32", np.int32),
    ]


def _example_http(
    name: str, section: str, rows: list[dict[str, Any]], wire: set[str], tmp: Path
) -> dict[str, dict[str, dict]]:
    """KServe v2 through tritonclient.http, one request per row, binary and JSON."""
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    cfg = tmp / f"{name}-serve.toml"
    cfg.write_text(section + '\n[server]\nlog_level = "warning"\n\n[cache]\nenabled = false\n')
    port = _free_port()
    log = (tmp / f"{name}-serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving", "--config", str(cfg), "--port", str(port)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    out: dict[str, dict[str, dict]] = {"kserve_binary": {}, "kserve_json": {}}
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp / f"{name}-serve.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the scorer never became ready"
            time.sleep(0.2)
        client = triton.InferenceServerClient(url=f"127.0.0.1:{port}")
        for binary, path in ((True, "kserve_binary"), (False, "kserve_json")):
            for row in rows:
                if row["row"] not in wire:
                    continue
                try:
                    result = client.infer(name, _kserve_inputs(name, row, binary))
                except InferenceServerException as exc:
                    prefix = "bad input rows: row 0: "
                    msg = exc.message()
                    assert msg.startswith(prefix), msg
                    out[path][row["row"]] = {"error": msg.removeprefix(prefix)}
                    continue
                fields = {o: result.as_numpy(o)[0].tolist() for o in _outputs(name)}
                out[path][row["row"]] = {"error": None, **fields}
        client.close()
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    return out


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, list) or isinstance(b, list):
        return (
            a is not None
            and b is not None
            and len(a) == len(b)
            and all(_close(x, y) for x, y in zip(a, b, strict=True))
        )
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=0, abs_tol=TOLERANCE)
    return a == b


@pytest.mark.parametrize("name", ["dlrm", "text", "two_tower", "two_head"])
def test_example_models_give_the_same_outputs_and_reasons_on_every_path(
    spark, kafka, example_models, tmp_path, name
):
    section = _example_section(name, example_models[name]["path"])
    rows, wire = _example_rows(name)
    paths = {
        "batch": _example_batch(spark, name, section, rows, tmp_path),
        "udf": _example_udf(spark, name, section, rows),
        "stream": _example_stream(kafka, name, section, rows, tmp_path),
        **_example_http(name, section, rows, wire, tmp_path),
    }
    batch = paths["batch"]
    assert sorted(batch) == sorted(r["row"] for r in rows)
    assert sorted(k for k, v in batch.items() if v["error"] is None) == [f"g{i}" for i in range(EXAMPLE_ROWS)]
    for path, got in paths.items():
        expected_keys = wire if path.startswith("kserve") else set(batch)
        assert set(got) == expected_keys, f"{path}: {sorted(got)}"
        for key, have in got.items():
            want = batch[key]
            assert have["error"] == want["error"], f"{name} {key}: batch {want} vs {path} {have}"
            if want["error"] is None:
                for o in _outputs(name):
                    assert _close(have[o], want[o]), f"{name} {key} {o}: batch {want[o]} vs {path} {have[o]}"
