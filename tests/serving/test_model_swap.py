"""Model updates without downtime: a new version loads and warms up beside the old one, then takes over;
a broken file leaves the old version serving; cache keys carry the version."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
import torch

from serving.model import ModelRunner
from serving.service import Instance, Service
from tests.serving.conftest import make_config, wait_until
from tests.serving.test_http import core
from udfs.demo import CTR_FEATURES
from udfs.spec import ModelSpec, ResolvedModel, resolve

ROW = [31.0, 4.0, 19.5, 7.0]
LOAD = "/v2/repository/models/demo_ctr/load"


class Half(torch.nn.Module):
    """The demo model's score halved: a second version with different answers."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * 0.5


@pytest.fixture(scope="module")
def versions(models, tmp_path_factory) -> dict[str, str]:
    """Two model files with different answers, "a" (the demo model) and "b"."""
    out = tmp_path_factory.mktemp("versions")
    b = out / "b.pt"
    torch.jit.save(torch.jit.script(Half(models["module"]).eval()), str(b))
    return {"a": models["torchscript"], "b": str(b)}


def served(tmp_path: Path, source: str) -> tuple[Path, ResolvedModel]:
    """A model path the test can overwrite, holding ``source`` to begin with."""
    path = tmp_path / "model.pt"
    shutil.copy(source, path)
    return path, resolve(ModelSpec(path=str(path), input_columns=CTR_FEATURES, name="demo_ctr", device="cpu"))


def replace_file(path: Path, source: str | bytes) -> None:
    """Overwrite ``path`` in one step, as a deploy tool would (write aside, then rename)."""
    tmp = path.with_suffix(".tmp")
    if isinstance(source, bytes):
        tmp.write_bytes(source)
    else:
        shutil.copy(source, tmp)
    os.replace(tmp, path)


def version_of(source: str) -> str:
    return resolve(ModelSpec(path=source, input_columns=CTR_FEATURES)).version


