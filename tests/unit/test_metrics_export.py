"""The stac model's Prometheus metrics (serving/metrics.py) on a fake pb_utils, and the Grafana
dashboard / alert rules in deploy/ naming only metrics the server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from stac_backend.serving.metrics import EXPORTED_SERIES, METRICS, StacMetrics

ROOT = Path(__file__).resolve().parents[2]
# Triton's own metrics (Triton's metrics documentation; nv_gpu_* only where a GPU is present).
TRITON_SERIES = {
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count", "nv_inference_exec_count",
    "nv_inference_request_duration_us", "nv_inference_queue_duration_us", "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us", "nv_inference_compute_output_duration_us",
    "nv_inference_pending_request_count", "nv_gpu_utilization", "nv_gpu_memory_total_bytes", "nv_gpu_memory_used_bytes",
    "nv_gpu_power_usage", "nv_cpu_utilization", "nv_cpu_memory_total_bytes", "nv_cpu_memory_used_bytes",
}
PROMETHEUS_SERIES = {"up"}  # set by Prometheus for every target


class FakeMetric:
    def __init__(self, family, labels, buckets=None):
        self.family, self.labels, self.buckets = family, labels, buckets
        self.value, self.observed = 0.0, []

    def increment(self, value):
        if self.family.kind == "COUNTER" and value < 0:
            raise ValueError("a counter cannot go down")
        self.value += value

    def set(self, value):
        self.value = value

    def observe(self, value):
        self.observed.append(value)


class FakeFamily:
    GAUGE, COUNTER, HISTOGRAM = "GAUGE", "COUNTER", "HISTOGRAM"
    registry: dict = {}

    def __init__(self, name, description, kind):
        self.name, self.kind = name, kind
        self.metrics = {}
        FakeFamily.registry.setdefault(name, self)

    def Metric(self, labels, buckets=None):  # noqa: N802 - pb_utils' spelling
        # Triton shares one series per (family, labels) across the model's instances.
        family = FakeFamily.registry[self.name]
        key = tuple(sorted(labels.items()))
        if key not in family.metrics:
            family.metrics[key] = FakeMetric(family, labels, buckets)
        return family.metrics[key]


class FakePbUtils:
    MetricFamily = FakeFamily


def value(name):
    (metric,) = FakeFamily.registry[name].metrics.values()
    return metric


def stats(**kw):
    base = {m.stat: 0 for m in METRICS if m.stat}
    base.update(kw)
    return base


@pytest.fixture(autouse=True)
def fresh_registry():
    FakeFamily.registry = {}


def test_labels_are_model_and_version_without_instance():
    StacMetrics(FakePbUtils, "stac", "1")
    for name in (m.name for m in METRICS):
        (metric,) = FakeFamily.registry[name].metrics.values()
        assert metric.labels == {"model": "stac", "version": "1"}


def test_names_follow_prometheus_conventions():
    for m in METRICS:
        assert re.fullmatch(r"stac_[a-z0-9_]+", m.name)
        assert m.name.endswith("_total") == (m.kind == "COUNTER"), m.name
        if m.kind == "HISTOGRAM":
            assert list(m.buckets) == sorted(m.buckets)


def test_evicted_tokens_counter_never_drops_when_streams_end():
    metrics = StacMetrics(FakePbUtils, "stac", "1")
    metrics.observe_execute(stats(evicted_tokens=100, active_streams=2), 0.01, 2)
    metrics.observe_execute(stats(evicted_tokens=250, active_streams=1), 0.01, 1)  # one stream ended: total kept
    assert value("stac_evicted_tokens_total").value == 250
    assert value("stac_active_streams").value == 1
    # An older sessions object that reports only live streams: the counter holds, never decreases.
    metrics.observe_execute({"evicted_tokens_live_streams": 10}, 0.01, 1)
    assert value("stac_evicted_tokens_total").value == 250


def test_histograms_observe_every_execute():
    metrics = StacMetrics(FakePbUtils, "stac", "1")
    for seconds, requests in ((0.02, 3), (0.5, 8)):
        metrics.observe_execute(stats(frames=4), seconds, requests)
    assert value("stac_execute_duration_seconds").observed == [0.02, 0.5]
    assert value("stac_execute_batch_requests").observed == [3.0, 8.0]
    assert value("stac_execute_duration_seconds").buckets[0] > 0


def test_two_instances_add_up_and_a_closed_one_leaves_the_gauges():
    a, b = StacMetrics(FakePbUtils, "stac", "1"), StacMetrics(FakePbUtils, "stac", "1")
    a.observe_execute(stats(active_streams=3, frames=8), 0.01, 3)
    b.observe_execute(stats(active_streams=2, frames=4), 0.01, 2)
    assert value("stac_active_streams").value == 5 and value("stac_frames_total").value == 12
    a.close()
    assert value("stac_active_streams").value == 2 and value("stac_frames_total").value == 12


def test_outside_triton_it_is_a_no_op():
    StacMetrics(None, "stac", "1").observe_execute(stats(frames=1), 0.1, 1)


def query_metric_names(text: str) -> set[str]:
    """Metric names a PromQL expression reads (ours, Triton's and Prometheus' ``up``)."""
    return set(re.findall(r"\b((?:stac|nv)_[a-zA-Z0-9_]+|up)\b(?=\s*[{\[(\s)]|$)", text))


def dashboard_queries() -> list[str]:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "stac-dashboard.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


def alert_queries() -> list[str]:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_dashboard_and_alerts_name_only_exported_metrics():
    known = set(EXPORTED_SERIES) | TRITON_SERIES | PROMETHEUS_SERIES
    queries = dashboard_queries() + alert_queries()
    assert len(queries) >= 10
    used = set().union(*(query_metric_names(q) for q in queries))
    assert used - known == set(), f"queries name metrics nobody exports: {sorted(used - known)}"
    # and every stac metric is on the dashboard
    ours = {s for s in used if s.startswith("stac_")}
    assert {m.name for m in METRICS} <= {re.sub(r"_(bucket|sum|count)$", "", s) for s in ours}


def test_prometheus_configs_load_the_rules_and_scrape_triton():
    for name in ("prometheus.yml", "prometheus-cluster.yml"):
        config = yaml.safe_load((ROOT / "deploy" / "prometheus" / name).read_text())
        assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
        assert config["scrape_configs"][0]["job_name"] == "triton"


def test_sessions_count_evicted_tokens_of_ended_streams(tiny_model, frames12):
    """StreamSessions.stats()["evicted_tokens"] keeps what ended streams evicted (the counter's source)."""
    from stac_backend.cache import CacheConfig
    from stac_backend.engine.torch_runtime import TorchRuntime
    from stac_backend.serving.sessions import FrameRequest, ServingLimits, StreamSessions

    cache = CacheConfig(policy="stac", retrieval_start_frame=8, voxel_size=0.01, conf_threshold=0.0)
    sessions = StreamSessions(TorchRuntime(tiny_model, cache), ServingLimits(max_streams=2))
    for i in range(0, 12, 4):
        sessions.handle([FrameRequest(corr_id=5, start=i == 0, end=False, frames=frames12[i:i + 4])])
    live = sessions.stats()
    assert live["evicted_tokens"] == live["evicted_tokens_live_streams"] > 0
    sessions.handle([FrameRequest(corr_id=5, start=False, end=True, frames=frames12[:4])])
    ended = sessions.stats()
    assert ended["active_streams"] == 0 and ended["evicted_tokens_live_streams"] == 0
    assert ended["evicted_tokens"] >= live["evicted_tokens"]
