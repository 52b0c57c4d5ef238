"""[job] model_refresh_s on Apache Kafka and a real local MLflow registry: a moved alias applies
from the next micro-batch, whole batches only, each record naming its version; a batch a crashed run
partly wrote is replayed with the version that run recorded, so the replay writes the same predictions."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from streaming import faults
from streaming.plan import H_BATCH, H_ID
from streaming.query import QueryFailed, run
from tests.streaming.conftest import event, read_records, stream_config
from udfs import demo, mlflow_demo, model_cache, model_store
from udfs.spec import resolve

pytestmark = [pytest.mark.kafka, pytest.mark.spark, pytest.mark.slow]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    v1 = mlflow_demo.log_pytorch(demo.ctr_module(0), root, alias="champion")
    v2 = mlflow_demo.log_pytorch(demo.ctr_module(1), root, alias=None)
    return {"root": root, "uri": mlflow_demo.registry_uri(root), "v1": v1, "v2": v2}


def setup(apache, registry, tmp_path, tag: str, n: int = 16):
    mlflow_demo.set_alias(registry["root"], "demo_ctr", "champion", registry["v1"])
    topic = apache.topic(partitions=2, prefix=f"events-{tag}")
    apache.produce(
        topic,
        [event(f"u{i}", [20.0 + i, 1.0, 9.5, float(i % 7)], f"2026-01-01T00:00:{i:02d}Z") for i in range(n)],
    )
    cfg = stream_config(
        apache,
        f"{tag}-{topic[-6:]}",
        model_path="models:/demo_ctr@champion",
        model={"registry_uri": registry["uri"], "cache_dir": str(tmp_path / "cache")},
        input={"topic": topic, "max_offsets_per_trigger": 8},
        job={"checkpoint": str(tmp_path / "checkpoint"), "model_refresh_s": 0.001},
    )
    model_store.forget()
    model_cache.clear()
    return cfg, resolve(cfg.model)


def versions_by_batch(apache, cfg) -> dict[int, set[str]]:
    out: dict[int, set[str]] = defaultdict(set)
    for m in read_records(apache, cfg.output.topic):
        h = dict(m.headers())
        out[int(h[H_BATCH])].add(json.loads(m.value())["model_version"].split("+")[0])
    return dict(out)


def test_a_moved_alias_applies_from_the_next_micro_batch(apache, spark, registry, tmp_path):
    cfg, v1_model = setup(apache, registry, tmp_path, "refresh")
    assert v1_model.version.startswith(f"{registry['v1']}+")
    # The job starts with version 1 resolved; the alias moves before its first micro-batch is planned.
    mlflow_demo.set_alias(registry["root"], "demo_ctr", "champion", registry["v2"])
    run(spark, cfg, v1_model, available_now=True)
    by_batch = versions_by_batch(apache, cfg)
    assert len(by_batch) == 2 and all(v == {registry["v2"]} for v in by_batch.values())


def test_a_replayed_batch_is_scored_with_the_version_its_first_attempt_recorded(
    apache, spark, registry, tmp_path, monkeypatch
):
    cfg, v1_model = setup(apache, registry, tmp_path, "replay")
    folder = tmp_path / "faults"
    folder.mkdir()
    # Batch 0: writer p0 commits (with version 1), then p1's task dies before it produces.
    monkeypatch.setenv(
        faults.ENV, "writer.before_produce:batch=0,writer=p1,action=exit,after=writer.after_commit-p0-b0"
    )
    monkeypatch.setenv(faults.ENV_DIR, str(folder))
    with pytest.raises(QueryFailed):
        run(spark, cfg, v1_model, available_now=True)
    monkeypatch.delenv(faults.ENV)
    monkeypatch.delenv(faults.ENV_DIR)
    # Version 2 is promoted while the job is down; the restart replays batch 0 with version 1.
    mlflow_demo.set_alias(registry["root"], "demo_ctr", "champion", registry["v2"])
    summary = run(spark, cfg, resolve(cfg.model), available_now=True)
    assert summary.totals.get("skipped", 0) == 4  # p0's records, committed before the crash
    by_batch = versions_by_batch(apache, cfg)
    assert by_batch[0] == {registry["v1"]}
    assert all(v == {registry["v2"]} for b, v in by_batch.items() if b > 0)
    ids = [dict(m.headers())[H_ID] for m in read_records(apache, cfg.output.topic)]
    assert len(ids) == len(set(ids)) == 16
