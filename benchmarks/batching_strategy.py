"""Measure Triton's sequence-batching strategies (oldest vs direct) for the stac model.

Starts a local tritonserver per strategy, runs N concurrent gRPC streams of M frames as fast as
they go, and records aggregate frames/s, per-request latency percentiles and how many requests
Triton put into each execute() (from its own statistics). Writes JSON.

    python benchmarks/batching_strategy.py --streams 8 --frames 24 --out docs/benchmarks/batching_strategy_cpu.json
    python benchmarks/batching_strategy.py --device cuda --preset vggt-1b --dtype bfloat16 ...   (GPU machine)
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from stac_backend.client import StacClient
from stac_backend.results import write_result
from stac_backend.serving.repository import ServeSettings, write_repository
from stac_backend.tools.tritonserver import TritonServer


def run_streams(url: str, streams: int, frames: int, chunk: int, hw: tuple[int, int]) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def one(sid: int) -> None:
        client = StacClient(url)
        video = np.random.default_rng(sid).integers(0, 256, (frames, 3, *hw), dtype=np.uint8)
        try:
            for i in range(0, frames, chunk):
                t0 = time.perf_counter()
                client.send_chunk(sid, video[i : i + chunk], start=i == 0, end=i + chunk >= frames)
                with lock:
                    latencies.append(time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - recorded
            with lock:
                errors.append(str(exc))
        finally:
            client.close()

    threads = [threading.Thread(target=one, args=(1000 + s,)) for s in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {
        "wall_seconds": wall,
        "frames_per_second": streams * frames / wall,
        "latency_ms": {p: float(np.percentile(lat, q)) for p, q in (("p50", 50), ("p90", 90), ("p99", 99))} if len(lat) else {},
        "errors": errors,
    }


def batch_stats(url: str) -> dict:
    client = StacClient(url)
    stats = client.client.get_inference_statistics("stac", as_json=True)
    client.close()
    rows = stats["model_stats"][0].get("batch_stats", [])
    counts = {int(r["batch_size"]): int(r["compute_infer"]["count"]) for r in rows}
    executions = sum(counts.values())
    requests = sum(b * c for b, c in counts.items())
    return {"executions": executions, "requests": requests, "mean_requests_per_execute": requests / max(executions, 1),
            "histogram": {str(b): c for b, c in sorted(counts.items())}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--height", type=int, default=56)
    p.add_argument("--width", type=int, default=84)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--checkpoint", default="")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--policy", default="stac")
    p.add_argument("--delay-us", type=int, default=2000, help="max queue delay")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    results = []
    for strategy in ("oldest", "direct"):
        with tempfile.TemporaryDirectory() as work:
            settings = ServeSettings(
                preset=args.preset, checkpoint=args.checkpoint, dtype=args.dtype, device=args.device,
                instance_kind="KIND_GPU" if args.device.startswith("cuda") else "KIND_CPU",
                cache_config={"policy": args.policy, "chunk": args.chunk}, max_streams=args.streams,
                max_batch_size=args.streams, max_queue_delay_us=args.delay_us, strategy=strategy,
            )
            repo = write_repository(Path(work) / "repo", settings)
            with TritonServer(repo, log_file=Path(work) / "triton.log", exit_timeout_s=5) as server:
                run_streams(server.grpc_url, 1, 2 * args.chunk, args.chunk, (args.height, args.width))  # warm-up
                measured = run_streams(server.grpc_url, args.streams, args.frames, args.chunk, (args.height, args.width))
                measured["batching"] = batch_stats(server.grpc_url)
        measured["strategy"] = strategy
        results.append(measured)
        print(f"{strategy}: {measured['frames_per_second']:.1f} frames/s, p50 {measured['latency_ms'].get('p50', 0):.0f} ms, "
              f"{measured['batching']['mean_requests_per_execute']:.2f} requests/execute, errors {len(measured['errors'])}",
              file=sys.stderr)
    report = {"benchmark": "batching_strategy", "machine": platform.node() and platform.processor() or "cpu",
              "settings": vars(args) | {"out": str(args.out)}, "results": results}
    write_result(args.out, report, "batching_strategy", args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
