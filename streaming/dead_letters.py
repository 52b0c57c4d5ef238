"""Dead letters: the input message's headers and source position, and records too large for their topic."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from streaming.plan import H_ERROR, H_OFFSET, H_PARTITION, H_TOPIC, BatchPlan, Header, Record, SinkError

# Bytes a record costs on top of its key, value and header bytes in a one-record batch.
RECORD_OVERHEAD = 128

# The sink's own header names start with OWN; an input message's headers with it are renamed.
OWN = "sparkscore."
PREVIOUS = "sparkscore.previous."
# librdkafka's own default for the largest message it sends.
CLIENT_MAX_BYTES = 1_000_000


def _size(key: bytes | None, value: bytes | None, headers: list[Header]) -> int:
    return (
        len(key or b"")
        + len(value or b"")
        + sum(len(k) + len(v or b"") for k, v in headers)
        + RECORD_OVERHEAD
    )


def too_large(
    plan: BatchPlan, topic: str, key: bytes | None, value: bytes | None, headers: list[Header]
) -> str | None:
    """Why a record cannot be sent to ``topic`` as it is (None when it fits)."""
    limit = plan.max_bytes.get(topic, CLIENT_MAX_BYTES)
    size = _size(key, value, headers)
    if size <= limit:
        return None
    return f"record of {size:,} bytes is larger than the {limit:,} bytes {topic} accepts"


def dead_letter_oversized(
    plan: BatchPlan,
    topic: str,
    key: bytes | None,
    value: bytes | None,
    headers: list[Header],
    error: str | None,
    why: str,
) -> tuple[str, bytes | None, bytes | None, list[Header]]:
    if len(plan.topics) < 2:
        raise SinkError(f"cannot write to {topic}: {why}, and this sink has no dead-letter topic")
    dlq = plan.topics[1]
    reason = why if error is None else f"{error}; {why}"
    headers = [(k, v) for k, v in headers if k != H_ERROR] + [(H_ERROR, reason.encode())]
    dropped = too_large(plan, dlq, key, value, headers)
    if dropped is not None:
        value = None
        headers = [(k, v) for k, v in headers if k != H_ERROR] + [
            (H_ERROR, f"{reason}; its value was dropped: too large for {dlq} too".encode())
        ]
        if too_large(plan, dlq, key, value, headers) is not None:
            key = None
    return dlq, key, value, headers


def previous(key: str) -> str:
    """An input header's name on a dead letter: ``sparkscore.x`` becomes ``sparkscore.previous.x``."""
    return PREVIOUS + key[len(OWN) :] if key.startswith(OWN) else key


def record_rows(batch: pa.RecordBatch) -> Iterator[Record]:
    """Rows of the pipeline's record layout; the record id is the source ``topic/partition/offset``.

    Dead letters also get the input message's own headers (column ``headers``, when the
    layout has it) and the source position as three headers of their own. An input header
    named ``sparkscore.*`` (a replayed dead-letter topic, another job's output) is kept as
    ``sparkscore.previous.*``: it must not shadow this sink's own provenance headers, which
    the recovery scan reads.
    """
    dests = batch.column("dest").to_numpy(zero_copy_only=False)
    keys, values, rids = (batch.column(name).to_pylist() for name in ("key", "value", "rid"))
    errors = batch.column("error")
    n = batch.num_rows
    errs = [None] * n if errors.null_count == n else errors.to_pylist()
    in_headers: list[Any] = [None] * n
    if "headers" in batch.schema.names and batch.column("headers").null_count < n:
        in_headers = batch.column("headers").to_pylist()
    for dest, key, value, error, rid, hs in zip(dests, keys, values, errs, rids, in_headers, strict=True):
        extra: list[Header] = []
        if error is not None:
            topic, part, off = rid.rsplit("/", 2)
            extra = [(previous(h["key"]), h["value"]) for h in hs or ()]
            extra += [(H_TOPIC, topic.encode()), (H_PARTITION, part.encode()), (H_OFFSET, off.encode())]
        yield int(dest), key, value, error, rid, extra
