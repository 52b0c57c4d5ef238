"""What one batch's writers share: the plan, the record layout, the provenance headers, the sink's error."""

from __future__ import annotations

from dataclasses import dataclass, field

from streaming import faults
from streaming import kafka_client as kc

H_QUERY = "sparkscore.query"
H_BATCH = "sparkscore.batch"
H_ID = "sparkscore.id"
H_ERROR = "sparkscore.error"
H_TOPIC = "sparkscore.source.topic"
H_PARTITION = "sparkscore.source.partition"
H_OFFSET = "sparkscore.source.offset"

# The record layout the executor writer consumes (see streaming.pipeline.to_records).
RECORD_COLUMNS = ("dest", "key", "value", "error", "rid")
SUMMARY_SCHEMA = "kind string, topic string, partition int, value long"

Positions = dict[str, dict[str, int]]  # topic -> partition (str) -> next offset
Header = tuple[str, str | bytes | None]
Record = tuple[int, bytes | None, bytes | None, str | None, str, list[Header]]


class SinkError(RuntimeError):
    """Records could not be delivered, or the commit log cannot be read or trusted."""


@dataclass(frozen=True)
class BatchPlan:
    """What the writers of one batch need: small and picklable."""

    query_id: str
    batch_id: int
    topics: tuple[str, ...]  # dest index -> output topic (index 1, when present, is the dead-letter topic)
    client: dict[str, str]
    producer: dict[str, str]
    commit_topic: str
    start: Positions  # the output topics' positions after the last committed batch
    commit_partition: int = 0  # every marker of this query goes to this partition of the commit topic
    commit_start: int = 0  # the offset after the last batch marker there: this batch's writer markers follow
    skip: frozenset[str] = frozenset()  # record ids an earlier attempt already committed
    max_bytes: dict[str, int] = field(default_factory=dict)  # topic -> largest record it accepts
    latest_by: str = kc.LIST_OFFSETS
    timeout_s: float = 120.0
    fault: faults.FaultPlan = faults.NO_FAULTS
    # [job] model_refresh_s: the model that scores this batch (streaming.model_refresh.record_of),
    # recorded in every writer marker so a replay after a crash scores with the same version.
    model: str = ""

    def transactional_id(self, writer: str) -> str:
        return f"sparkscore.{self.query_id}.{writer}"


def merge_positions(a: Positions, b: Positions) -> Positions:
    out = {t: dict(parts) for t, parts in a.items()}
    for t, parts in b.items():
        for p, off in parts.items():
            out.setdefault(t, {})[p] = max(out.get(t, {}).get(p, 0), int(off))
    return out
