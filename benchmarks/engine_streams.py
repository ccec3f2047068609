"""Concurrent streams per GPU with memory-bounded steps: aggregate frames/s and peak GPU memory at
N streams, with every step one batched forward for all N streams (``--modes none``: the engine
before micro-batches) and with steps split into micro-batches (``auto``, or a fixed number of
streams), side by side in one run on one device. Writes JSON (``write_result``).

    python benchmarks/engine_streams.py                      # vggt-1b, random weights, bf16, 518x392,
                                                             # stac default config, chunks of 4, cuda
    python benchmarks/engine_streams.py --preset tiny --device cpu --dtype float32 --height 56 \\
        --width 84 --streams 1,2 --modes none,1 --warmup-frames 4 --timed-frames 4 --warmup-batch 2 \
        --out /tmp/engine_streams_cpu.json                  # a smoke test

Each mode's runtime is warmed up first (``TorchRuntime.warmup``: kernels compiled, what a step adds
measured). Each row then opens N streams of uniform-noise frames, steps them ``--warmup-frames``
frames per stream untimed (caches filled, retrieval running) and ``--timed-frames`` frames timed,
and frees them. A row whose predicted peak (N times the cache a stream held in an earlier row, or
its bound, plus the measured step memory, extrapolated for one unsplit step) exceeds the free
memory is skipped with that reason, an out-of-memory error
ends its row only, and rows are skipped once ``--time-budget-s`` is spent: a run stays within its
machine's time limit and always writes a file.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from stac_backend.cache import CacheConfig
from stac_backend.engine.torch_runtime import TorchRuntime
from stac_backend.model import build_model
from stac_backend.results import device_key, device_name, write_result

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GIB = 1 << 30


def parse_mode(text: str):
    """'none' -> None (no split), 'auto', or a positive int."""
    text = text.strip().lower()
    if text == "none":
        return None
    if text == "auto":
        return "auto"
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"a mode is none, auto or a positive integer, got {text!r}")


def mode_label(mode) -> str:
    return "none" if mode is None else str(mode)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_bytes(device: torch.device) -> Optional[int]:
    """Memory a row may still use: free on the device plus what torch's allocator holds unused."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_row(runtime: TorchRuntime, n: int, frames: torch.Tensor, args, device: torch.device,
            cache_per_stream: Optional[int]) -> dict:
    """One row; ``cache_per_stream``: what a stream held after the same frames in an earlier row
    (predicts this row's caches better than their bound, which a stream reaches only much later)."""
    hw = (args.height, args.width)
    size = runtime.micro_batch_streams(hw)
    per_step = n if size is None else min(n, size)
    row = {"streams": n, "mode": mode_label(runtime.max_batch_streams), "micro_batch_streams": size,
           "micro_batches_per_step": 1 if size is None else math.ceil(n / size)}
    probe = runtime.open_stream()
    bound = probe.memory_bound(hw)
    resting = probe.resting_memory_bound(hw)  # what admission charges a stream when steps are split
    probe.reset()
    activation = runtime.activation_bytes(hw, per_step)
    free = free_bytes(device)
    row.update(cache_bound_per_stream=bound, cache_resting_bound_per_stream=resting, step_memory_bytes=activation,
               free_bytes_at_start=free)
    cache = cache_per_stream or bound
    if free is not None and cache is not None and activation is not None:
        row["predicted_peak_bytes"] = predicted = n * cache + activation
        if predicted > free and not args.no_skip:
            row["status"] = (f"skipped: predicted peak {predicted / GIB:.1f} GiB ({n} caches of {cache / GIB:.2f} GiB "
                             f"+ {activation / GIB:.1f} GiB for a step of {per_step} streams) exceeds the free {free / GIB:.1f} GiB")
            return row
    chunk = runtime.cache_config.chunk
    warm_steps = max(1, math.ceil(args.warmup_frames / chunk))
    timed_steps = max(1, math.ceil(args.timed_frames / chunk))
    streams = [runtime.open_stream() for _ in range(n)]
    times: list[float] = []
    status = "ok"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = 0
    try:
        for step in range(warm_steps + timed_steps):
            span = len(frames) - chunk
            images = [s.validate(frames[(step * chunk + 7 * i) % span:][:chunk]) for i, s in enumerate(streams)]
            synchronize(device)
            started = time.perf_counter()
            runtime.step(streams, images)
            synchronize(device)
            if step >= warm_steps:
                times.append(time.perf_counter() - started)
    except torch.OutOfMemoryError:
        status = f"out of memory at step {step} (frame {step * chunk} of each stream)"
    except Exception as exc:  # noqa: BLE001 - recorded, the sweep goes on
        status = f"failed at step {step}: {type(exc).__name__}: {str(exc)[:300]}"
    row["status"] = status
    row["cache_bytes_per_stream"] = max((s.memory_bytes() for s in streams), default=0)
    if device.type == "cuda":
        row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
        row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    for s in streams:
        s.reset()
    del streams
    release(device)
    if times and status == "ok":
        mean = sum(times) / len(times)
        row.update(timed_steps=len(times), step_seconds_mean=mean, step_seconds_min=min(times), step_seconds_max=max(times),
                   aggregate_frames_per_second=n * chunk / mean)
    return row


