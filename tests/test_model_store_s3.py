"""s3:// model URIs against a real S3-protocol server on loopback (moto in server mode, its own
process), not a mocked client: resolved on the driver, fetched once per host, missing credentials
in one sentence."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from streaming.broker import free_port
from udfs import demo, mlflow_demo, model_cache, model_store
from udfs.core import check_model, load_scorer, score_batch
from udfs.model_store import ModelStoreError
from udfs.spec import ModelSpec, resolve

CTR = demo.CTR_FEATURES
ROOT = Path(__file__).resolve().parents[1]
BUCKET = "models"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with a bucket holding a model file and an MLflow model directory."""
    import boto3
    import mlflow.pytorch

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        out = tmp_path_factory.mktemp("s3-src")
        ts = demo.save_torchscript(demo.ctr_module(0), out / "ctr.pt")
        client.upload_file(str(ts), BUCKET, "files/ctr.pt")
        mlflow_demo.quiet()
        mlflow.pytorch.save_model(
            demo.ctr_module(0),
            str(out / "mlflow_ctr"),
            signature=mlflow_demo.ctr_signature(),
            input_example=np.zeros((2, 4), np.float32),
            serialization_format="pt2",
            pip_requirements=["torch"],
        )
        for f in (out / "mlflow_ctr").rglob("*"):
            if f.is_file():
                client.upload_file(
                    str(f), BUCKET, f"mlflow/ctr/{f.relative_to(out / 'mlflow_ctr').as_posix()}"
                )
        yield {"client": client, "local_pt": ts}
    finally:
        proc.terminate()
        proc.wait(10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def cache(tmp_path):
    model_store.forget()
    model_cache.clear()
    yield str(tmp_path / "cache")
    model_store.forget()
    model_cache.clear()


def test_an_s3_model_file_resolves_to_the_local_files_hash_and_scores(s3, cache):
    model = resolve(
        ModelSpec(path=f"s3://{BUCKET}/files/ctr.pt", input_columns=CTR, cache_dir=cache, device="cpu")
    )
    assert model.format == "torchscript"
    assert model.members[0].content_hash == model_store.content_hash(s3["local_pt"])
    check_model(model)
    table = demo.synthetic_ctr(5)
    out = score_batch(table, load_scorer(model))
    assert out["error"].null_count == 5 and set(out["model_version"].to_pylist()) == {model.version}


def test_an_s3_mlflow_model_directory_is_fetched_once_per_host(s3, cache, tmp_path):
    model = resolve(
        ModelSpec(path=f"s3://{BUCKET}/mlflow/ctr", input_columns=CTR, cache_dir=cache, device="cpu")
    )
    ref = model.members[0].store
    assert model.format == "export" and ref.location == f"s3://{BUCKET}/mlflow/ctr"
    other = ref.__class__(**{**ref.__dict__, "cache_dir": str(tmp_path / "executor-host")})
    model_store.forget()
    for _ in range(3):  # three tasks in one Python worker: one download
        local = model_store.fetch(other)
    assert model_store.downloads() == {ref.content_hash: 1}
    assert (local / "MLmodel").is_file()
    model_store.forget()  # a second Python worker on the same host: none
    assert model_store.fetch(other) == local
    assert model_store.downloads() == {}
    assert len(list(Path(tmp_path / "executor-host").glob("*/*/MLmodel"))) == 1


def test_an_s3_object_replaced_after_resolution_is_refused_on_the_executor(s3, cache, tmp_path):
    model = resolve(ModelSpec(path=f"s3://{BUCKET}/files/ctr.pt", input_columns=CTR, cache_dir=cache))
    ref = model.members[0].store
    s3["client"].put_object(Bucket=BUCKET, Key="files/ctr.pt", Body=b"not the model")
    try:
        other = ref.__class__(**{**ref.__dict__, "cache_dir": str(tmp_path / "executor-host")})
        model_store.forget()
        with pytest.raises(ModelStoreError, match="changed after the driver resolved them"):
            model_store.fetch(other)
    finally:
        s3["client"].upload_file(str(s3["local_pt"]), BUCKET, "files/ctr.pt")


def test_missing_s3_credentials_stop_the_batch_job_with_exit_2_before_any_data(s3, tmp_path):
    """A fresh process (MLflow caches its S3 client per process) without AWS credentials."""
    cfg = tmp_path / "batch.toml"
    cfg.write_text(
        f"""
[model]
path = "s3://{BUCKET}/files/ctr.pt"
input_columns = {list(CTR)!r}
cache_dir = "{tmp_path / "cache"}"

[input]
path = "{tmp_path / "in.parquet"}"

[output]
path = "{tmp_path / "out"}"
""".replace("'", '"')
    )
    (tmp_path / "in.parquet").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") or k == "AWS_ENDPOINT_URL_S3"}
    env.update(
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "batch_score.py"), "--config", str(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("[sparkscore] error: no credentials for 's3://models/files/ctr.pt': set AWS_")
    assert not (tmp_path / "out").exists()


def test_a_missing_s3_object_is_one_sentence(s3, cache):
    with pytest.raises(ModelStoreError, match=r"'s3://models/files/absent.pt'"):
        resolve(ModelSpec(path=f"s3://{BUCKET}/files/absent.pt", input_columns=CTR, cache_dir=cache))
