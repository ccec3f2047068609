"""docker-compose.yml and what it mounts, checked without a Docker engine.

The file is parsed with PyYAML (merge keys included) and checked for the services, ports, GPU
reservations, health checks, start order, profiles and volumes the deployment relies on; the
NGINX configs it mounts must be what the renderer produces and must pass ``nginx -t`` (a copy
with loopback upstreams and local paths; skipped only where nginx is not installed); the
prepare step runs here for real on a tiny checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from stac_backend.loadgen.perf import PERF_RESTRICTED  # noqa: E402
from stac_backend.model import save_checkpoint  # noqa: E402
from stac_backend.tools.nginx import (  # noqa: E402
    PRODUCTION_NGINX,
    PRODUCTION_NGINX_TLS,
    find_nginx,
    legacy_http2,
    nginx_has_http2_directive,
    nginx_test,
    render_nginx_config,
)

from conftest import load_script, make_tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
NGC = re.compile(r"^nvcr\.io/nvidia/tritonserver:(\d\d\.\d\d)-py3$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _default(value: str) -> str:
    """Resolve compose's ${VAR:-default} to the default."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def _ports(service: dict) -> list[tuple[str, int, int]]:
    out = []
    for spec in service.get("ports", []):
        parts = _default(str(spec)).split(":")
        host_ip = parts[0] if len(parts) == 3 else "0.0.0.0"
        out.append((host_ip, int(parts[-2]), int(parts[-1])))
    return out


def _gpu(service: dict) -> dict:
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    return devices[0]


def test_services_and_profiles(compose):
    services = compose["services"]
    assert {"prepare", "triton", "triton-1", "nginx", "prometheus", "perf_analyzer"} <= set(services)
    # default deployment: prepare, one Triton, Prometheus; cluster: a second replica behind NGINX
    for name in ("prepare", "triton", "prometheus"):
        assert "profiles" not in services[name], name
    assert services["triton-1"]["profiles"] == ["cluster"]
    assert services["nginx"]["profiles"] == ["cluster"]
    for name in ("perf_analyzer", "prepare-perf", "triton-perf"):
        assert services[name]["profiles"] == ["perf"], name


