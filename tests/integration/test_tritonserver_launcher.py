"""The genuine tritonserver from nvidia-pytriton, started by stac_backend.tools.tritonserver.

Starts the real server (Python backend, sequence batcher) on free loopback ports with the
tiny repository in tests/fixtures/echo_repository, talks to it with tritonclient over gRPC
and HTTP, and checks that stopping it leaves no process behind. Skipped only when
nvidia-pytriton is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import site
import socket
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("pytriton") is None:
    pytest.skip(
        "nvidia-pytriton is not installed (pip install nvidia-pytriton==0.7.0 'tritonclient[grpc]')",
        allow_module_level=True,
    )

import tritonclient.grpc as grpcclient  # noqa: E402  (installed with nvidia-pytriton)
from tritonclient.utils import InferenceServerException  # noqa: E402

from stac_backend.tools.triton_install import elf_needed, find_triton_install, prepare_backend_directory  # noqa: E402
from stac_backend.tools.tritonserver import TritonServer, TritonServerError  # noqa: E402

ECHO_REPOSITORY = Path(__file__).parent / "fixtures" / "echo_repository"
MODEL = "echo_seq"
STARTUP_TIMEOUT_S = 180.0
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log_file = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    srv = TritonServer(
        ECHO_REPOSITORY,
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        model_control_mode="none",
        # Forward the routing header to the model as a request parameter.
        extra_args=["--grpc-header-forward-pattern=x-stream-id"],
        shm_default_byte_size=4 * 1024 * 1024,
        shm_growth_byte_size=1024 * 1024,
        log_file=log_file,
        die_with_parent=True,
    )
    try:
        srv.start_and_wait(timeout=STARTUP_TIMEOUT_S)
        yield srv
    finally:
        srv.stop()


@pytest.fixture()
def client(server):
    # gRPC honours http_proxy/grpc_proxy from the environment; this server is on loopback.
    c = grpcclient.InferenceServerClient(url=server.grpc_url, channel_args=[("grpc.enable_http_proxy", 0)])
    try:
        yield c
    finally:
        c.close()


def _step(client, seq_id, values, *, start=False, end=False, header=None):
    data = np.asarray(values, dtype=np.float32).reshape(1, -1)
    inp = grpcclient.InferInput("INPUT", list(data.shape), "FP32")
    inp.set_data_from_numpy(data)
    outputs = [grpcclient.InferRequestedOutput("SUM"), grpcclient.InferRequestedOutput("STEP")]
    result = client.infer(
        MODEL,
        [inp],
        outputs=outputs,
        sequence_id=seq_id,
        sequence_start=start,
        sequence_end=end,
        headers={"x-stream-id": str(seq_id if header is None else header)},
        client_timeout=30.0,
    )
    return float(result.as_numpy("SUM").reshape(-1)[0]), int(result.as_numpy("STEP").reshape(-1)[0])


# ---- no server needed -----------------------------------------------------------------


def test_unsupported_python_version_is_reported():
    install = find_triton_install()
    with pytest.raises(TritonServerError, match=r"Python 3\.99 is not supported.*ships stubs for"):
        install.stub_for("3.99")


def test_missing_shared_libpython_says_what_to_install(tmp_path, monkeypatch):
    from stac_backend.tools import triton_install as launcher

    monkeypatch.setattr(launcher.sysconfig, "get_config_var", lambda name: str(tmp_path))
    monkeypatch.setattr(launcher.sys, "base_prefix", str(tmp_path))
    monkeypatch.setattr(launcher, "_system_loader_finds", lambda soname: None)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    with pytest.raises(TritonServerError) as info:
        launcher.find_libpython()
    message = str(info.value)
    assert f"libpython{version}.so.1.0 not found" in message
    assert "PYTHON_CONFIGURE_OPTS=--enable-shared" in message
    assert f"apt-get install libpython{version}" in message


def test_backend_directory_is_prepared_outside_site_packages(tmp_path):
    install = find_triton_install()
    prepared = prepare_backend_directory(install, cache_dir=tmp_path)
    stub = prepared.backend_directory / "python" / "triton_python_backend_stub"
    assert stub.is_file() and os.access(stub, os.X_OK)
    assert (prepared.backend_directory / "python" / "libtriton_python.so").is_file()
    assert tmp_path in prepared.root.parents
    # The stub links the shared libpython of this interpreter's minor version.
    needed = elf_needed(stub) or []
    assert any(n.startswith("libpython3") for n in needed), needed
    # A second call reuses the cache entry.
    assert prepare_backend_directory(install, cache_dir=tmp_path).root == prepared.root


# ---- the running server -----------------------------------------------------------------


def test_http_ready_and_urls(server):
    assert server.is_running()
    assert set(server.urls) == {"http", "grpc", "metrics"}
    assert len(set(server.ports.values())) == 3
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready"):
        with NO_PROXY.open(server.http_url + path, timeout=5) as resp:
            assert resp.status == 200, path
    with NO_PROXY.open(server.metrics_url, timeout=5) as resp:
        assert b"nv_inference_request_success" in resp.read()
    assert server.startup_seconds is not None and server.startup_seconds > 0


def test_stub_imports_packages_of_this_virtualenv(server):
    """The stub's interpreter is this venv's: same prefix, numpy/torch/stac_backend from it."""
    lines = "\n".join(server.log_tail(400))
    site_dirs = [os.path.realpath(d) for d in site.getsitepackages()]
    for module in ("numpy", "torch"):
        marker = f"{MODEL}: imported {module} from "
        assert marker in lines, f"no import line for {module}"
        origin = lines.split(marker, 1)[1].split('"', 1)[0].split("\n", 1)[0]
        assert any(os.path.realpath(origin).startswith(d) for d in site_dirs), (module, origin, site_dirs)
    assert f"{MODEL}: imported stac_backend from " in lines
    assert f"{MODEL}: python {sys.version.split()[0]} prefix {sys.prefix} executable " in lines


def test_two_interleaved_sequences_keep_separate_sums(client):
    # The second id needs more than 32 bits (a UINT32/INT32 CORRID would truncate it).
    # tritonclient's gRPC API sends sequence_id as an int64 parameter: ids >= 2**63 fail
    # client-side even though the CORRID control is UINT64.
    a, b = 1001, 2**40 + 5
    assert _step(client, a, [1.0], start=True) == (1.0, 1)
    assert _step(client, b, [10.0, 20.0], start=True) == (30.0, 1)
    assert _step(client, a, [2.0, 3.0]) == (6.0, 2)
    assert _step(client, b, [5.0]) == (35.0, 2)
    assert _step(client, a, [4.0]) == (10.0, 3)
    assert _step(client, b, [0.5], end=True) == (35.5, 3)
    assert _step(client, a, [0.25], end=True) == (10.25, 4)
    # After END the id can start afresh.
    assert _step(client, a, [7.0], start=True, end=True) == (7.0, 1)


def test_concurrent_sequences_are_batched_without_mixing(client, server):
    def run(seq_id):
        total = 0.0
        for i in range(8):
            total += seq_id + i
            got = _step(client, seq_id, [seq_id + i], start=(i == 0), end=(i == 7))
            assert got == (total, i + 1), (seq_id, i, got)
        return total

    ids = [31, 32, 33, 34]
    with ThreadPoolExecutor(len(ids)) as pool:
        totals = list(pool.map(run, ids))
    assert totals == [sum(s + i for i in range(8)) for s in ids]


def test_request_without_correlation_id_is_refused(client):
    data = np.ones((1, 1), dtype=np.float32)
    inp = grpcclient.InferInput("INPUT", [1, 1], "FP32")
    inp.set_data_from_numpy(data)
    with pytest.raises(InferenceServerException, match=r"(?i)correlation id"):
        client.infer(MODEL, [inp], client_timeout=30.0)


def test_sequence_must_start_with_start_flag(client):
    with pytest.raises(InferenceServerException, match=r"(?i)START"):
        _step(client, 4242, [1.0])


def test_mismatching_stream_header_is_refused(client):
    with pytest.raises(InferenceServerException, match="does not match correlation id"):
        _step(client, 5151, [1.0], start=True, end=True, header="9999")


def test_model_control_mode_none_refuses_load_and_unload(client):
    with pytest.raises(InferenceServerException):
        client.load_model(MODEL)
    with pytest.raises(InferenceServerException):
        client.unload_model(MODEL)
    assert client.is_model_ready(MODEL)
    assert _step(client, 777, [3.0], start=True, end=True) == (3.0, 1)


# ---- start-up failure and stop ----------------------------------------------------------


def test_failed_start_reports_log_tail_and_leaves_nothing(tmp_path):
    model_dir = tmp_path / "repo" / "broken"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(
        'name: "broken"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [{ name: "X" data_type: TYPE_FP32 dims: [ 1 ] }]\n'
        'output [{ name: "Y" data_type: TYPE_FP32 dims: [ 1 ] }]\n'
        'instance_group [{ kind: KIND_CPU }]\n'
    )
    (model_dir / "1" / "model.py").write_text(
        "class TritonPythonModel:\n"
        "    def initialize(self, args):\n"
        "        raise RuntimeError('deliberately broken fixture model')\n"
    )
    srv = TritonServer(tmp_path / "repo", log_file=tmp_path / "broken.log", die_with_parent=True)
    with pytest.raises(TritonServerError) as info:
        srv.start_and_wait(timeout=STARTUP_TIMEOUT_S)
    message = str(info.value)
    assert "exited with code" in message
    assert "deliberately broken fixture model" in message
    assert 0 < len(info.value.log_tail) <= 40
    assert srv.pid is not None and _process_gone(srv.pid) and _group_gone(srv.pid)
    assert "deliberately broken fixture model" in (tmp_path / "broken.log").read_text()


def test_stop_ends_server_and_stubs(tmp_path):
    lines = []
    # A PATH whose first python3 is the system's (as in a CI step that runs .venv/bin/pytest
    # without activating the venv): the launcher still hands the stub this venv's python3.
    srv = TritonServer(
        ECHO_REPOSITORY,
        log_callback=lines.append,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin"},
        exit_timeout_s=10,
        die_with_parent=True,
    )
    with srv:
        pid, http_port, grpc_port = srv.pid, srv.ports["http"], srv.ports["grpc"]
        assert pid is not None and not _process_gone(pid)
        # The Python stub runs in the server's process group.
        stubs = [
            p for p in os.listdir("/proc")
            if p.isdigit() and os.path.exists(f"/proc/{p}/cmdline") and _pgid(int(p)) == pid and int(p) != pid
        ]
        assert stubs, "no stub process found in the server's process group"
    assert srv.returncode is not None
    assert srv.returncode in (0, -signal.SIGINT), srv.returncode  # graceful SIGINT path
    assert _process_gone(pid)
    assert _group_gone(pid)
    assert all(_process_gone(int(p)) for p in stubs)
    assert _port_closed(http_port) and _port_closed(grpc_port)
    assert lines and all(line.startswith("[triton] ") for line in lines)
    assert any(f"{MODEL}: python {sys.version.split()[0]} prefix {sys.prefix} " in line for line in lines)
    assert srv.stop() == srv.returncode  # idempotent
    with pytest.raises(urllib.error.URLError):
        NO_PROXY.open(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2)


def _pgid(pid: int):
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
