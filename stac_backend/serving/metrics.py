"""The stac model's Prometheus metrics, exported through Triton's metrics endpoint (:8002/metrics).

Conventions (as Triton's own ``nv_*`` metrics and Prometheus' naming guide have them):
- labels ``model`` and ``version`` only. No ``instance`` label: Prometheus sets ``instance`` to the
  scraped target itself, and a clash would rename ours to ``exported_instance``. The model's
  instances (``instance_group count > 1``) share one series per metric: gauges move by this
  instance's deltas (so they read the sum over instances), counters and histograms add up.
- counters end in ``_total`` and never go down; sizes in ``_bytes``; durations in ``_seconds``.
- every number is per model (summed over its instances and live streams), not per stream.

:data:`METRICS` is the registry: the names the server exports, which the Grafana dashboard and the
alert rules in deploy/ may use (a test checks they use nothing else). :class:`StacMetrics` is the
one object the Triton model holds: ``observe_execute`` after each ``execute()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

# Histogram buckets (seconds): one batched engine step, from the tiny model on a CPU (~10 ms) to
# vggt-1b with full caches (~0.5 s per frame, 4 frames per chunk).
STEP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # GAUGE, COUNTER or HISTOGRAM (pb_utils.MetricFamily kinds)
    description: str
    stat: Optional[str] = None  # the StreamSessions.stats() key it reports (None: observed directly)
    buckets: tuple = ()


METRICS: tuple[Metric, ...] = (
    Metric("stac_active_streams", "GAUGE", "live streams holding cache state", "active_streams"),
    Metric("stac_cache_bytes", "GAUGE", "bytes held by all live streams' caches", "cache_bytes"),
    Metric("stac_reserved_cache_bytes", "GAUGE", "sum of live streams' memory bounds (admission control)",
           "reserved_cache_bytes"),
    Metric("stac_evicted_tokens_total", "COUNTER",
           "tokens evicted from streams' hot caches (live and ended streams)", "evicted_tokens"),
    Metric("stac_streams_started_total", "COUNTER", "streams started", "streams_started"),
    Metric("stac_streams_ended_total", "COUNTER", "streams ended by END or a repeated START", "streams_ended"),
    Metric("stac_streams_expired_total", "COUNTER", "streams freed by the idle TTL", "streams_expired"),
    Metric("stac_rejected_starts_total", "COUNTER", "STARTs refused by admission control", "rejected_starts"),
    Metric("stac_failed_requests_total", "COUNTER", "requests answered with an error", "failed_requests"),
    Metric("stac_frames_total", "COUNTER", "frames reconstructed", "frames"),
    Metric("stac_execute_duration_seconds", "HISTOGRAM",
           "wall time of one execute(): a batched engine step over the requests of several streams",
           buckets=STEP_BUCKETS_S),
    Metric("stac_execute_batch_requests", "HISTOGRAM", "requests (streams) per execute()", buckets=BATCH_BUCKETS),
)
METRIC_NAMES = tuple(m.name for m in METRICS)


def exported_series(name: str) -> tuple[str, ...]:
    """The series names Prometheus sees for one metric (a histogram is three)."""
    metric = next(m for m in METRICS if m.name == name)
    if metric.kind == "HISTOGRAM":
        return (f"{name}_bucket", f"{name}_sum", f"{name}_count")
    return (name,)


EXPORTED_SERIES = tuple(series for name in METRIC_NAMES for series in exported_series(name))


def monotonic_stats(stats: Mapping[str, int]) -> dict[str, int]:
    """``stats`` with ``evicted_tokens`` (ended + live streams) from older sessions that report
    only the live streams' count."""
    out = dict(stats)
    out.setdefault("evicted_tokens", stats.get("evicted_tokens_live_streams", 0))
    return out


class StacMetrics:
    """The model's metric families on ``pb_utils`` (None outside Triton: every call is a no-op)."""

    def __init__(self, pb_utils: Any, model: str, version: str):
        self._families: list = []  # a MetricFamily must outlive its Metrics
        self._metrics: dict[str, tuple[Metric, Any]] = {}
        self._reported: dict[str, float] = {}  # this instance's share already added to each gauge/counter
        if pb_utils is None or not hasattr(pb_utils, "MetricFamily"):
            return
        labels = {"model": model, "version": str(version)}
        for metric in METRICS:
            kind = getattr(pb_utils.MetricFamily, metric.kind, None)
            if kind is None:  # a Triton without histograms: the others still work
                continue
            family = pb_utils.MetricFamily(name=metric.name, description=metric.description, kind=kind)
            self._families.append(family)
            if metric.kind == "HISTOGRAM":
                handle = family.Metric(labels=labels, buckets=[float(b) for b in metric.buckets])
            else:
                handle = family.Metric(labels=labels)
            self._metrics[metric.name] = (metric, handle)
            self._reported[metric.name] = 0.0

    def observe_execute(self, stats: Mapping[str, int], seconds: float, requests: int) -> None:
        """After one execute(): the sessions' numbers, its duration and how many requests it ran."""
        if not self._metrics:
            return
        stats = monotonic_stats(stats)
        for name, (metric, handle) in self._metrics.items():
            if metric.kind == "HISTOGRAM":
                continue
            value = float(stats.get(metric.stat, 0))
            delta = value - self._reported[name]
            if metric.kind == "COUNTER" and delta < 0:
                continue  # never down (a restarted count would be a bug upstream, not a drop)
            if delta:
                handle.increment(delta)
                self._reported[name] = value
        self._observe("stac_execute_duration_seconds", seconds)
        if requests:
            self._observe("stac_execute_batch_requests", float(requests))

    def _observe(self, name: str, value: float) -> None:
        entry = self._metrics.get(name)
        if entry is not None:
            entry[1].observe(value)

    def close(self) -> None:
        """Take this instance's share out of the shared gauges, then drop the families."""
        for name, (metric, handle) in self._metrics.items():
            if metric.kind == "GAUGE" and self._reported[name]:
                handle.increment(-self._reported[name])
        self._metrics.clear()
        self._families.clear()