def test_five_swaps_under_load_answer_every_request_with_the_old_or_the_new_version(
    serve, versions, tmp_path
):
    path, model = served(tmp_path, versions["a"])
    srv = serve(model=model)
    known = {version_of(versions["a"]), version_of(versions["b"])}
    stop = threading.Event()
    answers: list[tuple[int, str | None]] = []

    def load(k: int) -> None:
        with httpx.Client(timeout=30) as client:
            for i in range(100_000):
                if stop.is_set():
                    return
                body = {"user_id": k, "features": [20.0 + i % 50, float(k), 10.0, 1.0]}
                resp = client.post(srv.url + "/predict", json=body)
                answers.append((resp.status_code, resp.json().get("model_version")))

    threads = [threading.Thread(target=load, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        for swap in range(5):
            source = versions["b" if swap % 2 == 0 else "a"]
            replace_file(path, source)
            seen_before = len(answers)
            resp = srv.post(LOAD)
            assert resp.status_code == 200, resp.text
            assert resp.json()["model_version"] == version_of(source)
            assert resp.json()["changed"] is True
            # The same features as before the swap: the new version answers, never the old cached one.
            after = srv.post("/predict", {"features": ROW}).json()
            assert after["model_version"] == version_of(source)
            assert (
                after["score"]
                == core(resolve(ModelSpec(path=source, input_columns=CTR_FEATURES)), [ROW])
                .column("prediction")[0]
                .as_py()
            )
            wait_until(lambda n=seen_before: len(answers) > n + 20, "traffic during the swap")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert len(answers) > 100
    assert {status for status, _ in answers} == {200}
    assert {v for _, v in answers} == known
    assert srv.metric("sparkscore_model_loads_total", result="success") == 6  # start-up + five swaps


def test_a_broken_new_file_keeps_the_old_version_serving_with_the_reason(serve, versions, tmp_path):
    path, model = served(tmp_path, versions["a"])
    srv = serve(model=model)
    replace_file(path, b"this is not a model")
    resp = srv.post(LOAD)
    assert resp.status_code == 400
    assert f"{model.version} keeps serving" in resp.json()["error"]
    assert "could not be loaded" in resp.json()["error"]
    ok = srv.post("/predict", {"features": ROW})
    assert ok.status_code == 200 and ok.json()["model_version"] == model.version
    assert srv.metric("sparkscore_model_loads_total", result="failure") == 1
    (index,) = srv.post("/v2/repository/index").json()
    assert index["version"] == model.version and "could not be loaded" in index["reason"]
    # Loading the same file again is a no-op; a new path is taken as given.
    replace_file(path, versions["a"])
    assert srv.post(LOAD).json()["changed"] is False
    shutil.copy(versions["b"], tmp_path / "b.pt")
    moved = srv.post(LOAD, {"parameters": {"path": "b.pt"}})  # relative to the model's directory
    assert moved.json()["model_version"] == version_of(versions["b"])


@pytest.mark.parametrize("where", ["/etc/passwd", "/nonexistent/model.pt", "../elsewhere.pt", "s3://b/m.pt"])
def test_the_load_endpoint_reads_only_under_its_directory_and_says_nothing_of_other_files(
    serve, versions, tmp_path, where
):
    path, model = served(tmp_path, versions["a"])
    srv = serve(model=model)
    resp = srv.post(LOAD, {"parameters": {"path": where}})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert "exist" not in error and "No such file" not in error
    assert ("load_uris" if "://" in where else f"under {tmp_path}") in error
    assert srv.metric("sparkscore_model_loads_total", result="failure") == 0  # refused, never tried


def test_load_needs_the_token_when_one_is_set(serve, versions, tmp_path):
    path, model = served(tmp_path, versions["a"])
    srv = serve(model=model, token="s3cret")
    replace_file(path, versions["b"])
    assert srv.post(LOAD).status_code == 401
    resp = srv.post(LOAD, headers={"authorization": "Bearer s3cret"})
    assert resp.status_code == 200 and resp.json()["model_version"] == version_of(versions["b"])
    assert (
        srv.post(
            "/v2/repository/models/demo_ctr/unload", headers={"authorization": "Bearer s3cret"}
        ).status_code
        == 400
    )


def test_the_opt_in_file_watch_swaps_a_changed_file_and_skips_a_broken_one(serve, versions, tmp_path):
    path, model = served(tmp_path, versions["a"])
    srv = serve(model=model, reload={"watch": True, "poll_s": 0.05})

    def version() -> str:
        return srv.post("/predict", {"features": ROW}).json()["model_version"]

    replace_file(path, versions["b"])
    wait_until(lambda: version() == version_of(versions["b"]), "the watch to load the new file")
    replace_file(path, b"half-written garbage")
    wait_until(lambda: srv.metric("sparkscore_model_loads_total", result="failure") == 1, "the failed load")
    assert version() == version_of(versions["b"])


def _raw_post_head(path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()


def test_a_versioned_request_whose_body_straddles_a_swap_is_answered_by_that_version(
    serve, versions, tmp_path
):
    path, model = served(tmp_path, versions["a"])
    srv = serve(model=model)
    old = model.version
    body = json.dumps(
        {"inputs": [{"name": "input__0", "shape": [1, 4], "datatype": "FP32", "data": [ROW]}]}
    ).encode()
    url = urlparse(srv.url)
    with socket.create_connection((url.hostname, url.port), timeout=20) as sock:
        sock.sendall(_raw_post_head(f"/v2/models/demo_ctr/versions/{old}/infer", body) + body[:10])
        held = srv.app.service.primary
        wait_until(lambda: getattr(held, "holds", 0) == 1, "the request to hold its version")
        replace_file(path, versions["b"])
        swapped = srv.post(LOAD)
        assert swapped.status_code == 200 and swapped.json()["model_version"] == version_of(versions["b"])
        sock.sendall(body[10:])
        received = b""
        while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)  # the 20 s socket timeout fails a request that hangs
            if not chunk:
                break
            received += chunk
    assert received.startswith(b"HTTP/1.1 200"), received[:300]
    assert json.loads(received.split(b"\r\n\r\n", 1)[1])["model_version"] == old
    # Released, the old version retires; the new one answers.
    wait_until(lambda: held.retired, "the old version to retire once released")
    assert srv.post("/predict", {"features": ROW}).json()["model_version"] == version_of(versions["b"])


def test_a_request_awaiting_the_feature_store_during_a_swap_is_answered_not_left_hanging(versions, tmp_path):
    path, model = served(tmp_path, versions["a"])
    cfg = make_config(model)

    class SlowStore:
        """A feature store that answers when the test says so (the request is mid-await meanwhile)."""

        def __init__(self) -> None:
            self.asked = asyncio.Event()
            self.answer = asyncio.Event()

        async def fetch(self, user_id: str, item_id: str):
            self.asked.set()
            await self.answer.wait()
            keys = dict(zip(CTR_FEATURES, (str(v).encode() for v in ROW), strict=True))
            return keys, {"x": b"1"}

    async def scenario() -> dict:
        svc = Service(cfg, ModelRunner(model))
        await svc.start(wait=True)
        store = SlowStore()
        svc.store = store
        try:
            pending = asyncio.ensure_future(
                svc.predict(Instance(user_id="u", item_id="i"), time.monotonic() + 20)
            )
            await store.asked.wait()
            replace_file(path, versions["b"])
            await svc.reload()
            await asyncio.sleep(0.2)  # the old version's retire task runs meanwhile
            store.answer.set()
            return await asyncio.wait_for(pending, 20)
        finally:
            await svc.stop()

    out = asyncio.run(scenario())
    assert out["model_version"] == model.version
