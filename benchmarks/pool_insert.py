"""Replay one step's STAC pool work (filing evictions into the voxel pool) and time it.

Runs one ``stac`` stream of the chosen model for ``--warm-steps`` steps (default: the stress
geometry of the policies benchmark, every token pooled), then captures the next step's call to
``VoxelPool.insert`` - its arguments and the pool's state just before it - and replays that call
``--repeats`` times on copies of that state. Reports the median time of the insert and, with
``--profile``, a torch.profiler table of one replay. Because every replay starts from the same
state, two implementations of the pool can be compared on exactly the same work (``--impl``).

    python benchmarks/pool_insert.py --preset vggt-1b --device cuda --dtype bfloat16 \\
        --out docs/benchmarks/pool_insert_h100.json --profile docs/benchmarks/pool_insert_h100.txt
    python benchmarks/pool_insert.py --out /tmp/pool_insert_cpu.json     # tiny model on CPU

``--compare-with FILE`` times a second implementation of the insert kernel side by side on the
same captured call (replays alternate between the two): FILE is another version of
``stac_backend/kernels/pool_kernels.py`` (e.g. ``git show <commit>:stac_backend/kernels/pool_kernels.py``)
whose ``insert_rows`` replaces the current one for its replays. The result records both medians,
their ratio and whether the two pools came out identical.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from stac_backend.cache import CacheConfig
from stac_backend.cache.heavy_hitter import HeavyHitterCache
from stac_backend.cache.voxel_pool import VoxelPool
from stac_backend.engine import Stream
from stac_backend.model import build_model
from stac_backend.results import write_result, write_text_result

STRESS = {"conf_threshold": 0.0, "voxel_size": 0.002}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def capture_insert(stream: Stream, frames: torch.Tensor) -> tuple[VoxelPool, tuple, dict]:
    """Push ``frames``; return (pool state before the step's insert, its args, its kwargs)."""
    pool = stream.cache.pool
    captured = {}
    original = pool.insert

    def spy(*args, **kwargs):
        if not captured:
            state = copy.deepcopy(pool)
            # the copy would carry this spy as its own insert (an instance attribute), which calls
            # the original pool's insert: replays must run the copy's own method
            del state.insert
            captured["state"] = state
            captured["args"] = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
            captured["kwargs"] = dict(kwargs)
        return original(*args, **kwargs)

    pool.insert = spy
    try:
        stream.push(frames)
    finally:
        del pool.insert
    if not captured:
        raise RuntimeError("the step filed nothing into the pool (are tokens positioned? see --overrides)")
    return captured["state"], captured["args"], captured["kwargs"]


PHASES = ("_attach_positions", "_file_queued", "_retrieve", "on_evict")


def synced_timer(totals: dict, device: str):
    """``timed(name, fn)`` wraps fn so that each call adds its synchronised wall time and a count
    to ``totals[name] = [seconds, calls]``."""
    def timed(name, fn):
        def wrapper(*a, **k):
            sync(device)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync(device)
                totals[name][0] += time.perf_counter() - t0
                totals[name][1] += 1
        return wrapper
    return timed


def phase_times(stream: Stream, images: torch.Tensor, chunk: int, steps: int, device: str) -> dict:
    """Mean ms per step of the whole step and of StacCache's own phases (synchronised wall time)."""
    cache = stream.cache
    totals = {name: [0.0, 0] for name in PHASES + ("HeavyHitterCache.end_step", "step")}
    timed = synced_timer(totals, device)

    for name in PHASES:
        setattr(cache, name, timed(name, getattr(cache, name)))
    # heavy_hitter's pruning (it calls on_evict), reached through StacCache.end_step's super() call
    prune = HeavyHitterCache.end_step
    HeavyHitterCache.end_step = timed("HeavyHitterCache.end_step", prune)
    try:
        for step in range(steps):
            start = (step * chunk) % (images.shape[0] - chunk + 1)
            timed("step", stream.push)(images[start : start + chunk])
    finally:
        HeavyHitterCache.end_step = prune
        for name in PHASES:
            delattr(cache, name)
    return {name: seconds / steps * 1e3 for name, (seconds, _) in totals.items()}


# VoxelPool methods timed by --by-method. With the kernels (CUDA) an insert is _resolve_rows and
# one insert_rows launch; in eager mode _with_carried (the carried-over tokens join), the merge
# stage (_merge_and_gate with _nearest_pivot and _merge_into_pivots) and _fill_buffers, which
# holds _collapse.
METHODS = ("_resolve_rows", "_with_carried", "_merge_and_gate", "_nearest_pivot", "_merge_into_pivots",
           "_fill_buffers", "_collapse")


def method_times(state: VoxelPool, args: tuple, kwargs: dict, device: str) -> dict:
    """Synchronised ms of each pool method over one replay (syncs add a little per call)."""
    totals = {name: [0.0, 0] for name in METHODS + ("insert",)}
    pool = copy.deepcopy(state)
    timed = synced_timer(totals, device)

    for name in METHODS:
        setattr(pool, name, timed(name, getattr(pool, name)))
    timed("insert", pool.insert)(*args, **kwargs)
    return {name: {"ms": seconds * 1e3, "calls": calls} for name, (seconds, calls) in totals.items()}


def replay(state: VoxelPool, args: tuple, kwargs: dict, device: str) -> tuple[float, VoxelPool]:
    pool = copy.deepcopy(state)
    sync(device)
    t0 = time.perf_counter()
    pool.insert(*args, **kwargs)
    sync(device)
    return time.perf_counter() - t0, pool


def load_insert_rows(path: Path):
    """``insert_rows`` of another version of kernels/pool_kernels.py (a file of its own)."""
    spec = importlib.util.spec_from_file_location("pool_kernels_compared", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # (Triton reads the kernels' source from the file)
    return module.insert_rows


def replay_with(insert_rows, state: VoxelPool, args: tuple, kwargs: dict, device: str) -> tuple[float, VoxelPool]:
    """``replay`` with the pool's insert going through this ``insert_rows``."""
    from stac_backend.cache import voxel_pool

    current = voxel_pool.insert_rows
    voxel_pool.insert_rows = insert_rows
    try:
        return replay(state, args, kwargs, device)
    finally:
        voxel_pool.insert_rows = current


def pool_difference(a: VoxelPool, b: VoxelPool) -> dict:
    """Are two pools identical (statistics and every tensor), and the largest difference."""
    names = sorted(b._tensors)
    diff = max(((a._tensors[n].double() - b._tensors[n].double()).abs().max().item() if b._tensors[n].numel() else 0.0)
               for n in names)
    same = a.stats() == b.stats() and all(torch.equal(a._tensors[n], b._tensors[n]) for n in names)
    return {"identical": same, "same_stats": a.stats() == b.stats(), "max_abs_difference": diff}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--height", type=int, default=392)
    p.add_argument("--width", type=int, default=518)
    p.add_argument("--warm-steps", type=int, default=40)
    p.add_argument("--overrides", default=json.dumps(STRESS), help="JSON CacheConfig fields of the stac policy")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--phase-steps", type=int, default=0,
                   help="after the replays, time this many more steps by phase (synchronised; adds sync overhead)")
    p.add_argument("--by-method", action="store_true",
                   help="also time each pool method over one replay (synchronised; recorded as method_ms)")
    p.add_argument("--profile", type=Path, default=None, help="write a torch.profiler table of one replay to this file")
    p.add_argument("--kernel-config", default=None, metavar="TOKENS,WARPS",
                   help="insert_rows' tokens per loop iteration and warps per program for this run (kernel tuning)")
    p.add_argument("--ranking", choices=("rounds", "counts"), default=None,
                   help="insert_rows' ranking of buffer candidates for this run (default: by tokens per row)")
    p.add_argument("--compare-with", type=Path, default=None, metavar="FILE",
                   help="another version of kernels/pool_kernels.py whose insert_rows is timed side by side")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.kernel_config:
        from stac_backend.kernels import pool_kernels

        pool_kernels._SEGMENT_BLOCK, pool_kernels._INSERT_WARPS = (int(x) for x in args.kernel_config.split(","))
    if args.ranking:
        from stac_backend.kernels import pool_kernels

        pool_kernels._RANK_BY_ROUNDS = args.ranking == "rounds"

    torch.manual_seed(0)
    model = build_model(args.preset, device=args.device, dtype=DTYPES[args.dtype]).eval()
    config = CacheConfig.from_dict({"policy": "stac", **json.loads(args.overrides)})
    stream = Stream(model, cache=config)
    from stac_backend.data import make_sequence

    seq = make_sequence(num_frames=16, height=args.height, width=args.width, trajectory="loop", seed=0, device=args.device)
    images = (seq.images.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu()
    chunk = config.chunk
    with torch.inference_mode():
        for step in range(args.warm_steps):
            start = (step * chunk) % (images.shape[0] - chunk + 1)
            stream.push(images[start : start + chunk])
        state, call_args, call_kwargs = capture_insert(stream, images[:chunk])
        tokens = int(call_args[1].shape[0])
        other = load_insert_rows(args.compare_with) if args.compare_with is not None else None
        times, other_times, result, other_result = [], [], None, None
        for _ in range(args.repeats + 1):  # the first replay warms allocator and kernels
            seconds, result = replay(state, call_args, call_kwargs, args.device)
            times.append(seconds)
            if other is not None:
                seconds, other_result = replay_with(other, state, call_args, call_kwargs, args.device)
                other_times.append(seconds)
        times, other_times = times[1:], other_times[1:]
        compared = None
        if other is not None:
            compared = {
                "file": str(args.compare_with),
                "insert_ms": {"median": statistics.median(other_times) * 1e3, "all": [t * 1e3 for t in other_times]},
                "this_over_compared": statistics.median(times) / statistics.median(other_times),
                "result": pool_difference(result, other_result),
            }
        if args.profile is not None:
            pool = copy.deepcopy(state)
            sync(args.device)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
            with profile(activities=activities) as prof:
                pool.insert(*call_args, **call_kwargs)
                sync(args.device)
            sort = "cuda_time_total" if args.device.startswith("cuda") else "cpu_time_total"
            write_text_result(args.profile, f"one VoxelPool.insert of {tokens} tokens after {args.warm_steps} steps\n\n"
                              + prof.key_averages().table(sort_by=sort, row_limit=40), "pool_insert", args.device)
        by_method = method_times(state, call_args, call_kwargs, args.device) if args.by_method else None
        phases = phase_times(stream, images, chunk, args.phase_steps, args.device) if args.phase_steps else None
    data = {
        "benchmark": "pool_insert",
        "preset": args.preset,
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "dtype": args.dtype,
        "image_hw": [args.height, args.width],
        "cache_config": config.to_dict() if hasattr(config, "to_dict") else json.loads(args.overrides),
        "warm_steps": args.warm_steps,
        "kernel_config": args.kernel_config,
        "ranking": args.ranking,
        "tokens": tokens,
        "insert_ms": {"median": statistics.median(times) * 1e3, "all": [t * 1e3 for t in times]},
        "compared_with": compared,
        "pool_after": result.stats(),
        "phase_ms_per_step": phases,
        "method_ms": by_method,
        "torch": torch.__version__,
    }
    write_result(args.out, data, "pool_insert", args.device)
    print(json.dumps({k: data[k] for k in ("tokens", "insert_ms", "compared_with", "method_ms", "phase_ms_per_step")}),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
