"""Aggregate frames/s and per-step latency vs the number of concurrent streams, in the engine
(no server): every step pushes one chunk for each stream, as one batched forward (push_many) or
stream by stream. Writes JSON.

    python benchmarks/engine_concurrency.py --preset vggt-1b --device cuda --dtype bfloat16 \
        --streams 1,2,4,8,16,32 --out docs/benchmarks/engine_concurrency_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from stac_backend.cache import CacheConfig
from stac_backend.engine import Stream, push_many
from stac_backend.model import build_model
from stac_backend.results import write_result

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def measure(model, frames, n_streams, args, batched: bool):
    streams = [Stream(model, cache=CacheConfig(policy=args.policy, chunk=args.chunk)) for _ in range(n_streams)]
    step_times = []
    status = "ok"
    try:
        for step in range(args.warmup + args.steps):
            start = (step * args.chunk) % (len(frames) - args.chunk)
            chunks = [s.validate(frames[(start + 7 * i) % (len(frames) - args.chunk):][: args.chunk]) for i, s in enumerate(streams)]
            sync(args.device)
            t0 = time.perf_counter()
            if batched:
                push_many(streams, chunks)
            else:
                for s, c in zip(streams, chunks):
                    push_many([s], [c])
            sync(args.device)
            if step >= args.warmup:
                step_times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        status = "out of memory"
    memory = [s.memory_bytes() for s in streams]
    peak = torch.cuda.max_memory_allocated() if str(args.device).startswith("cuda") else None
    for s in streams:
        s.reset()
    del streams
    if str(args.device).startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if not step_times:
        return {"streams": n_streams, "batched": batched, "status": status}
    mean = sum(step_times) / len(step_times)
    return {"streams": n_streams, "batched": batched, "status": status, "step_seconds_mean": mean,
            "aggregate_frames_per_second": n_streams * args.chunk / mean, "per_stream_frames_per_second": args.chunk / mean,
            "cache_bytes_per_stream": max(memory) if memory else 0, "peak_gpu_bytes": peak}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--height", type=int, default=56)
    p.add_argument("--width", type=int, default=84)
    p.add_argument("--policy", default="stac")
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--streams", default="1,2,4,8")
    p.add_argument("--warmup", type=int, default=6, help="steps before timing (fills the caches past retrieval start)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--sequential", action="store_true", help="also time stream-by-stream steps")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    model = build_model(args.preset, device=args.device, dtype=DTYPES[args.dtype])
    frames = (torch.rand(64, 3, args.height, args.width) * 255).to(torch.uint8)
    rows = []

    def write():
        report = {"benchmark": "engine_concurrency", "preset": args.preset,
                  "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                  "dtype": args.dtype, "image_hw": [args.height, args.width], "policy": args.policy, "chunk": args.chunk,
                  "torch": torch.__version__,
                  "cuda_graphs": model.cuda_graph_stats.to_dict() if hasattr(model, "cuda_graph_stats") else None,
                  "rows": rows}
        write_result(args.out, report, "engine_concurrency", args.device)

    for n in [int(x) for x in args.streams.split(",")]:
        for batched in ([True, False] if args.sequential else [True]):
            try:
                row = measure(model, frames, n, args, batched)
            except Exception as exc:  # noqa: BLE001 - recorded, the sweep goes on
                row = {"streams": n, "batched": batched, "status": f"failed: {type(exc).__name__}: {str(exc)[:300]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
            write()
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
