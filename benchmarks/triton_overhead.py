"""Triton end to end vs the in-process engine at the same load (the ">= 85% of the engine" target).

For each stream count N: the same N streams of F frames (chunk C, the same pixels) are run
1. through a local tritonserver (the ``stac`` Python-backend model, sequence batching ``oldest``)
   by the asyncio gRPC fleet client, unpaced (every stream sends its next chunk as soon as the
   previous result arrives), and
2. in this process by the engine: one batched ``push_many`` per step over the N streams,
from each stream's START to its END, after a warm-up run of the same shape in each. The ratio
(Triton frames/s) / (engine frames/s) is what serving costs: gRPC, Triton's scheduler, the Python
backend's shared-memory hops, and batches that form less fully than in a lockstep loop.

    python benchmarks/triton_overhead.py --device cuda --preset vggt-1b --dtype bfloat16 \\
        --size 392x518 --streams 1,8 --frames 32 --out /tmp/triton_overhead_h100.json
    python benchmarks/triton_overhead.py --out /tmp/triton_overhead_cpu.json   # CPU, tiny, quick
    python benchmarks/triton_overhead.py --output-dtype float16 --out /tmp/triton_overhead_cpu_fp16.json

--instances 2 runs two model instances (two stub processes sharing the GPU): while one sends its
outputs back, the other computes.

--inflight N lets each Triton-side stream keep N requests outstanding (the fleet client's pipelined
mode: one bidirectional gRPC stream per camera stream, the next chunks sent before the previous
result is back), so the GPU need not idle while results travel back and the next batch forms; a
comma list ("1,2") runs each value against every server. --output-device gpu makes the server hand
the float outputs to Triton as CUDA tensors; "cpu,gpu" starts one server each, so both are measured
on the same machine. Both show in the result labels (",inflight=2", ",output_device=gpu"). The
engine side stays lockstep (one push_many per step).

--decoupled yes serves the model with Triton's decoupled transaction policy: execute() returns once
a batch's outputs are on the host, and the model's sender thread answers while the next batch
computes; the fleet then streams every camera (one bidirectional gRPC stream each). "no,yes"
starts one server each (label ",decoupled").

--output-dtype float16 makes the server send the dense outputs (depth, points, confidences) as
float16 (half the bytes; recorded as "output_dtype" in the JSON); the engine side is unchanged.

--benchmark names the question a run answers (triton_overhead, triton_sweep, triton_queue_delay,
triton_decoupled, triton_output_device): docs/benchmarks/ keeps one file per name and device, and
benchmarks/report.py finds it by the name the file records. The commands of the kept files are in
docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stac_backend.cache import CacheConfig
from stac_backend.engine import Stream, push_many
from stac_backend.model import build_model
from stac_backend.results import write_result
from stac_backend.loadgen.fleet import FleetConfig, environment, make_frames, run_fleet, start_local_server

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_engine(model, frames: list[np.ndarray], cache: dict, chunk: int, device: str) -> float:
    """Seconds for all streams START..END, one batched step per chunk."""
    streams = [Stream(model, cache=CacheConfig.from_dict(cache)) for _ in frames]
    sync(device)
    t0 = time.perf_counter()
    for s in range(0, frames[0].shape[0], chunk):
        # validate = the server's per-request work too: checks, uint8 -> float on the model's device
        push_many(streams, [st.validate(f[s:s + chunk]) for st, f in zip(streams, frames)])
    sync(device)
    return time.perf_counter() - t0


def run_server(url: str, frames: list[np.ndarray], first_id: int, chunk: int, height: int, width: int,
               inflight: int = 1) -> dict:
    ids = list(range(first_id, first_id + len(frames)))
    config = FleetConfig(url=url, streams=len(frames), stream_ids=ids, frames=frames[0].shape[0], chunk=chunk,
                         height=height, width=width, fps=None, max_restarts=0, progress=False, request_timeout_s=600,
                         connections=len(frames), inflight=inflight)
    result = run_fleet(config, frames=dict(zip(ids, frames)))
    return result.aggregate()


def model_statistics(url: str, model: str = "stac") -> dict:
    """Triton's cumulative counters for the model: requests, executions, per-phase time, batch sizes."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    finally:
        client.close()
    phases = stats.get("inference_stats", {})
    return {
        "inference_count": int(stats.get("inference_count", 0)),
        "execution_count": int(stats.get("execution_count", 0)),
        "ns": {k: int(v.get("ns", 0)) for k, v in phases.items()},
        "batches": {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])},
    }


