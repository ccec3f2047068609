"""The user-facing client against a genuine tritonserver (CPU, tiny model): the frame size the server
publishes, the pipelined LiveStream equal to unary requests and to the engine, `stac stream --server`
taking the server's size, and the metrics the dashboard and alert rules read really exported."""

from __future__ import annotations

import importlib.util
import json
import re
import urllib.request

import numpy as np
import pytest
import torch

if importlib.util.find_spec("pytriton") is None or importlib.util.find_spec("tritonclient") is None:
    pytest.skip("serving extras not installed (pip install -e '.[serving]')", allow_module_level=True)

from stac_backend.cache import CacheConfig  # noqa: E402
from stac_backend.cli import main  # noqa: E402
from stac_backend.client import StacClient  # noqa: E402
from stac_backend.engine import Stream  # noqa: E402
from stac_backend.model import save_checkpoint  # noqa: E402
from stac_backend.serving.metrics import EXPORTED_SERIES  # noqa: E402
from stac_backend.serving.repository import ServeSettings, write_repository  # noqa: E402
from stac_backend.tools.tritonserver import TritonServer  # noqa: E402

from conftest import load_script, make_tiny_model  # noqa: E402

CACHE = {"policy": "window"}
IMAGE_SIZE = 84  # published by the server; the CLI must stream at this width
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(seed=3)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model):
    work = tmp_path_factory.mktemp("client-live")
    checkpoint = work / "tiny.safetensors"
    save_checkpoint(model, checkpoint)
    settings = ServeSettings(preset="", dtype="float32", device="cpu", instance_kind="KIND_CPU", cache_config=CACHE,
                             max_streams=4, idle_ttl_s=60.0, triton_idle_us=60_000_000, image_size=IMAGE_SIZE,
                             max_queue_delay_us=1000)
    repo = write_repository(work / "repo", settings, checkpoint_file=checkpoint)
    with TritonServer(repo, log_file=work / "tritonserver.log", exit_timeout_s=5) as srv:
        yield srv


def frames(seed: int, n: int = 10, h: int = 56, w: int = IMAGE_SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, h, w), dtype=np.uint8)


def test_live_stream_equals_unary_and_the_engine(server, model):
    client = StacClient(server.grpc_url)
    assert client.frame_spec().size == IMAGE_SIZE and client.frame_spec().preprocess == "crop"
    video = frames(1)
    chunks = [video[i:i + 4] for i in range(0, len(video), 4)]
    live = client.live_stream(stream_id=101, max_inflight=3, outputs=("depth", "frame_index", "extrinsics"))
    futures = [live.submit(c, end=k == len(chunks) - 1) for k, c in enumerate(chunks)]
    pipelined = [f.result(timeout=120) for f in futures]
    live.close()
    unary = list(client.stream(iter(video), stream_id=102, outputs=("depth", "frame_index", "extrinsics")))
    engine = Stream(model, cache=CacheConfig(**CACHE))
    for k, chunk in enumerate(chunks):
        expected = engine.push(torch.from_numpy(chunk))
        assert pipelined[k]["frame_index"].tolist() == list(range(4 * k, 4 * k + len(chunk)))
        np.testing.assert_array_equal(pipelined[k]["depth"], unary[k]["depth"])
        np.testing.assert_allclose(pipelined[k]["depth"], expected["depth"].numpy(), rtol=1e-4, atol=1e-5)
    client.close()


def test_live_stream_close_ends_the_stream_on_the_server(server):
    client = StacClient(server.grpc_url)
    before = scrape(server)
    live = client.live_stream(stream_id=103)
    for k in range(2):
        live.submit(frames(2, 4)).result(timeout=120)
    live.close()  # no chunk carried END: close() sends it
    after = scrape(server)
    assert after["stac_streams_ended_total"] == before["stac_streams_ended_total"] + 1
    assert after["stac_active_streams"] == 0
    client.close()


def test_stream_command_uses_the_servers_frame_size(server, tmp_path, capsys):
    out = tmp_path / "served"
    assert main(["stream", "synthetic:6", "--out", str(out), "--server", server.grpc_url, "--quiet"]) == 0
    with np.load(out / "frames" / "frame_00005.npz") as f:
        assert f["depth"].shape[1] == IMAGE_SIZE and f["rgb"].shape[1] == IMAGE_SIZE
    assert json.loads((out / "summary.json").read_text())["frames"] == 6


def scrape(server) -> dict[str, float]:
    text = NO_PROXY.open(server.metrics_url, timeout=10).read().decode()
    values: dict[str, float] = {}
    for name, labels, value in re.findall(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? ([-+0-9.eEinfa]+)$", text, flags=re.M):
        if name.startswith("stac_"):
            assert "instance=" not in labels and 'model="stac"' in labels and 'version="1"' in labels, labels
        values[name] = values.get(name, 0.0) + float(value)
    return values


def test_exported_metrics_cover_the_dashboard_and_the_rules(server):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "unit" / "test_metrics_export.py"
    queries = load_script(path, "metrics_queries")  # the same query parsing as the unit test
    alert_queries, dashboard_queries, query_metric_names = (
        queries.alert_queries, queries.dashboard_queries, queries.query_metric_names)

    client = StacClient(server.grpc_url)
    list(client.stream(iter(frames(4, 4)), stream_id=104))  # at least one execute
    client.close()
    exported = scrape(server)
    assert set(EXPORTED_SERIES) <= set(exported), sorted(set(EXPORTED_SERIES) - set(exported))
    assert exported["stac_execute_duration_seconds_count"] >= 1
    used = set().union(*(query_metric_names(q) for q in dashboard_queries() + alert_queries()))
    missing = {name for name in used - set(exported) if not name.startswith("nv_gpu_") and name != "up"}
    assert missing == set(), f"the dashboard or rules read metrics this server does not export: {sorted(missing)}"
