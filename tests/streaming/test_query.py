"""Query wiring helpers that need no broker: the micro-batch size read from the offset log."""

from __future__ import annotations

import json

from streaming.query import batch_size


def write_offsets(folder, batch_id: int, offsets: dict | None) -> None:
    (folder / "offsets").mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"batchWatermarkMs": 0, "batchTimestampMs": 1, "conf": {}})
    lines = ["v1", meta, json.dumps(offsets) if offsets is not None else "-"]
    (folder / "offsets" / str(batch_id)).write_text("\n".join(lines))


def test_batch_size_is_the_offset_difference_to_the_previous_batch(tmp_path):
    write_offsets(tmp_path, 4, {"events": {"0": 100, "1": 50}})
    write_offsets(tmp_path, 5, {"events": {"0": 130, "1": 62}})
    assert batch_size(str(tmp_path), 5) == 42
    assert batch_size(f"file:{tmp_path}", 5) == 42


def test_batch_size_is_unknown_rather_than_wrong(tmp_path):
    write_offsets(tmp_path, 0, {"events": {"0": 10}})
    write_offsets(tmp_path, 1, {"events": {"0": 20, "1": 5}})  # a partition appeared
    write_offsets(tmp_path, 2, None)
    assert batch_size(str(tmp_path), 0) is None  # no previous entry to compare with
    assert batch_size(str(tmp_path), 1) is None
    assert batch_size(str(tmp_path), 2) is None
    assert batch_size(str(tmp_path), 7) is None  # no such entry
    assert batch_size("s3a://bucket/ck", 5) is None