def statistics_delta(before: dict, after: dict) -> dict:
    """What one run added: mean requests per execute() and per-request time in each phase."""
    requests = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    per_request_ms = {k: (after["ns"][k] - before["ns"].get(k, 0)) / max(1, requests) / 1e6 for k in after["ns"]}
    batches = {b: n - before["batches"].get(b, 0) for b, n in after["batches"].items() if n - before["batches"].get(b, 0)}
    return {"requests": requests, "executions": executions, "mean_requests_per_execution": requests / max(1, executions),
            "per_request_ms": per_request_ms, "executions_by_batch_size": batches}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--size", default="56x84", help="HxW")
    p.add_argument("--output-dtype", choices=("float32", "float16"), default="float32",
                   help="the server's wire dtype for the dense outputs (ServeSettings.output_dtype)")
    p.add_argument("--policy", default="stac")
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--streams", default="1,4")
    p.add_argument("--frames", type=int, default=24, help="frames per stream")
    p.add_argument("--scene-frames", type=int, default=16, help="frames rendered per stream, then replayed")
    p.add_argument("--threads", type=int, default=1, help="CPU: torch threads (server stub and engine alike)")
    p.add_argument("--queue-delays-us", default="2000",
                   help="comma-separated max_queue_delay_microseconds of the sequence batcher; one server each")
    p.add_argument("--strategies", default="oldest", help="comma-separated sequence-batching strategies (oldest, direct)")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="the model's max_batch_size, also oldest's preferred batch (default: the largest stream count)")
    p.add_argument("--output-device", default="cpu",
                   help="comma-separated: cpu and/or gpu (the server hands the float outputs to Triton as CUDA "
                        "tensors, ServeSettings.output_device); one server each")
    p.add_argument("--decoupled", default="no",
                   help="comma-separated: no and/or yes (the model sends responses from its own thread while the next "
                        "batch computes, ServeSettings.decoupled; the fleet then streams); one server each")
    p.add_argument("--instances", type=int, default=1,
                   help="model instances in the server (instance_group count); the engine side is one process")
    p.add_argument("--inflight", default="1",
                   help="comma-separated requests each stream keeps outstanding through Triton (1: lockstep; "
                        ">1: pipelined); every value is run against every server")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--benchmark", default="triton_overhead",
                   help="the name recorded in the result, e.g. triton_sweep (report.py finds it by this)")
    args = p.parse_args()

    height, width = (int(x) for x in args.size.split("x"))
    counts = [int(n) for n in args.streams.split(",")]
    cache = {"policy": args.policy, "chunk": args.chunk}
    cpu = not args.device.startswith("cuda")
    torch.set_num_threads(args.threads)
    frames = [make_frames(k, args.frames, height, width, "synthetic", scene_frames=args.scene_frames, device=args.device)
              for k in range(max(counts))]

    # 1. Through Triton (servers first: each owns the GPU while it runs, then frees it on stop).
    max_batch_size = args.max_batch_size or max(counts)
    rows = [{"streams": n, "triton": {}} for n in counts]
    devices = args.output_device.split(",")
    if not set(devices) <= {"cpu", "gpu"}:
        raise SystemExit(f"--output-device takes cpu and/or gpu, got {args.output_device!r}")
    inflights = [int(x) for x in args.inflight.split(",")]
    modes = args.decoupled.split(",")
    if not set(modes) <= {"no", "yes"}:
        raise SystemExit(f"--decoupled takes no and/or yes, got {args.decoupled!r}")
    servers = [(strategy, int(d), device, mode == "yes") for strategy in args.strategies.split(",")
               for d in args.queue_delays_us.split(",") for device in devices for mode in modes]
    for strategy, delay_us, output_device, decoupled in servers:
        # the label names only what differs from the defaults, so older files read the same
        base = (f"{strategy},queue_delay_us={delay_us}" + (f",output_device={output_device}" if output_device != "cpu" else "")
                + (",decoupled" if decoupled else ""))
        workdir = Path(tempfile.mkdtemp(prefix="stac-overhead-"))
        # default max_batch_size = the largest load, so that oldest's preferred batch (= max_batch_size) is "every stream"
        server = start_local_server(workdir, preset=args.preset, device=args.device, dtype=args.dtype,
                                    output_dtype=args.output_dtype, output_device=output_device,
                                    cache_config=cache, max_streams=max(counts) + 2,
                                    max_batch_size=max_batch_size, strategy=strategy,
                                    max_queue_delay_us=delay_us, threads=args.threads if cpu else None,
                                    instance_count=args.instances, decoupled=decoupled)
        try:
            for row in rows:
                for j, inflight in enumerate(inflights):
                    n = row["streams"]
                    label = base + (f",inflight={inflight}" if inflight != 1 else "")
                    first_id = 10_000 * n + delay_us + 100 * j + 50 * decoupled
                    run_server(server.grpc_url, frames[:n], first_id, args.chunk, height, width, inflight)  # warm-up
                    before = model_statistics(server.grpc_url)
                    agg = run_server(server.grpc_url, frames[:n], first_id + 1000, args.chunk, height, width, inflight)
                    server_side = statistics_delta(before, model_statistics(server.grpc_url))
                    row["triton"][label] = {
                        "frames_per_second": agg["frames_per_second"], "errors": agg["errors"], "latency_ms": agg["latency_ms"],
                        "frames": agg["frames"], "server": server_side}
                    print(f"[triton] {n} streams, {label}: {agg['frames_per_second']:.2f} frames/s, "
                          f"errors {agg['errors']}, {server_side['mean_requests_per_execution']:.2f} requests/execute, "
                          f"per request ms {json.dumps({k: round(v, 1) for k, v in server_side['per_request_ms'].items()})}",
                          file=sys.stderr)
        finally:
            server.stop()

    # 2. In process, the same model build and frames.
    model = build_model(args.preset, device=args.device, dtype=DTYPES[args.dtype]).eval()
    with torch.inference_mode():
        for row in rows:
            n = row["streams"]
            run_engine(model, frames[:n], cache, args.chunk, args.device)  # warm-up
            seconds = run_engine(model, frames[:n], cache, args.chunk, args.device)
            fps = n * args.frames / seconds
            row["engine"] = {"frames_per_second": fps}
            row["triton_over_engine"] = {k: v["frames_per_second"] / fps for k, v in row["triton"].items()}
            print(f"[engine] {n} streams: {fps:.2f} frames/s -> Triton/engine {json.dumps(row['triton_over_engine'])}",
                  file=sys.stderr)

    data = {
        "kind": "triton_overhead",
        "preset": args.preset,
        "device": torch.cuda.get_device_name(0) if not cpu else "cpu",
        "dtype": args.dtype,
        "output_dtype": args.output_dtype,
        "output_devices": devices,
        "decoupled": modes,
        "frame_size": [height, width],
        "cache_config": cache,
        "max_batch_size": max_batch_size,
        "instances": args.instances,
        "inflight": inflights,
        "frames_per_stream": args.frames,
        "threads": args.threads if cpu else None,
        "environment": environment(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": rows,
    }
    write_result(args.out, data, args.benchmark, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
