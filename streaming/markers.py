"""Commit markers (per batch and per task writer) and the committed-output scans that recovery relies on."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from streaming import kafka_client as kc
from streaming.plan import H_BATCH, H_ID, H_QUERY, BatchPlan, Positions

# Commit topic settings for a topic this job creates: compacted (the newest marker per key is
# kept for ever, older ones go), and segments that roll hourly so compaction keeps the part a
# restart must read small.
COMMIT_TOPIC_CONFIGS = {"cleanup.policy": "compact", "segment.ms": "3600000"}


@dataclass(frozen=True)
class Marker:
    """A batch marker: ``batch_id`` is committed; the output ends at ``positions`` after it."""

    query_id: str
    batch_id: int
    positions: Positions
    counts: dict[str, int] = field(default_factory=dict)
    writers: int = 0  # task writers (p0..p<writers-1>) this query has used: fenced on recovery

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "kind": "batch",
                "query_id": self.query_id,
                "batch_id": self.batch_id,
                "positions": self.positions,
                "counts": self.counts,
                "writers": self.writers,
                "committed_at": time.time(),
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Marker:
        d = json.loads(raw)
        return cls(
            d["query_id"],
            int(d["batch_id"]),
            d.get("positions", {}),
            d.get("counts", {}),
            int(d.get("writers", 0)),
        )


@dataclass(frozen=True)
class WriterMarker:
    """A task writer committed ``records`` input records of ``batch_id``, record ids ``first`` .. ``last``.

    Another attempt skips its task only when its range is the same (first, last and count):
    the same first record alone does not say so (a changed ``minPartitions``, or a switch
    between sources, splits a batch differently).
    """

    query_id: str
    batch_id: int
    writer: str
    first: str
    records: int
    attempt: int = 0
    last: str = ""  # markers written before the last id was recorded never match a range
    model: str = ""  # the model that scored the batch ([job] model_refresh_s): BatchPlan.model

    def covers(self, first: str, last: str, records: int) -> bool:
        return (self.first, self.last, self.records) == (first, last, records)

    @property
    def key(self) -> bytes:
        return f"{self.query_id}/{self.writer}".encode()

    def to_json(self) -> bytes:
        return json.dumps({"kind": "writer", **self.__dict__, "committed_at": time.time()}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> WriterMarker:
        d = json.loads(raw)
        return cls(
            d["query_id"],
            int(d["batch_id"]),
            d["writer"],
            d["first"],
            int(d["records"]),
            int(d["attempt"]),
            str(d.get("last", "")),
            str(d.get("model", "")),
        )


def committed_records(
    client: dict[str, str],
    offsets: kc.Offsets,
    starts: dict[tuple[str, int], int],
    timeout_s: float,
    *,
    recent: bool = False,
    committed: bool = True,
    cancel: threading.Event | None = None,
) -> Iterator[Any]:
    """Committed records of the given partitions from ``starts`` to their current ends.

    Reads with ``read_committed`` from the later of ``start`` and the log start (retention or
    ``deleteRecords`` may have removed the early records), up to the high watermark, so a
    transaction still open there is waited for rather than cut off. ``recent``: the starts
    are a moment old (no log start lookup), and the per-worker cached consumer is used.
    ``committed=False``: every record, open and aborted transactions' too (nothing waits).
    """
    if not starts:
        return
    ends = offsets.latest(list(starts))
    earliest = {} if recent else offsets.earliest([tp for tp, end in ends.items() if end > starts[tp]])
    conf = (
        kc.committed_reader_conf(client) if committed else {**client, "isolation.level": kc.READ_UNCOMMITTED}
    )
    consumer = kc.cached("consumer", conf) if recent else kc.make_consumer(conf)
    try:
        for (topic, part), end in ends.items():
            begin = max(starts[(topic, part)], earliest.get((topic, part), 0))
            for msgs in kc.read_range(
                consumer,
                topic,
                part,
                begin,
                end,
                timeout_s=timeout_s,
                fail_on_data_loss=False,
                committed=committed,
                cancel=cancel,
            ):
                yield from msgs
    finally:
        if not recent:
            consumer.close()


def writers_named(
    client: dict[str, str],
    offsets: kc.Offsets,
    tp: tuple[str, int],
    query_id: str,
    timeout_s: float,
    *,
    cancel: threading.Event | None = None,
) -> int:
    """How many task writers (``p0 .. p<n-1>``) this query's markers in ``tp`` name, committed or not.

    Read with ``read_uncommitted``, so a writer that died inside its transaction (its writer
    marker sent, not committed) neither holds the read back nor goes unnoticed: a restart
    fences every writer named here before it reads the commit topic with ``read_committed``.
    """
    query = query_id.encode()
    prefix = query + b"/p"
    n = 0
    for m in committed_records(client, offsets, {tp: 0}, timeout_s, committed=False, cancel=cancel):
        key, raw = m.key() or b"", m.value()
        if key.startswith(prefix) and key[len(prefix) :].isdigit():
            n = max(n, int(key[len(prefix) :]) + 1)
        elif key == query and raw:
            try:
                n = max(n, int(json.loads(raw).get("writers", 0)))
            except (ValueError, AttributeError, TypeError):
                continue
    return n


def written_ids(
    plan: BatchPlan, offsets: kc.Offsets | None = None, *, cancel: threading.Event | None = None
) -> tuple[set[str], Positions]:
    """Record ids this query committed for ``plan.batch_id`` after ``plan.start``, and the ends scanned to."""
    own = offsets is None
    offsets = offsets or kc.Offsets(plan.client, latest_by=plan.latest_by, timeout_s=plan.timeout_s)
    try:
        known = offsets.partitions()
        tps = [(t, p) for t in plan.topics for p in known.get(t, [])]
        starts = {tp: int(plan.start.get(tp[0], {}).get(str(tp[1]), 0)) for tp in tps}
        query, batch = plan.query_id.encode(), str(plan.batch_id).encode()
        ids: set[str] = set()
        scanned: Positions = {}
        for m in committed_records(plan.client, offsets, starts, plan.timeout_s, cancel=cancel):
            h = dict(m.headers() or ())
            rid = h.get(H_ID)
            if h.get(H_QUERY) == query and h.get(H_BATCH) == batch and isinstance(rid, bytes):
                ids.add(rid.decode())
            tp_ends = scanned.setdefault(m.topic(), {})
            tp_ends[str(m.partition())] = max(tp_ends.get(str(m.partition()), 0), m.offset() + 1)
        return ids, scanned
    finally:
        if own:
            offsets.close()


def writer_markers(plan: BatchPlan, offsets: kc.Offsets) -> dict[str, WriterMarker]:
    """Writer markers of ``plan``'s batch committed since the batch began (writer -> marker)."""
    starts = {(plan.commit_topic, plan.commit_partition): plan.commit_start}
    prefix = f"{plan.query_id}/".encode()
    found: dict[str, WriterMarker] = {}
    for m in committed_records(plan.client, offsets, starts, plan.timeout_s, recent=True):
        key, raw = m.key(), m.value()
        if key and raw and key.startswith(prefix):
            d = json.loads(raw)
            if d.get("kind") == "writer" and int(d["batch_id"]) == plan.batch_id:
                marker = WriterMarker.from_json(raw)
                found[marker.writer] = marker
    return found
