"""Prometheus text metrics named like Triton's, so existing dashboards carry over.

Tiny in-process counters and histograms: updates happen on the event loop (or
under the GIL for single increments), cost a few hundred nanoseconds, and are
rendered on ``GET /metrics``.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable

US_BUCKETS = (
    100,
    250,
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    1_000_000,
    5_000_000,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


class Counter:
    """A counter, optionally by one label (keys are its values) or several (keys are tuples of them)."""

    def __init__(self, name: str, help: str, label: str | tuple[str, ...] | None = None) -> None:
        self.name, self.help, self.label = name, help, label
        self.values: dict[str | tuple[str, ...], float] = {}

    def inc(self, key: str | tuple[str, ...] = "", n: float = 1) -> None:
        self.values[key] = self.values.get(key, 0) + n

    def value(self, key: str | tuple[str, ...] = "") -> float:
        return self.values.get(key, 0)

    def render(self, base: dict[str, str]) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        items = self.values.items() if self.values or self.label else [("", 0.0)]
        for key, v in sorted(items):
            if isinstance(self.label, tuple):
                labels = dict(base, **dict(zip(self.label, key, strict=True)))
            else:
                labels = dict(base, **({self.label: key} if self.label else {}))  # type: ignore[dict-item]
            out.append(f"{self.name}{_labels(labels)} {_num(v)}")
        return out


class Gauge:
    """A value read at scrape time."""

    def __init__(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.name, self.help, self.read = name, help, read

    def render(self, base: dict[str, str]) -> list[str]:
        return [
            f"# HELP {self.name} {self.help}",
            f"# TYPE {self.name} gauge",
            f"{self.name}{_labels(base)} {_num(self.read())}",
        ]


class LabelledGauge:
    """Values read at scrape time, one sample per key of ``read()`` under ``label``."""

    def __init__(self, name: str, help: str, label: str, read: Callable[[], dict[str, float]]) -> None:
        self.name, self.help, self.label, self.read = name, help, label, read

    def render(self, base: dict[str, str]) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge"]
        for key, v in sorted(self.read().items()):
            out.append(f"{self.name}{_labels(dict(base, **{self.label: key}))} {_num(v)}")
        return out


class InfoGauge(Gauge):
    """One sample of 1 per label set ``read()`` returns: which versions serve right now."""

    def __init__(self, name: str, help: str, read: Callable[[], list[dict[str, str]]]) -> None:
        super().__init__(name, help, lambda: 1.0)
        self.read_labels = read

    def render(self, base: dict[str, str]) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge"]
        for labels in self.read_labels():
            out.append(f"{self.name}{_labels(dict(base, **labels))} 1")
        return out


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, n: int = 1) -> None:
        """Record ``value`` ``n`` times (a micro-batch's compute time, once per request in it)."""
        self.counts[bisect_left(self.buckets, value)] += n
        self.sum += value * n
        self.count += n

    def observe_each(self, values: Iterable[float]) -> None:
        """Record every value (a micro-batch's queue times) in one call."""
        counts, buckets = self.counts, self.buckets
        total, n = 0.0, 0
        for v in values:
            counts[bisect_left(buckets, v)] += 1
            total += v
            n += 1
        self.sum += total
        self.count += n

    def render(self, base: dict[str, str]) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, c in zip(self.buckets, self.counts, strict=False):
            running += c
            out.append(f"{self.name}_bucket{_labels(dict(base, le=_num(bound)))} {running}")
        out.append(f"{self.name}_bucket{_labels(dict(base, le='+Inf'))} {self.count}")
        out.append(f"{self.name}_sum{_labels(base)} {_num(self.sum)}")
        out.append(f"{self.name}_count{_labels(base)} {self.count}")
        return out


class MetricSet:
    """Metrics that share base labels; :meth:`render` is Prometheus text."""

    def __init__(self, base: dict[str, str]) -> None:
        self.base = base
        self.gauges: list[Gauge | LabelledGauge] = []

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.gauges.append(Gauge(name, help, read))

    def labelled_gauge(self, name: str, help: str, label: str, read: Callable[[], dict[str, float]]) -> None:
        self.gauges.append(LabelledGauge(name, help, label, read))

    def metrics(self) -> list[Counter | Histogram | Gauge | LabelledGauge]:
        return [*self.gauges]

    def render(self) -> bytes:
        lines: list[str] = []
        for metric in self.metrics():
            lines.extend(metric.render(self.base))
        return ("\n".join(lines) + "\n").encode()


class VersionMetrics(MetricSet):
    """What one model version does: its batcher queue, micro-batches and compute.

    ``role`` says how the version serves: ``primary``, ``canary`` or ``shadow``.
    """

    def __init__(self, model: str, version: str, role: str = "primary", worker: str | None = None) -> None:
        super().__init__(_base(model, version=version, role=role, worker=worker))
        self.queue_duration = Histogram(
            "nv_inference_queue_duration_us", "Time a request waited in the batcher queue, us", US_BUCKETS
        )
        self.compute_duration = Histogram(
            "nv_inference_compute_infer_duration_us",
            "Model compute time of the micro-batch a request ran in, us",
            US_BUCKETS,
        )
        self.batch_size = Histogram(
            "nv_inference_batch_size", "Requests per executed micro-batch", BATCH_BUCKETS
        )
        self.inference_count = Counter("nv_inference_count", "Instances scored by the model")
        self.exec_count = Counter("nv_inference_exec_count", "Micro-batches executed")
        self.predictions = Counter(
            "sparkscore_predictions_total", "Predictions this version answered (cache hits excluded)"
        )
        self.cache_coalesced = Counter(
            "sparkscore_cache_coalesced_total", "Requests that joined an identical request already in flight"
        )
        self.canceled = Counter(
            "sparkscore_canceled_requests_total",
            "Queued requests dropped before the model because their client disconnected",
        )

    def metrics(self) -> list[Counter | Histogram | Gauge | LabelledGauge]:
        return [
            self.predictions,
            self.inference_count,
            self.exec_count,
            self.queue_duration,
            self.compute_duration,
            self.batch_size,
            self.cache_coalesced,
            self.canceled,
            *self.gauges,
        ]


class Metrics(MetricSet):
    """The server's metrics (labelled by model) plus every model version's (:class:`VersionMetrics`)."""

    def __init__(self, model: str, version: str = "", worker: str | None = None) -> None:
        super().__init__(_base(model, worker=worker))
        from udfs.core import STATS

        self.gauge(
            "sparkscore_model_error_rows_total",
            "Rows the model itself raised for (isolated by bisecting their micro-batch)",
            lambda: STATS.snapshot()[0],
        )
        self.gauge(
            "sparkscore_bisect_calls_total",
            "Extra model calls made to bisect micro-batches the model raised for",
            lambda: STATS.snapshot()[1],
        )
        self.model = model
        self.worker = worker
        self.request_duration = Histogram(
            "nv_inference_request_duration_us", "End-to-end time of an inference request, us", US_BUCKETS
        )
        self.request_success = Counter("nv_inference_request_success", "Successful inference requests")
        self.request_failure = Counter(
            "nv_inference_request_failure", "Failed inference requests, by reason", label="reason"
        )
        self.shed = Counter(
            "sparkscore_shed_requests_total",
            "Requests answered without reaching the model (queue_full, deadline, not_ready)",
            label="reason",
        )
        self.cache_hits = Counter("nv_cache_num_hits_per_model", "Prediction cache hits")
        self.cache_misses = Counter("nv_cache_num_misses_per_model", "Prediction cache misses")
        self.cache_unavailable = Counter(
            "sparkscore_cache_unavailable_total", "Requests served without the cache because Redis failed"
        )
        self.redis_errors = Counter(
            "sparkscore_redis_errors_total", "Redis errors and timeouts, by use", label="op"
        )
        self.redis_pool_busy = Counter(
            "sparkscore_redis_pool_exhausted_total",
            "Redis calls skipped because every pooled connection was in use (not a Redis failure)",
        )
        self.redis_probes = Counter(
            "sparkscore_redis_breaker_probes_total",
            "PINGs sent while Redis is skipped after an error, by result (success closes the breaker)",
            label="result",
        )
        self.model_loads = Counter(
            "sparkscore_model_loads_total",
            "Model version loads (start-up, reloads), by result",
            label="result",
        )
        self.registry_polls = Counter(
            "sparkscore_registry_polls_total",
            "Polls of each followed registry alias ([reload] follow: role primary; [candidate] follow: "
            "canary or shadow), by outcome (same, moved, missing: the alias is not set, unreachable)",
            label=("role", "outcome"),
        )
        self.version_sets: list[VersionMetrics] = []
        self.extra: list[MetricSet] = []  # shadow comparison and the like

    def for_version(self, version: str, role: str = "primary") -> VersionMetrics:
        """A version's metric set, kept so its counters outlive a model swap: the last few of each
        role's (primary; canary or shadow: a followed candidate alias swaps candidates too)."""
        vm = VersionMetrics(self.model, version, role, self.worker)
        self.version_sets.append(vm)
        same_role = [s for s in self.version_sets if s.base.get("role") == role]
        for old in same_role[:-6]:
            self.version_sets.remove(old)
        return vm

    def fail(self, reason: str, *, shed: bool = False) -> None:
        self.request_failure.inc(reason)
        if shed:
            self.shed.inc(reason)

    def metrics(self) -> list[Counter | Histogram | Gauge | LabelledGauge]:
        return [
            self.request_success,
            self.request_failure,
            self.shed,
            self.request_duration,
            self.cache_hits,
            self.cache_misses,
            self.cache_unavailable,
            self.redis_errors,
            self.redis_pool_busy,
            self.redis_probes,
            self.model_loads,
            self.registry_polls,
            *self.gauges,
        ]

    def render(self) -> bytes:
        parts = [MetricSet.render(self)] + [s.render() for s in (*self.version_sets, *self.extra)]
        return merge_exposition(parts)


def _base(model: str, **labels: str | None) -> dict[str, str]:
    return {"model": model, **{k: v for k, v in labels.items() if v is not None}}


def merge_exposition(texts: Iterable[bytes]) -> bytes:
    """Prometheus texts merged into one: each family's HELP/TYPE once, then every text's samples.

    Several model versions, or several worker processes, export the same families with
    different labels; a scrape must see each family once.
    """
    families: dict[str, tuple[list[str], list[str]]] = {}
    for text in texts:
        current: list[str] | None = None
        for line in text.decode().splitlines():
            if not line:
                continue
            if line.startswith("# HELP "):
                name = line.split(" ", 3)[2]
                header, current = families.setdefault(name, ([], []))
                if not header:
                    header.append(line)
            elif line.startswith("# TYPE "):
                name = line.split(" ", 3)[2]
                header, current = families.setdefault(name, ([], []))
                if len(header) < 2:
                    header.append(line)
            elif current is not None:
                current.append(line)
    out: list[str] = []
    for header, samples in families.values():
        out.extend(header)
        out.extend(samples)
    return ("\n".join(out) + "\n").encode()
