"""make gpu-check: says so and exits 0 without CUDA; on a GPU host, Spark's GPU settings and discovery."""

from __future__ import annotations

import json
import subprocess

import torch

from bench import gpu_check


def test_without_cuda_it_says_so_exits_0_and_writes_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--out", str(out)]) == 0
    assert "no CUDA device on this host" in capsys.readouterr().out
    assert not out.exists()


def test_discovery_script_reports_the_gpus_in_sparks_format(tmp_path):
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nprintf '0\\n1\\n'\n")
    fake.chmod(0o755)
    script = gpu_check.discovery_script(tmp_path / "gpus.sh")
    out = subprocess.run(
        [str(script)], capture_output=True, text=True, env={"PATH": f"{fake.parent}:/usr/bin:/bin"}
    )
    assert json.loads(out.stdout) == {"name": "gpu", "addresses": ["0", "1"]}


def test_every_task_slot_shares_the_one_gpu_of_the_executor(tmp_path):
    conf = gpu_check.gpu_conf(4, 2048, tmp_path / "gpus.sh")
    assert conf["spark.master"] == "local-cluster[1,4,2048]"
    assert conf["spark.executor.resource.gpu.amount"] == "1"
    assert float(conf["spark.task.resource.gpu.amount"]) * 4 == 1.0


def test_the_gpu_job_is_ok_only_when_its_predictions_match_the_cpu():
    import numpy as np

    ids = np.arange(4)
    cpu = np.array([0.5, np.nan, 2.0, 3.0])
    assert gpu_check.compare_predictions(ids, cpu, ids, cpu + 1e-6)["ok"]
    off = gpu_check.compare_predictions(ids, cpu, ids, np.array([0.5, np.nan, 2.0, 3.5]))
    assert not off["ok"] and off["rows_beyond_tolerance"] == 1 and off["max_abs_diff_vs_cpu"] == 0.5
    assert not gpu_check.compare_predictions(ids, cpu, ids, np.array([0.5, 1.0, 2.0, 3.0]))["ok"]
    assert not gpu_check.compare_predictions(ids, cpu, ids[:3], cpu[:3])["ok"]
