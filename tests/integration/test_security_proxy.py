"""The NGINX proxy in front of a genuine tritonserver passes only inference, health and metadata RPCs,
and refuses an oversized unary request before it reaches Triton (CPU, tiny model, loopback)."""

from __future__ import annotations

import importlib.util
import re
import urllib.request

import numpy as np
import pytest

if importlib.util.find_spec("pytriton") is None or importlib.util.find_spec("tritonclient") is None:
    pytest.skip("serving extras not installed (pip install -e '.[serving]')", allow_module_level=True)

import tritonclient.grpc as grpcclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from stac_backend.client import StacClient, new_stream_id  # noqa: E402
from stac_backend.serving.repository import local_server  # noqa: E402
from stac_backend.serving.settings import ServeSettings  # noqa: E402
from stac_backend.tools.nginx import NginxProxy, find_nginx  # noqa: E402

if find_nginx() is None:
    pytest.skip("nginx is not installed (apt-get install nginx; .ci/run installs it)", allow_module_level=True)

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    work = tmp_path_factory.mktemp("proxy")
    server = local_server(ServeSettings.on_device("cpu", preset="tiny", max_streams=4), work / "server", threads=1)
    try:
        with NginxProxy([server.grpc_url], work / "nginx", max_body="64k") as proxy:
            yield server, proxy
    finally:
        server.stop()


def failed_requests(server) -> float:
    text = NO_PROXY.open(server.metrics_url, timeout=10).read().decode()
    return sum(float(v) for v in re.findall(r"^stac_failed_requests_total\{[^}]*\} ([0-9.e+]+)$", text, flags=re.M))


def test_inference_health_and_metadata_pass(deployment):
    server, proxy = deployment
    client = StacClient(proxy.grpc_url)
    try:
        frames = np.random.default_rng(0).integers(0, 256, (8, 3, 56, 84), dtype=np.uint8)
        outs = list(client.stream(frames, stream_id=new_stream_id(), chunk_size=4))
        assert [o["frame_index"].tolist() for o in outs] == [[0, 1, 2, 3], [4, 5, 6, 7]]
        assert client.is_ready() and client.client.get_model_metadata("stac").name == "stac"
    finally:
        client.close()


def test_admin_rpcs_are_refused_by_the_proxy_even_with_the_key(deployment):
    server, proxy = deployment
    client = grpcclient.InferenceServerClient(proxy.grpc_url)
    headers = server.admin_headers("grpc")
    calls = {
        "shared memory": lambda: client.register_system_shared_memory("victim", "/stac-victim", 64, headers=headers),
        "logging": lambda: client.update_log_settings({"log_verbose_level": 2}, headers=headers),
        "statistics": lambda: client.get_inference_statistics("stac", headers=headers),
        "model repository": lambda: client.unload_model("stac", headers=headers),
        "trace": lambda: client.get_trace_settings(headers=headers),
    }
    for name, call in calls.items():
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == "StatusCode.PERMISSION_DENIED", name
    # Directly on the replica (a private address) the key still opens them.
    direct = grpcclient.InferenceServerClient(server.grpc_url)
    assert "model_stats" in direct.get_inference_statistics("stac", headers=headers, as_json=True)
    client.close()
    direct.close()


def test_an_oversized_unary_request_never_reaches_triton(deployment):
    server, proxy = deployment
    before = failed_requests(server)
    client = grpcclient.InferenceServerClient(proxy.grpc_url)
    frames = np.zeros((1, 16, 3, 56, 84), np.uint8)  # 226 kB > the proxy's 64k
    inputs = [grpcclient.InferInput("FRAMES", list(frames.shape), "UINT8")]
    inputs[0].set_data_from_numpy(frames)
    with pytest.raises(InferenceServerException):
        client.infer("stac", inputs, sequence_id=new_stream_id(), sequence_start=True)
    refused = lambda entries: any(e["status"] == "413" for e in entries)  # noqa: E731
    assert refused(proxy.wait_for_access_entries(refused)), "the proxy's log shows no 413"
    assert failed_requests(server) == before
    client.close()
