"""Profile batched engine steps (torch.profiler): where the time of a multi-stream step goes.

    python benchmarks/profile_step.py --preset vggt-1b --device cuda --dtype bfloat16 --streams 8 --out docs/benchmarks/profile_step_h100.txt
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from stac_backend.cache import CacheConfig
from stac_backend.engine import Stream, push_many
from stac_backend.model import build_model
from stac_backend.results import write_text_result


def sync_trace(step) -> str:
    """Run ``step`` with CUDA sync debugging on; count synchronisations per (file:line) of our code."""
    counts: Counter = Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        counts[f"{Path(w.filename).name}:{w.lineno}"] += 1
    lines = [f"{n:6d}  {where}" for where, n in counts.most_common()]
    return f"{sum(counts.values())} in total\n" + "\n".join(lines) + "\n"


def gpu_idle(prof, wall_s: float, min_gap_us: float = 5.0, top: int = 12) -> str:
    """Where the GPU waits for the host in one profiled step: kernel time against the step's wall
    time, and the idle gaps between kernels grouped by what the host was running when it launched
    the kernel that ended the gap (the innermost ``cache.*`` range, else the outermost operator)."""
    from torch.autograd import DeviceType

    device = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    kernels = sorted((e for e in device if not e.is_user_annotation), key=lambda e: e.time_range.start)
    if not kernels:
        return "no GPU activity recorded\n"
    launches = {}
    for e in prof.events():
        link = getattr(e, "linked_correlation_id", 0)  # not in every torch version
        if e.device_type == DeviceType.CPU and link:
            launches[link] = e

    def launched_from(kernel) -> str:
        cpu = launches.get(getattr(kernel, "linked_correlation_id", 0))
        outer = None
        while cpu is not None:
            if cpu.name.startswith("cache."):
                return cpu.name
            outer = cpu
            cpu = cpu.cpu_parent
        return outer.name[:60] if outer is not None else "(launch not linked)"

    busy, end, idle_total = 0.0, kernels[0].time_range.start, 0.0
    groups: Counter = Counter()
    counts: Counter = Counter()
    previous = None
    for k in kernels:
        start, stop = k.time_range.start, k.time_range.end
        if start > end:
            gap = start - end
            idle_total += gap
            if gap >= min_gap_us:
                where = launched_from(k)
                if where == "(launch not linked)" and previous is not None:
                    where = f"(after kernel {previous.name[:50]})"
                groups[where] += gap
                counts[where] += 1
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
        previous = k
    span = end - kernels[0].time_range.start
    lines = [f"GPU busy {busy / 1e3:.2f} ms of a {span / 1e3:.2f} ms kernel span "
             f"({wall_s * 1e3:.2f} ms step wall time unprofiled); idle between kernels {idle_total / 1e3:.2f} ms,",
             f"gaps of >= {min_gap_us:g} us by what launched the kernel after the gap:"]
    for where, gap in groups.most_common(top):
        lines.append(f"  {gap / 1e3:8.2f} ms in {counts[where]:5d} gaps  {where}")
    return "\n".join(lines) + "\n"


PHASES = ("begin_step", "prepare", "absorb", "end_step", "on_evict", "_attach_positions", "_file_queued", "_retrieve")


def label_cache_phases(streams) -> None:
    """Wrap the cache policies' phases in profiler ranges ("cache.<phase>") so their GPU time shows."""
    from torch.profiler import record_function

    def labelled(name, fn):
        def wrapper(*a, **k):
            with record_function(f"cache.{name}"):
                return fn(*a, **k)
        return wrapper

    for stream in streams:
        cache = stream.cache
        for name in PHASES:
            if hasattr(cache, name):
                setattr(cache, name, labelled(name, getattr(cache, name)))
        pool = getattr(cache, "_pool", None)
        if pool is not None:
            pool.insert = labelled("pool.insert", pool.insert)
            pool.retrieve_layers = labelled("pool.retrieve_layers", pool.retrieve_layers)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--height", type=int, default=392)
    p.add_argument("--width", type=int, default=518)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--policy", default="stac")
    p.add_argument("--cache-overrides", default="{}", help='JSON CacheConfig fields, e.g. {"conf_threshold": 0.0}')
    p.add_argument("--warm-steps", type=int, default=6, help="steps before measuring (cache filled, kernels compiled)")
    p.add_argument("--sync-trace", action="store_true",
                   help="also count the host synchronisations of one step by the Python line that caused them")
    p.add_argument("--phases", action="store_true",
                   help="also a table of the cache policy's phases (profiler ranges cache.*) with their GPU time")
    p.add_argument("--by-line", type=int, default=0, metavar="N",
                   help="also a table of GPU time grouped by the N innermost Python frames that launched it")
    p.add_argument("--idle", action="store_true",
                   help="also the GPU's idle time in the profiled step, by what the host was launching")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = build_model(args.preset, device=args.device, dtype=dtype)
    streams = [Stream(model, cache=CacheConfig.from_dict({"policy": args.policy, **json.loads(args.cache_overrides)})) for _ in range(args.streams)]
    frames = (torch.rand(4, 3, args.height, args.width) * 255).to(torch.uint8)

    def step():
        push_many(streams, [s.validate(frames) for s in streams])

    for _ in range(args.warm_steps):
        step()
    if args.phases:
        label_cache_phases(streams)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=args.by_line > 0) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    by_module = prof.key_averages(group_by_stack_n=0).table(sort_by="cpu_time_total", row_limit=15)
    text = (f"policy {args.policy}, step wall time {wall:.3f} s for {args.streams} streams x 4 frames after "
            f"{args.warm_steps} steps\n\n{table}\n\nCPU-heavy ops:\n{by_module}\n")
    if args.phases:
        # Each range appears twice: as a host event (host time, GPU time of the kernels it launched)
        # and as a GPU-timeline annotation; the host events are the ones that add up.
        rows = [e for e in prof.key_averages() if e.key.startswith("cache.") and str(e.device_type).endswith("CPU")]
        text += "\nCache phases per step: kernels = GPU time of the kernels launched inside the range, "
        text += "host = host time inside it (ranges nest: end_step holds _file_queued, which holds pool.insert)\n"
        for e in sorted(rows, key=lambda e: -e.cpu_time_total):
            text += (f"  {e.key:28s} calls {e.count:4d}  kernels {e.device_time_total / 1e3:8.2f} ms  "
                     f"host {e.cpu_time_total / 1e3:8.2f} ms\n")
    if args.idle:
        text += "\nGPU idle time in the profiled step:\n" + gpu_idle(prof, wall)
    if args.by_line:
        lines = prof.key_averages(group_by_stack_n=args.by_line).table(
            sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=50, max_src_column_width=90)
        text += f"\nGPU time by launching Python line ({args.by_line} innermost frames):\n{lines}\n"
    if args.sync_trace:
        text += "\nHost synchronisations in one step, by the line that caused them:\n" + sync_trace(step)
    write_text_result(args.out, text, "profile_step", args.device)
    print(text[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