def side_by_side(rows: list[dict], modes: list[str]) -> list[dict]:
    table = []
    for n in dict.fromkeys(r["streams"] for r in rows):
        by_mode = {r["mode"]: r for r in rows if r["streams"] == n}
        table.append({
            "streams": n,
            "frames_per_second": {m: by_mode[m].get("aggregate_frames_per_second") for m in modes if m in by_mode},
            "peak_gpu_gib": {m: round(by_mode[m]["peak_gpu_bytes"] / GIB, 2) if by_mode[m].get("peak_gpu_bytes") else None
                             for m in modes if m in by_mode},
            "status": {m: by_mode[m]["status"] for m in modes if m in by_mode},
        })
    return table


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vggt-1b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--height", type=int, default=392)
    p.add_argument("--width", type=int, default=518)
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--cache-overrides", default="{}", help="JSON of CacheConfig fields over the stac defaults")
    p.add_argument("--streams", default="1,8,16,32,48")
    p.add_argument("--modes", default="none,auto", help="comma-separated: none (one step for all), auto, or a size")
    p.add_argument("--warmup-frames", type=int, default=40, help="frames per stream stepped before timing")
    p.add_argument("--timed-frames", type=int, default=12, help="frames per stream timed")
    p.add_argument("--warmup-batch", type=int, default=8, help="streams per step of the runtimes' warm-up (clipped to a split)")
    p.add_argument("--time-budget-s", type=float, default=330.0, help="no new row starts after this many seconds")
    p.add_argument("--no-skip", action="store_true", help="run rows predicted not to fit")
    p.add_argument("--out", type=Path, default=None, help="default: docs/benchmarks/engine_streams_<device>.json")
    args = p.parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    modes = [parse_mode(m) for m in args.modes.split(",")]
    counts = [int(x) for x in args.streams.split(",")]
    out = args.out or Path("docs/benchmarks") / f"engine_streams_{device_key(device_name(args.device))}.json"
    cache = CacheConfig.from_dict({"policy": "stac", "chunk": args.chunk, **json.loads(args.cache_overrides)})

    model = build_model(args.preset, device=device, dtype=DTYPES[args.dtype])
    model_seconds = time.perf_counter() - started
    generator = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (64, 3, args.height, args.width), dtype=torch.uint8, generator=generator).to(device)
    runtimes = {mode_label(m): TorchRuntime(model, cache, max_batch_streams=m) for m in modes}
    report = {
        "benchmark": "engine_streams", "preset": args.preset, "device": device_name(args.device), "dtype": args.dtype,
        "image_hw": [args.height, args.width], "chunk": args.chunk, "cache_config": cache.to_dict(),
        "warmup_frames_per_stream": args.warmup_frames, "timed_frames_per_stream": args.timed_frames,
        "torch": torch.__version__, "model_build_seconds": round(model_seconds, 2),
        "total_gpu_bytes": torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None,
        "model_bytes": sum(t.numel() * t.element_size() for t in model.parameters()),
        "modes": {}, "rows": [], "side_by_side": [],
    }

    def write() -> None:
        report["side_by_side"] = side_by_side(report["rows"], list(runtimes))
        bounds = [r["cache_bound_per_stream"] for r in report["rows"] if r.get("cache_bound_per_stream")]
        held = [r["cache_bytes_per_stream"] for r in report["rows"] if r.get("cache_bytes_per_stream")]
        report["cache_bound_per_stream"] = max(bounds, default=None)
        report["cache_bytes_per_stream"] = max(held, default=None)
        report["seconds"] = round(time.perf_counter() - started, 1)
        write_result(out, report, "engine_streams", args.device)

    for label, runtime in runtimes.items():
        try:
            warm = runtime.warmup((args.height, args.width), batch_sizes=(1, args.warmup_batch))
            report["modes"][label] = {"max_batch_streams": runtime.max_batch_streams, "warmup": warm,
                                      "micro_batch_streams": runtime.micro_batch_streams((args.height, args.width)),
                                      "step_memory_bytes": runtime.step_memory_bytes((args.height, args.width))}
        except Exception as exc:  # noqa: BLE001 - recorded; its rows will say so too
            report["modes"][label] = {"max_batch_streams": runtime.max_batch_streams,
                                      "warmup": f"failed: {type(exc).__name__}: {str(exc)[:300]}"}
        release(device)
        print(json.dumps({label: report["modes"][label]}), flush=True)
    write()
    for n in counts:
        for label, runtime in runtimes.items():
            if time.perf_counter() - started > args.time_budget_s:
                row = {"streams": n, "mode": label, "status": f"skipped: time budget of {args.time_budget_s:g} s spent"}
            else:
                held = [r["cache_bytes_per_stream"] for r in report["rows"] if r.get("status") == "ok"]
                try:
                    row = run_row(runtime, n, frames, args, device, max(held, default=None))
                except Exception as exc:  # noqa: BLE001 - e.g. an out-of-memory in the prediction's probe
                    row = {"streams": n, "mode": label, "status": f"failed: {type(exc).__name__}: {str(exc)[:300]}"}
                    release(device)
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            write()
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