@pytest.mark.parametrize("name", ["triton", "triton-1"])
def test_triton_service(compose, name):
    svc = compose["services"][name]
    command = svc["command"]
    assert command[0] == "tritonserver"
    flags = dict(c.split("=", 1) for c in command[1:] if "=" in c)
    assert flags["--model-repository"] == "/models"
    assert flags["--model-control-mode"] == "none"
    assert (flags["--http-port"], flags["--grpc-port"], flags["--metrics-port"]) == ("8000", "8001", "8002")
    assert flags["--allow-metrics"] == "true"
    assert "${STAC_MODEL_DIR:-stac-models}:/models:ro" in svc["volumes"]  # outside the git checkout
    assert "stac-models" in compose["volumes"]
    # Docker's stop timeout must outlast Triton's drain, or the drain is killed half-way.
    exit_timeout = int(flags["--exit-timeout-secs"])
    grace = svc["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) > exit_timeout
    for flag in ("--grpc-restricted-protocol", "--http-restricted-api"):  # admin groups need the admin key
        groups, _, key = flags[flag].partition(":")
        assert set(groups.split(",")) == {"shared-memory", "model-repository", "logging", "trace", "statistics"}
        assert key.startswith("stac-admin-key=${STAC_ADMIN_KEY:?"), "no default key: compose refuses to start without one"
    shm = svc["shm_size"].lower()
    assert shm.endswith("gb") and int(shm[:-2]) >= 1
    gpu = _gpu(svc)
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert gpu.get("count") or gpu.get("device_ids")
    health = " ".join(svc["healthcheck"]["test"])
    assert "/v2/health/ready" in health and "8000" in health
    assert svc["depends_on"]["prepare"]["condition"] == "service_completed_successfully"
    assert svc["build"]["dockerfile"] == "deploy/triton/Dockerfile"
    assert NGC.match(svc["build"]["args"]["TRITON_IMAGE"])


def test_replicas_get_different_gpus_and_ports_stay_on_loopback(compose):
    s = compose["services"]
    assert _default(_gpu(s["triton"])["device_ids"][0]) != _default(_gpu(s["triton-1"])["device_ids"][0])
    published = {port for _, _, port in _ports(s["triton"])}
    assert {8000, 8001, 8002} <= published
    for name, svc in s.items():
        for host_ip, _, _ in _ports(svc):
            assert host_ip == "127.0.0.1", f"{name} publishes on {host_ip} by default (STAC_BIND)"
    assert "ports" not in s["triton-1"]  # reached through NGINX only


def test_prepare_service(compose):
    svc = compose["services"]["prepare"]
    assert "deploy/prepare.py" in " ".join(svc["command"])
    assert "${STAC_MODEL_DIR:-stac-models}:/models" in [v.split("#")[0].strip() for v in svc["volumes"]]  # writable
    assert any(v.endswith(":/checkpoints:ro") for v in svc["volumes"])
    assert svc["restart"] == "no"
    assert "STAC_BUILD_TENSORRT" in svc["environment"]
    assert (ROOT / "deploy" / "prepare.py").is_file()
    hook = ROOT / "deploy" / "hooks" / "build_tensorrt_engines.sh"
    assert hook.is_file() and "stac_backend.export repository" in hook.read_text()
    assert "not implemented" not in hook.read_text()


def _fake_python(tmp_path: Path, has_tensorrt: bool) -> Path:
    """A python3 stand-in: `-c "...load()"` (is a TensorRT package importable?) succeeds or not;
    anything else prints its arguments."""
    fake = tmp_path / "python3"
    fake.write_text("#!/usr/bin/env bash\n"
                    f'if [[ "$1" == -c ]]; then exit {0 if has_tensorrt else 1}; fi\n'
                    'echo "ARGS $*"\n')
    fake.chmod(0o755)
    return fake


def test_tensorrt_hook_runs_the_engine_build(tmp_path):
    """The hook checks that a TensorRT package is importable, then runs `stac export repository` with
    the STAC_TRT_* options (the build itself is tested in tests/unit/test_tensorrt_build.py)."""
    hook = ROOT / "deploy" / "hooks" / "build_tensorrt_engines.sh"
    env = {"PATH": os.environ["PATH"], "STAC_PYTHON": str(_fake_python(tmp_path, True)), "STAC_TRT_MAX_BATCH": "2",
           "STAC_TRT_MAX_FRAMES": "16", "STAC_TRT_PLUGINS": "jit", "STAC_TRT_FP16": "1"}
    done = subprocess.run(["bash", str(hook), "/models"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    args = done.stdout.split("ARGS ", 1)[1].split()
    assert args[:4] == ["-m", "stac_backend.export", "repository", "/models"]
    options = " ".join(args[4:])
    for expected in ("--height 392", "--width 518", "--max-batch 2", "--plugins python", "--max-frames 16", "--fp16"):
        assert expected in options, options
    (tmp_path / "without").mkdir()
    env["STAC_PYTHON"] = str(_fake_python(tmp_path / "without", False))
    done = subprocess.run(["bash", str(hook), "/models"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 3 and "no TensorRT Python package is importable" in done.stderr


def test_nginx_service_and_proxy_config(compose):
    svc = compose["services"]["nginx"]
    mounts = {_default(v).rsplit(":", 2)[1]: _default(v).split(":")[0] for v in svc["volumes"]}
    assert mounts["/etc/nginx/nginx.conf"] == "./deploy/nginx/nginx.conf"
    assert any(v.endswith(":ro") for v in svc["volumes"])
    for replica in ("triton", "triton-1"):
        assert svc["depends_on"][replica]["condition"] == "service_healthy"
    assert "healthz" in " ".join(svc["healthcheck"]["test"])
    conf = (ROOT / "deploy" / "nginx" / "nginx.conf").read_text()
    assert conf == render_nginx_config(PRODUCTION_NGINX), "deploy/nginx/nginx.conf drifted from the renderer"
    tls = (ROOT / "deploy" / "nginx" / "nginx-tls.conf").read_text()
    assert tls == render_nginx_config(PRODUCTION_NGINX_TLS), "deploy/nginx/nginx-tls.conf drifted from the renderer"
    assert "hash $stac_route_key consistent;" in conf
    # the header when there is one; one replica per client connection when there is none
    assert re.search(r'map \$http_x_stream_id \$stac_route_key \{\s+"" \$remote_addr:\$remote_port;\s+'
                     r'default \$http_x_stream_id;', conf)
    # nginx >= 1.25.1 (the nginx:1.27 image) deprecates "listen ... http2"
    assert "grpc_pass grpc://triton_grpc;" in conf and re.search(r"listen 8001;\s+http2 on;", conf)
    assert re.search(r"client_max_body_size \d+m;", conf)
    # streaming calls (one body per camera stream) have their own location without the unary cap
    assert re.search(r"location = /inference\.GRPCInferenceService/ModelStreamInfer \{\s+client_max_body_size 0;", conf)
    upstreams = re.findall(r"^\s*server (\S+):(\d+) ", conf, re.M)
    assert {host for host, _ in upstreams} == {"triton", "triton-1"} and {p for _, p in upstreams} == {"8001"}
    assert set(h for h, _ in upstreams) <= set(compose["services"])
    assert re.search(r"listen 8443 ssl;\s+http2 on;", tls) and "ssl_certificate /etc/nginx/certs/tls.crt;" in tls


def test_prometheus_and_perf_analyzer(compose):
    s = compose["services"]
    volumes = s["prometheus"]["volumes"]
    assert "${STAC_PROMETHEUS_CONFIG:-./deploy/prometheus/prometheus.yml}:/etc/prometheus/prometheus.yml:ro" in volumes
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in volumes
    assert any(v.split("#")[0].strip() == "prometheus-data:/prometheus" for v in volumes)  # kept across restarts
    assert "prometheus-data" in compose["volumes"]

    def targets(name):
        prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / name).read_text())
        return {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}

    # the default config scrapes only what the default profile runs; the cluster one both replicas
    assert targets("prometheus.yml") == {"triton:8002"}
    assert targets("prometheus-cluster.yml") == {"triton:8002", "triton-1:8002"}
    assert "profiles" not in s["triton"] and s["triton-1"]["profiles"] == ["cluster"]
    tag = NGC.match(s["triton"]["build"]["args"]["TRITON_IMAGE"]).group(1)
    assert s["perf_analyzer"]["image"] == f"nvcr.io/nvidia/tritonserver:{tag}-py3-sdk"
    cmd = " ".join(s["perf_analyzer"]["command"])
    assert "--sequence-id-range" in cmd and "--serial-sequences" in cmd and "--concurrency-range" in cmd
    dockerfile = (ROOT / "deploy" / "triton" / "Dockerfile").read_text()
    assert f"ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:{tag}-py3" in dockerfile
    assert 'pip install "/opt/stac[engine]"' in dockerfile
    ignore = (ROOT / "deploy" / "triton" / "Dockerfile.dockerignore").read_text()
    assert "!stac_backend/" in ignore and "!pyproject.toml" in ignore


def test_perf_profile_measures_a_benchmark_replica_of_its_own(compose):
    """perf_analyzer can send neither STREAM_KEY nor the admin key over gRPC: the perf profile measures
    triton-perf (stream keys off, statistics open, as `stac perf sweep --local`), never production's
    replicas, which keep every default."""
    s = compose["services"]
    # the same preparation except the stream keys, into a repository of its own
    production_env, perf_env = dict(s["prepare"]["environment"]), dict(s["prepare-perf"]["environment"])
    assert _default(production_env.pop("STAC_STREAM_KEYS")) == "1" and perf_env.pop("STAC_STREAM_KEYS") == "0"
    assert perf_env == production_env
    assert s["prepare-perf"]["command"] == s["prepare"]["command"]
    assert s["prepare-perf"]["volumes"][0].split("#")[0].strip() == "stac-models-perf:/models"
    assert s["triton-perf"]["volumes"] == ["stac-models-perf:/models:ro"] and "stac-models-perf" in compose["volumes"]
    assert s["triton-perf"]["depends_on"] == {"prepare-perf": {"condition": "service_completed_successfully"}}
    # the production command but for the restricted groups: statistics open, the rest keyed
    restricted = ("--grpc-restricted-protocol", "--http-restricted-api")
    production, perf = s["triton"]["command"], s["triton-perf"]["command"]
    assert [c for c in perf if not c.startswith(restricted)] == [c for c in production if not c.startswith(restricted)]
    flags = dict(c.split("=", 1) for c in perf if c.startswith(restricted))
    assert set(flags) == set(restricted)
    for value in flags.values():
        groups, _, key = value.partition(":")
        assert set(groups.split(",")) == set(PERF_RESTRICTED) and "statistics" not in groups
        assert key.startswith("stac-admin-key=${STAC_ADMIN_KEY:?")
    # private: no published port, not behind NGINX; perf_analyzer measures it and nothing else
    assert "ports" not in s["triton-perf"]
    assert "triton-perf" not in (ROOT / "deploy" / "nginx" / "nginx.conf").read_text()
    command = s["perf_analyzer"]["command"]
    assert command[command.index("-u") + 1] == "triton-perf:8001"
    assert "--metrics-url=triton-perf:8002/metrics" in command
    assert s["perf_analyzer"]["depends_on"] == {"triton-perf": {"condition": "service_healthy"}}
    assert "benchmark only" in (ROOT / "docs" / "deployment.md").read_text().lower()


def _loopback_copy(text: str, workdir: Path) -> str:
    text = re.sub(r"server (triton(?:-\d+)?):8001 ", lambda m: f"server 127.0.0.1:{18001 + (m.group(1) != 'triton')} ", text)
    text = text.replace("/var/log/nginx/", f"{workdir}/")
    text = text.replace("/etc/nginx/certs/", f"{workdir}/certs/")
    if not nginx_has_http2_directive():  # Debian 12's nginx 1.22 predates "http2 on;" (1.25.1)
        text = legacy_http2(text)
    return text


@pytest.mark.skipif(find_nginx() is None, reason="nginx is not installed (apt-get install nginx; .ci/run does)")
def test_nginx_accepts_the_production_config(tmp_path):
    conf = _loopback_copy((ROOT / "deploy" / "nginx" / "nginx.conf").read_text(), tmp_path)
    proc = nginx_test(conf, tmp_path)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(find_nginx() is None or shutil.which("openssl") is None, reason="nginx or openssl is not installed")
def test_nginx_accepts_the_tls_config(tmp_path):
    (tmp_path / "certs").mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(tmp_path / "certs" / "tls.key"), "-out", str(tmp_path / "certs" / "tls.crt")],
                   check=True, capture_output=True, timeout=60)
    conf = _loopback_copy((ROOT / "deploy" / "nginx" / "nginx-tls.conf").read_text(), tmp_path)
    proc = nginx_test(conf, tmp_path)
    assert proc.returncode == 0, proc.stderr


def _prepare_module():
    return load_script(ROOT / "deploy" / "prepare.py", "stac_deploy_prepare")


def test_prepare_places_validates_and_renders(tmp_path, monkeypatch):
    prepare = _prepare_module()
    source = tmp_path / "incoming"
    save_checkpoint(make_tiny_model(seed=3), source / "tiny.safetensors")
    repo = tmp_path / "model_repository"
    monkeypatch.setenv("STAC_MAX_STREAMS", "6")
    monkeypatch.setenv("STAC_CACHE_CONFIG", json.dumps({"policy": "stac", "memory_budget_bytes": 64 << 20}))
    monkeypatch.delenv("STAC_BUILD_TENSORRT", raising=False)
    args = ["--repository", str(repo), "--checkpoint-dir", str(source), "--checkpoint-file", "tiny.safetensors", "--preset", ""]
    assert prepare.main(args) == 0
    config = (repo / "stac" / "config.pbtxt").read_text()
    assert 'string_value: "checkpoints/tiny.safetensors"' in config
    assert "KIND_GPU" in config and 'key: "MAX_STREAMS" value: { string_value: "6" }' in config
    assert "memory_budget_bytes" in config
    assert (repo / "stac" / "1" / "model.py").is_file()
    manifest = json.loads((repo / "stac" / "PREPARED.json").read_text())
    assert manifest["checkpoint"]["tensors"] > 10 and len(manifest["checkpoint"]["sha256"]) == 64
    assert manifest["tensorrt"] == "skipped"
    assert "OUTPUT_DEVICE" not in config  # host outputs unless asked (no measured gain, docs/performance.md)
    # Idempotent: a second run finds the checkpoint in place.
    assert prepare.main(args) == 0
    # Asked for, a GPU instance hands its outputs over as CUDA tensors ...
    monkeypatch.setenv("STAC_OUTPUT_DEVICE", "gpu")
    assert prepare.main(args) == 0
    assert 'key: "OUTPUT_DEVICE" value: { string_value: "gpu" }' in (repo / "stac" / "config.pbtxt").read_text()
    monkeypatch.setenv("STAC_DECOUPLED", "1")
    assert prepare.main(args) == 0
    assert "model_transaction_policy { decoupled: true }" in (repo / "stac" / "config.pbtxt").read_text()
    monkeypatch.setenv("STAC_DECOUPLED", "maybe")
    with pytest.raises(ValueError, match="STAC_DECOUPLED"):
        prepare.main(args)
    monkeypatch.delenv("STAC_DECOUPLED")
    # ... and a CPU instance asked for it is refused before anything is served.
    monkeypatch.setenv("STAC_INSTANCE_KIND", "KIND_CPU")
    with pytest.raises(ValueError, match="GPU instance"):
        prepare.main(args)


def test_prepare_refuses_a_mismatched_or_missing_checkpoint(tmp_path, monkeypatch):
    prepare = _prepare_module()
    source = tmp_path / "incoming"
    save_checkpoint(make_tiny_model(seed=3), source / "tiny.safetensors")
    repo = tmp_path / "repo"
    from stac_backend.model.checkpoint import CheckpointMismatchError

    with pytest.raises(CheckpointMismatchError, match="missing"):  # the tiny weights are not vggt-1b's
        prepare.main(["--repository", str(repo), "--checkpoint-dir", str(source), "--checkpoint-file", "tiny.safetensors",
                      "--preset", "vggt-1b"])
    assert not (repo / "stac" / "config.pbtxt").exists()
    with pytest.raises(FileNotFoundError, match="not found"):
        prepare.main(["--repository", str(repo), "--checkpoint-dir", str(source), "--checkpoint-file", "absent.safetensors"])
    monkeypatch.setenv("STAC_BUILD_TENSORRT", "1")  # asked for without an importable TensorRT: fail loudly
    monkeypatch.setenv("STAC_PYTHON", str(_fake_python(tmp_path, False)))
    with pytest.raises(subprocess.CalledProcessError):
        prepare.main(["--repository", str(repo), "--checkpoint-dir", str(source), "--checkpoint-file", "tiny.safetensors",
                      "--preset", ""])


@pytest.mark.skipif(importlib.util.find_spec("pytriton") is None, reason="serving extras not installed")
def test_triton_accepts_the_compose_flags(compose, tmp_path):
    """The compose command's flags on the genuine tritonserver 2.51 (= NGC 24.10) with a CPU repository:
    the server must come up ready (also proves config.pbtxt is complete without auto-complete)."""
    from stac_backend.serving.repository import ServeSettings, write_repository
    from stac_backend.tools.tritonserver import TritonServer

    own = ("--model-repository", "--model-control-mode", "--http-port", "--grpc-port", "--metrics-port", "--log-verbose",
           "--exit-on-error", "--strict-readiness", "--exit-timeout-secs",
           "--grpc-restricted-protocol", "--http-restricted-api")  # the launcher sets these itself
    command = compose["services"]["triton"]["command"]
    extra = [c for c in command[1:] if not c.startswith(own)]
    assert "--disable-auto-complete-config" in extra and any(c.startswith("--backend-config=python") for c in extra)
    repo = write_repository(tmp_path / "repo", ServeSettings(preset="tiny", device="cpu", instance_kind="KIND_CPU"))
    with TritonServer(repo, extra_args=extra, log_file=tmp_path / "triton.log", exit_timeout_s=2,
                      env={"OMP_NUM_THREADS": "1"}) as server:
        assert server.is_running()
