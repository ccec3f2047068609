"""deploy/helm/stac rendered offline with ``helm template`` and validated against the Kubernetes
JSON schemas of the ``kubernetes-validate`` package (no cluster). helm comes from
scripts/test-deps.sh (the static binary of an npm registry package) or PATH."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stac_backend.tools.nginx import PASSED_READ_RPCS

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "stac"
KUBERNETES_VERSION = "1.30.0"
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule"}  # Prometheus-operator CRDs: no core schema


def find_helm():
    for candidate in (os.environ.get("STAC_HELM"), str(Path(sys.prefix) / "tools" / "helm" / "helm"), shutil.which("helm")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


HELM = find_helm()
needs_helm = pytest.mark.skipif(HELM is None, reason="helm not found: bash scripts/test-deps.sh installs it")


ADMIN_KEY = "adminKey.value=test-admin-key"  # the chart refuses to render without a key
ADMIN_GROUPS = {"shared-memory", "model-repository", "logging", "trace", "statistics"}
# Envoy passes exactly what the NGINX configs pass
PASSED_RPCS = {"ModelInfer", "ModelStreamInfer", *PASSED_READ_RPCS}


def helm_template(*sets: str) -> subprocess.CompletedProcess:
    args = [HELM, "template", "stac", str(CHART), "--namespace", "cams"]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def render(*sets: str, admin_key: str = ADMIN_KEY) -> list[dict]:
    proc = helm_template(*((admin_key,) if admin_key else ()), *sets)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def envoy_routes(docs: list[dict]) -> list[dict]:
    (config_map,) = [c for c in by_kind(docs, "ConfigMap") if "envoy.yaml" in c["data"]]
    envoy = yaml.safe_load(config_map["data"]["envoy.yaml"])
    (listener,) = envoy["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (host,) = manager["route_config"]["virtual_hosts"]
    return host["routes"]


def triton_pod(docs: list[dict]) -> dict:
    (sts,) = by_kind(docs, "StatefulSet")
    return sts["spec"]["template"]["spec"]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@needs_helm
def test_chart_lints():
    proc = subprocess.run([HELM, "lint", str(CHART)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_helm
@pytest.mark.parametrize("sets", [(), ("replicas=4", "metrics.serviceMonitor=true", "metrics.prometheusRule=true",
                                       "model.checkpointVolume.hostPath.path=/srv/ckpt")])
def test_rendered_objects_match_the_kubernetes_schemas(sets):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = render(*sets)
    kinds = sorted(d["kind"] for d in docs)
    assert {"StatefulSet", "Service", "Deployment", "ConfigMap", "PodDisruptionBudget"} <= set(kinds)
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        # strict: unknown fields are errors too
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@needs_helm
def test_triton_replicas_gpus_probes_and_grace():
    docs = render("replicas=3", "triton.drainSeconds=40")
    (sts,) = by_kind(docs, "StatefulSet")
    assert sts["spec"]["replicas"] == 3
    pod = sts["spec"]["template"]["spec"]
    (triton,) = pod["containers"]
    assert triton["resources"]["requests"]["nvidia.com/gpu"] == 1 and triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    flags = dict(a.split("=", 1) for a in triton["args"] if "=" in a)
    assert flags["--exit-timeout-secs"] == "40"
    assert pod["terminationGracePeriodSeconds"] > int(flags["--exit-timeout-secs"])  # the drain completes
    assert flags["--model-control-mode"] == "none" and flags["--allow-metrics"] == "true"
    # the repository is rendered by prepare.py at start, from the mounted checkpoint
    (prepare,) = pod["initContainers"]
    assert "/opt/stac/deploy/prepare.py" in prepare["command"]
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == ports["metrics"]


@needs_helm
def test_proxy_hashes_streams_onto_the_ready_replicas():
    docs = render()
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    headless = services["stac-triton"]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is False
    (config_map,) = [c for c in by_kind(docs, "ConfigMap") if "envoy.yaml" in c["data"]]
    envoy = yaml.safe_load(config_map["data"]["envoy.yaml"])
    (cluster,) = envoy["static_resources"]["clusters"]
    assert cluster["type"] == "STRICT_DNS" and cluster["lb_policy"] == "RING_HASH"
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert address["address"] == "stac-triton.cams.svc.cluster.local" and address["port_value"] == 8001
    routes = envoy_routes(docs)
    route = routes[0]["route"]
    assert route["hash_policy"][0] == {"header": {"header_name": "x-stream-id"}, "terminal": True}
    assert route["hash_policy"][1] == {"connection_properties": {"source_ip": True}}
    assert route["timeout"] == "0s"  # a camera's gRPC stream is not cut by a request timeout
    (proxy,) = by_kind(docs, "Deployment")
    assert proxy["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert services["stac"]["spec"]["ports"][0]["port"] == 8001


@needs_helm
def test_triton_admin_groups_need_the_key_from_a_secret():
    """The same restricted groups as compose and every local server; the key comes from a Secret."""
    docs = render()
    (triton,) = triton_pod(docs)["containers"]
    flags = dict(a.split("=", 1) for a in triton["args"] if "=" in a)
    for flag in ("--grpc-restricted-protocol", "--http-restricted-api"):
        groups, _, key = flags[flag].partition(":")
        assert set(groups.split(",")) == ADMIN_GROUPS
        assert key == "stac-admin-key=$(STAC_ADMIN_KEY)"  # Kubernetes substitutes it from env
    (env,) = [e for e in triton["env"] if e["name"] == "STAC_ADMIN_KEY"]
    ref = env["valueFrom"]["secretKeyRef"]
    (secret,) = by_kind(docs, "Secret")
    assert ref == {"name": secret["metadata"]["name"], "key": "admin-key"}
    assert base64.b64decode(secret["data"]["admin-key"]).decode() == "test-admin-key"
    # an existing Secret: referenced, and the chart renders none of its own
    docs = render("adminKey.secretKey=token", admin_key="adminKey.existingSecret=ops-admin")
    assert by_kind(docs, "Secret") == []
    (triton,) = triton_pod(docs)["containers"]
    (env,) = [e for e in triton["env"] if e["name"] == "STAC_ADMIN_KEY"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "ops-admin", "key": "token"}


@needs_helm
def test_render_fails_clearly_without_an_admin_key():
    proc = helm_template()
    assert proc.returncode != 0
    assert "adminKey.existingSecret" in proc.stderr and "adminKey.value" in proc.stderr


@needs_helm
def test_prepare_passes_stream_keys_and_frame_size():
    def prepare_env(*sets):
        (prepare,) = triton_pod(render(*sets))["initContainers"]
        return {e["name"]: e.get("value") for e in prepare["env"]}

    env = prepare_env()
    assert env["STAC_STREAM_KEYS"] == "1" and "STAC_FRAME_SIZE" not in env  # keys on by default
    env = prepare_env("model.streamKeys=false", "model.frameSize=392x518")
    assert env["STAC_STREAM_KEYS"] == "0" and env["STAC_FRAME_SIZE"] == "392x518"


@needs_helm
def test_envoy_passes_only_inference_health_and_metadata():
    routes = envoy_routes(render())
    *passed, refused = routes
    prefix = "/inference.GRPCInferenceService/"
    assert {r["match"]["path"] for r in passed} == {prefix + rpc for rpc in PASSED_RPCS}
    for r in passed:
        assert set(r["match"]) == {"path"}  # exact paths, no prefixes
        assert r["route"]["cluster"] == "triton"
        assert r["route"]["hash_policy"][0] == {"header": {"header_name": "x-stream-id"}, "terminal": True}
    # everything else (admin groups, unknown paths) is answered by Envoy: PERMISSION_DENIED
    assert refused["match"] == {"prefix": "/"} and "route" not in refused
    assert refused["direct_response"]["status"] == 403  # gRPC maps HTTP 403 to PERMISSION_DENIED too
    headers = {h["header"]["key"]: h["header"]["value"] for h in refused["response_headers_to_add"]}
    assert headers["grpc-status"] == "7" and headers["content-type"] == "application/grpc"


@needs_helm
def test_monitoring_objects_carry_the_deploy_dashboard_and_rules():
    docs = render("metrics.prometheusRule=true", "metrics.serviceMonitor=true")
    (rule,) = by_kind(docs, "PrometheusRule")
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    (monitor,) = by_kind(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    (dashboard,) = [c for c in by_kind(docs, "ConfigMap") if "stac-dashboard.json" in c["data"]]
    assert json.loads(dashboard["data"]["stac-dashboard.json"]) == json.loads(
        (ROOT / "deploy" / "grafana" / "stac-dashboard.json").read_text())


def test_chart_files_are_the_deploy_copies():
    """Helm reads only files inside the chart: its copies must equal deploy/grafana and deploy/prometheus."""
    pairs = [(CHART / "files" / "alerts.yml", ROOT / "deploy" / "prometheus" / "alerts.yml"),
             (CHART / "files" / "stac-dashboard.json", ROOT / "deploy" / "grafana" / "stac-dashboard.json")]
    for copy, source in pairs:
        assert copy.read_bytes() == source.read_bytes(), f"{copy} differs from {source}: copy it again"


def test_values_defaults_keep_the_grace_above_the_drain():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["triton"]["terminationGraceMarginSeconds"] > 0
    assert re.fullmatch(r"\d+", str(values["replicas"]))
