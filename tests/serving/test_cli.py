"""``python -m serving``: starts on loopback with the shipped config, and a user mistake exits 2 in one sentence."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.serving.conftest import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_entry_point_serves_the_demo_config_on_loopback(models, tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving",
            "--config",
            "conf/serve.toml",
            "--port",
            str(port),
            "--model",
            models["torchscript"],
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"the scorer exited: {proc.stdout.read().decode() if proc.stdout else ''}")
        try:
            return httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, "the scorer to become ready", timeout=60)
        resp = httpx.post(url + "/predict", json={"user_id": 1, "item_id": 2, "features": [30, 2, 15.0, 3]})
        assert resp.status_code == 200
        assert resp.json()["model_version"]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert f"on http://127.0.0.1:{port}" in out.decode()


def test_a_config_mistake_exits_2_with_one_sentence(tmp_path):
    cfg = tmp_path / "serve.toml"
    cfg.write_text(
        (ROOT / "conf" / "serve.toml").read_text().replace("max_wait_ms = 2.0", "max_wait_msec = 2.0")
    )
    proc = subprocess.run(
        [sys.executable, "-m", "serving", "--config", str(cfg)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(
        "[sparkscore] error: unknown key(s) ['max_wait_msec'] in [serve config.batcher]"
    )
    assert "Traceback" not in proc.stderr


def test_a_missing_model_file_exits_2_naming_it(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving",
            "--config",
            "conf/serve.toml",
            "--model",
            str(tmp_path / "none.pt"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "none.pt" in proc.stderr and "does not exist" in proc.stderr
