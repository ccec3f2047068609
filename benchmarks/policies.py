"""Stream one long sequence through every cache policy; write per-step memory, time and the
deviation of each policy's outputs from the full cache, as JSON.

    python benchmarks/policies.py --preset tiny --frames 300 --out /tmp/policies_tiny_cpu.json
    python benchmarks/policies.py --preset vggt-1b --device cuda --dtype bfloat16 --frames 1000 \
        --height 392 --width 518 --out docs/benchmarks/policies_h100.json
    # the voxel-pool stress case on a CPU: 24 global layers of tiny width, every point in a few voxels
    python benchmarks/policies.py --preset tiny --model-overrides '{"depth": 24}' --policies heavy_hitter,stac \
        --frames 300 --height 112 --width 168 --stac-overrides '{"conf_threshold": 0.0, "voxel_size": 0.05}' \
        --out /tmp/policies_pool_stress.json

Frames come from the synthetic scene generator (a looped trajectory) when available, else random.
Weights are random unless --checkpoint is given. A policy that runs out of memory is recorded with
the frame it reached. Deviation is the mean absolute difference from ``full`` of depth, world points
and pose encoding, on the frames both ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from stac_backend.cache import POLICIES, CacheConfig
from stac_backend.engine import Stream
from stac_backend.model import build_model, config_with, get_preset
from stac_backend.results import write_result

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPARED = ("depth", "world_points", "pose_enc")


def make_frames(count: int, height: int, width: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """uint8 frames [count, 3, H, W] on the CPU (rendered on ``device``)."""
    try:
        from stac_backend.data import make_sequence

        images = make_sequence(num_frames=count, height=height, width=width, trajectory="loop", seed=seed, device=device).images
    except ImportError:
        images = torch.rand(count, 3, height, width, generator=torch.Generator().manual_seed(seed))
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def policy_config(name: str, args: argparse.Namespace) -> CacheConfig:
    if name == "window":
        return CacheConfig(policy="window", window=args.baseline_window, chunk=args.chunk)
    overrides = {}
    if name == "stac" and args.stac_overrides:
        overrides = json.loads(args.stac_overrides)
    elif name == "full" and args.full_overrides:
        overrides = json.loads(args.full_overrides)
    return CacheConfig(policy=name, chunk=args.chunk, **overrides)


def latency_summary(steps: list[dict]) -> dict:
    """Median ms/frame over the first, middle and last quarter of the steps (flat = similar)."""
    if not steps:
        return {}
    q = max(1, len(steps) // 4)
    parts = {"first": steps[:q], "middle": steps[len(steps) // 2 - q // 2 : len(steps) // 2 - q // 2 + q], "last": steps[-q:]}
    return {f"{name}_quarter_ms_per_frame": 1000 * statistics.median(s["seconds_per_frame"] for s in part)
            for name, part in parts.items()}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def warm_up(model, frames, name, args) -> None:
    """Run a throwaway stream of the policy first, so one-time costs (kernel compilation, cuDNN and
    allocator warm-up) do not land in the measured frames."""
    stream = Stream(model, cache=policy_config(name, args))
    for start in range(0, min(args.warmup_frames, len(frames)), args.chunk):
        stream.push(frames[start : start + args.chunk].to(args.device))
    sync(args.device)
    stream.reset()


def run_policy(model, frames, name, args, reference):
    if args.warmup_frames:
        warm_up(model, frames, name, args)
    stream = Stream(model, cache=policy_config(name, args))
    steps, deviations = [], {k: [] for k in COMPARED}
    status = "ok"
    memory_at_oom = None
    keep = {} if name == "full" else None
    began = time.perf_counter()
    limit = args.full_max_seconds if name == "full" and args.full_max_seconds else args.max_seconds
    for start in range(0, len(frames), args.chunk):
        if limit is not None and time.perf_counter() - began > limit:
            status = f"stopped at frame {start}: time limit {limit} s"
            break
        chunk = frames[start : start + args.chunk]
        sync(args.device)
        t0 = time.perf_counter()
        try:
            out = stream.push(chunk.to(args.device))
            sync(args.device)
        except torch.OutOfMemoryError:
            status = f"out of memory at frame {start}"
            # allocated vs reserved tells live tensors from the allocator's fragmentation
            memory_at_oom = {"allocated_bytes": torch.cuda.memory_allocated(), "reserved_bytes": torch.cuda.memory_reserved(),
                             "max_allocated_bytes": torch.cuda.max_memory_allocated(),
                             "cache_bytes": stream.memory_bytes()} if args.device.startswith("cuda") else None
            stream.reset()
            break
        seconds = time.perf_counter() - t0
        step = {"frame": start + len(chunk), "seconds": seconds, "seconds_per_frame": seconds / len(chunk),
                "cache_bytes": stream.memory_bytes()}
        if args.device.startswith("cuda"):  # live tensors vs what the allocator holds (fragmentation)
            step.update(allocated_bytes=torch.cuda.memory_allocated(), reserved_bytes=torch.cuda.memory_reserved())
        steps.append(step)
        for i, index in enumerate(range(start, start + len(chunk))):
            if index % args.compare_every:
                continue
            values = {k: out[k][i].float().cpu() for k in COMPARED}
            if keep is not None:
                keep[index] = {k: v.half() for k, v in values.items()}
            elif reference is not None and index in reference:
                for k in COMPARED:
                    deviations[k].append((values[k] - reference[index][k].float()).abs().mean().item())
        if not args.quiet and len(steps) % 25 == 0:
            print(f"  {name}: frame {start + len(chunk)}, {seconds / len(chunk) * 1000:.1f} ms/frame, "
                  f"cache {stream.memory_bytes() / 2**20:.1f} MiB", file=sys.stderr)
    result = {
        "policy": name,
        "config": policy_config(name, args).to_dict(),
        "status": status,
        "memory_at_oom": memory_at_oom,
        "frames": steps[-1]["frame"] if steps else 0,
        "steps": steps,
        "memory_bound_bytes": stream.memory_bound(),
        "latency": latency_summary(steps),
        "stats": {k: v for k, v in stream.cache.stats().items() if isinstance(v, (int, float))},
        "mean_abs_deviation_from_full": {k: (sum(v) / len(v) if v else None) for k, v in deviations.items()},
    }
    del stream
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result, keep


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--model-overrides", default="", help='JSON ModelConfig fields on top of --preset, e.g. {"depth": 24}')
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--height", type=int, default=56)
    p.add_argument("--width", type=int, default=84)
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--baseline-window", type=int, default=8)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--warmup-frames", type=int, default=24,
                   help="frames of a throwaway stream run before each policy's measured one (0: none)")
    p.add_argument("--compare-every", type=int, default=1, help="compare every k-th frame with full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (tiny models run best on 1)")
    p.add_argument("--stac-overrides", default="", help='JSON CacheConfig fields for stac, e.g. {"conf_threshold": 0}')
    p.add_argument("--full-overrides", default="", help='JSON CacheConfig fields for full, e.g. {"full_growth": 1.25}')
    p.add_argument("--max-seconds", type=float, default=None, help="stop a policy after this long (recorded)")
    p.add_argument("--full-max-seconds", type=float, default=None, help="the same for the full cache")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--benchmark", default="policies",
                   help="the name recorded in the result, e.g. full_growth_ab for an A/B run (report.py finds it by this)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    preset = args.preset
    if args.model_overrides:
        preset = config_with(get_preset(args.preset), **json.loads(args.model_overrides))
    model = build_model(preset if args.checkpoint is None else None, checkpoint=args.checkpoint,
                        device=args.device, dtype=DTYPES[args.dtype], seed=args.seed)
    frames = make_frames(args.frames, args.height, args.width, args.seed, args.device)
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    if "full" in names:  # the reference runs first
        names.remove("full")
        names.insert(0, "full")
    results, reference = [], None

    def write_report() -> None:
        """Rewritten after every policy, so a run cut short (a job time limit) keeps what it measured."""
        report = {
            "benchmark": "policies",
            "preset": args.preset,
            "model_overrides": json.loads(args.model_overrides) if args.model_overrides else {},
            "checkpoint": str(args.checkpoint) if args.checkpoint else None,
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
            "dtype": args.dtype,
            "frames": args.frames,
            "warmup_frames": args.warmup_frames,
            "image_hw": [args.height, args.width],
            "chunk": args.chunk,
            "torch": torch.__version__,
            "allocator_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
            # captures / replays / eager calls of model/cuda_graphs.py (None: off or not CUDA)
            "cuda_graphs": model.cuda_graph_stats.to_dict() if hasattr(model, "cuda_graph_stats") else None,
            "results": results,
        }
        write_result(args.out, report, args.benchmark, args.device)
        print(f"wrote {args.out} ({len(results)} of {len(names)} policies)", file=sys.stderr)

    for name in names:
        print(f"policy {name} ...", file=sys.stderr)
        result, kept = run_policy(model, frames, name, args, reference)
        if name == "full":
            reference = kept
        results.append(result)
        last = result["steps"][-1] if result["steps"] else {}
        lat = result["latency"]
        print(f"policy {name}: {result['status']}, {result['frames']} frames, last {last.get('seconds_per_frame', 0) * 1000:.1f} ms/frame, "
              f"cache {last.get('cache_bytes', 0) / 2**20:.2f} MiB; median ms/frame first/middle/last quarter "
              + "/".join(f"{lat.get(f'{q}_quarter_ms_per_frame', 0):.1f}" for q in ("first", "middle", "last")), file=sys.stderr)
        write_report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
