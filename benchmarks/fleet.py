"""Capacity sweep: how many camera streams one server sustains, for each cache budget.

For every cache budget, start a local tritonserver with that cache config, then run paced fleets
(``stac_backend.loadgen.fleet``: every stream a camera at ``--fps``) with 1, 2, 3, ... streams.
A stream count is *sustained* when there are no errors and the p99 capture-to-result latency
(from the moment a chunk's last frame exists to its result) stays under ``--max-latency-ms``: a
server that cannot keep up lets that latency grow without bound over the run. The largest sustained count is the budget's capacity. Each budget's
per-stream cache bound (exact, from the cache code) and the streams' measured cache bytes are
recorded too. Writes JSON that ``benchmarks/fleet_capacity_table.py`` turns into the capacity
table of docs/deployment.md.

    python benchmarks/fleet.py --out docs/benchmarks/fleet_capacity_cpu.json                  # CPU, tiny, 56x84
    python benchmarks/fleet.py --device cuda --preset vggt-1b --dtype bfloat16 --size 392x518 \\
        --budgets stac:1.5GiB,stac --fps 10 --counts 1,2,3,4 --frames 48 \\
        --out docs/benchmarks/fleet_capacity_h100.json                                         # one H100
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from stac_backend.loadgen.fleet import (
    FleetConfig,
    environment,
    make_frames,
    parse_budget,
    run_fleet,
    start_local_server,
    stream_bound_bytes,
)
from stac_backend.results import write_result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="window,stac:4MiB,stac", help="comma-separated POLICY[:SIZE]")
    p.add_argument("--counts", default="1,2,3,4,5,6,8", help="stream counts to try, ascending")
    p.add_argument("--fps", type=float, default=10.0, help="camera rate per stream")
    p.add_argument("--frames", type=int, default=120, help="frames per stream (long enough for a lag to show)")
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--size", default="56x84", help="HxW")
    p.add_argument("--max-latency-ms", type=float, default=1000.0, help="p99 capture-to-result latency limit")
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1, help="CPU: torch threads of the server's stub")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/fleet_capacity_cpu.json"))
    p.add_argument("--benchmark", default="fleet_capacity", help="the name recorded in the result (report.py finds it by this)")
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    height, width = (int(x) for x in args.size.split("x"))
    counts = [int(c) for c in args.counts.split(",")]
    results = []
    for label, cache in (parse_budget(b) for b in args.budgets.split(",")):
        cache = {**cache, "chunk": args.chunk}
        bound = stream_bound_bytes(args.preset, height, width, cache, args.dtype)
        workdir = Path(tempfile.mkdtemp(prefix="stac-capacity-"))
        server = start_local_server(workdir, preset=args.preset, device=args.device, dtype=args.dtype, cache_config=cache,
                                    max_streams=max(counts) + 4, threads=args.threads if args.device == "cpu" else None)
        points, capacity = [], 0
        try:
            # Warm-up (kernel compilation, autotuning, allocator growth) so that no stream count pays it.
            warm = make_frames(0, 4 * args.chunk, height, width, "synthetic", scene_frames=4 * args.chunk, device=args.device)
            run_fleet(FleetConfig(url=server.grpc_url, streams=1, stream_ids=[1], frames=warm.shape[0], chunk=args.chunk,
                                  height=height, width=width, fps=None, max_restarts=0, progress=False, request_timeout_s=600),
                      frames={1: warm})
            frames = {}
            for n in counts:
                ids = list(range(1000 * n + 1, 1000 * n + n + 1))
                for k, sid in enumerate(ids):
                    frames.setdefault(sid, make_frames(k, args.frames, height, width, "synthetic", scene_frames=args.frames,
                                                       device=args.device))
                config = FleetConfig(url=server.grpc_url, streams=n, stream_ids=ids, frames=args.frames, chunk=args.chunk,
                                     height=height, width=width, fps=args.fps, max_restarts=0, progress=False,
                                     request_timeout_s=300)
                result = run_fleet(config, frames={sid: frames[sid] for sid in ids})
                agg = result.aggregate()
                per_stream_fps = [s.frames_done / max(1e-9, s.finished_s - s.started_s) for s in result.streams]
                p99 = agg["e2e_latency_ms"].get("p99", float("inf"))
                sustained = agg["errors"] == 0 and agg["frames"] == n * args.frames and p99 <= args.max_latency_ms
                points.append({"streams": n, "sustained": sustained, "frames_per_second": agg["frames_per_second"], "e2e_latency_ms": agg["e2e_latency_ms"],
                               "latency_ms": agg["latency_ms"], "errors": agg["errors"],
                               "min_stream_fps": round(min(per_stream_fps), 2),
                               "cache_bytes_per_stream_max": max(s.cache_bytes for s in result.streams)})
                print(f"[capacity] {label}: {n} streams at {args.fps:g} fps -> {agg['frames_per_second']:.1f} frames/s, "
                      f"p99 e2e {p99:.0f} ms: {'ok' if sustained else 'NOT sustained'}",
                      file=sys.stderr)
                if not sustained:
                    break
                capacity = n
        finally:
            server.stop()
        results.append({"budget": label, "cache_config": cache, "stream_bound_bytes": bound,
                        "streams_sustained": capacity, "points": points})
    data = {
        "kind": "fleet_capacity",
        "device": args.device,
        "preset": args.preset,
        "dtype": args.dtype,
        "frame_size": [height, width],
        "fps_per_stream": args.fps,
        "frames_per_stream": args.frames,
        "chunk": args.chunk,
        "criteria": {"max_p99_e2e_latency_ms": args.max_latency_ms, "errors": 0},
        "server_threads": args.threads if args.device == "cpu" else None,
        "environment": environment(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "budgets": results,
    }
    write_result(args.out, data, args.benchmark, args.device)
    for r in results:
        print(f"{r['budget']:>12}: bound {r['stream_bound_bytes'] / 2**20 if r['stream_bound_bytes'] else float('nan'):8.2f} MiB/stream, "
              f"{r['streams_sustained']} streams sustained at {args.fps:g} fps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
