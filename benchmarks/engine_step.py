"""Today's engine and the new one side by side, in one run on one GPU: aggregate frames/s and peak
memory at 1..48 streams, one stream's per-frame latency to frame 1000, a roofline table, and Triton
end to end (the fleet client, decoupled streaming gRPC) at 8 and 32 streams. Writes JSON
(``write_result``).

    python benchmarks/engine_step.py --out docs/benchmarks/engine_step_h100.json   # vggt-1b, bf16, 518x392, cuda
    python benchmarks/engine_step.py --preset tiny --device cpu --dtype float32 --height 28 --width 42 \\
        --streams 1,2 --warmup-frames 4 --timed-frames 4 --latency-frames 24 --triton-streams none \\
        --time-budget-s 120 --out /tmp/engine_step_cpu.json                        # a smoke test

Engines are named sets of switches (``VARIANTS`` below). Each variant runs in a fresh process (so
that a compiled or patched model cannot leak into the next), with its environment variables set
and its switches passed as keyword arguments to ``build_model``, ``TorchRuntime`` or
``CacheConfig`` where one of them takes that name; a switch none of them takes reaches the engine
through its environment variable only (the JSON records which way each went). ``baseline`` is the
engine as it was before these switches: every new feature off. ``--variants`` picks which run
(default ``baseline,new``; ``new_graphs`` adds CUDA graphs over the compiled parts).

Per variant (``--phase variant``): the model is built and ``TorchRuntime.warmup`` run (its time is
the compile time of a compiling engine); a large bf16 matmul is timed (the measured GEMM peak);
each stream-count row (``benchmarks/engine_streams.py``'s ``run_row``: ``--warmup-frames`` per
stream untimed so that caches fill and retrieval runs, then ``--timed-frames`` timed, peak GPU
memory, rows predicted not to fit skipped) and then one stream's latency: every
``--latency-sample-every``-th step timed with a device synchronisation, to ``--latency-frames``.
The roofline table divides the analytic FLOPs per frame (``benchmarks/step_flops.py``) by the
measured time per frame.

Triton (``--phase triton``, after the variants, in a process with ``--triton-variant``'s
environment): a local tritonserver (``start_local_server``) per stream count, decoupled, float16
outputs, the fleet client with two requests in flight per stream; its aggregate frames/s against
the same variant's engine row at that stream count. Without a tritonserver (the ``nvidia-pytriton``
wheel) or ``tritonclient`` the part is skipped and the reason recorded.

``--time-budget-s`` bounds the whole run: each variant gets a share of what is left (its process
stops starting rows when its share is spent and is killed a grace period after), Triton what the
variants left of its reserve. A run always writes its file, rewritten after every phase.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

BENCHMARKS = Path(__file__).resolve().parent
if str(BENCHMARKS) not in sys.path:  # the sibling benchmarks this one reuses
    sys.path.insert(0, str(BENCHMARKS))

import engine_streams  # noqa: E402
import step_flops  # noqa: E402

from stac_backend.cache import CacheConfig  # noqa: E402
from stac_backend.results import device_key, run_record, write_result  # noqa: E402

# The engines compared. "switches" go to build_model / TorchRuntime / CacheConfig where one takes
# the name, "env" into the variant's process (and its Triton server), "args" onto its command line.
VARIANTS: dict[str, dict] = {
    "baseline": {"switches": {"compile": False, "fp8": False},
                 "env": {"STAC_COMPILE": "0", "STAC_FP8": "0", "STAC_CUDA_GRAPHS": "0"},
                 "args": []},
    "new": {"switches": {"compile": True, "fp8": False},
            "env": {"STAC_COMPILE": "1", "STAC_FP8": "0"},
            "args": []},
    # the compiled parts captured in CUDA graphs (calls of at most 8 frames: one or two streams)
    "new_graphs": {"switches": {"compile": True, "cuda_graphs": True, "fp8": False},
                   "env": {"STAC_COMPILE": "1", "STAC_CUDA_GRAPHS": "1", "STAC_FP8": "0"},
                   "args": []},
}
# Dense bf16 tensor-core peaks of the data sheets (TFLOP/s, without sparsity), by device_key.
SPEC_BF16_TFLOPS = {"h100": 989.4, "h200": 989.4, "a100": 312.0}
GIB = 1 << 30


# ------------------------------------------------------------------------------------------ helpers
def gpu_name(device: str) -> str:
    """The device's name, asked of a child process: CUDA stays uninitialised in this one, which
    holds no GPU memory while the variants run."""
    if not device.startswith("cuda"):
        return "cpu"
    code = f"from stac_backend.results import device_name; print(device_name({device!r}))"
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              check=True).stdout.strip() or device
    except (OSError, subprocess.SubprocessError):
        return device


def spec_peak_tflops(name: str) -> Optional[float]:
    if "pcie" in name.lower() and device_key(name) == "h100":
        return 756.0
    return SPEC_BF16_TFLOPS.get(device_key(name))


def apply_switches(switches: dict, targets: dict) -> tuple[dict, dict]:
    """Split ``switches`` among ``targets`` ({"build_model": callable or dataclass, ...}) by the
    keyword names each accepts; returns (kwargs per target, how each switch was applied)."""
    kwargs: dict[str, dict] = {name: {} for name in targets}
    applied = {}
    for switch, value in switches.items():
        for name, target in targets.items():
            if switch in inspect.signature(target).parameters:
                kwargs[name][switch] = value
                applied[switch] = f"{name}({switch}={value!r})"
                break
        else:
            applied[switch] = "environment only"
    return kwargs, applied


def latency_summary(samples: list[dict], frames: int) -> dict:
    """Median ms per frame of the sampled steps ending in frames 100..``frames``, and the last
    sampled step's time over that of the step holding frame 10."""
    middle = [s["ms_per_frame"] for s in samples if 100 <= s["frame"] <= frames]
    first = next((s for s in samples if s["frame"] >= 10), None)
    last = samples[-1] if samples else None
    return {
        "median_ms_per_frame_100_on": statistics.median(middle) if middle else None,
        "first_sample": first, "last_sample": last,
        "last_over_frame10": last["ms_per_frame"] / first["ms_per_frame"] if first and last and last is not first else None,
    }


def gemm_peak_tflops(device, dtype, size: int, repeats: int = 50) -> dict:
    """A ``size``-cubed matmul timed over ``repeats`` runs after one untimed (TFLOP/s)."""
    import torch

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - started) / repeats
    return {"size": size, "dtype": str(dtype).removeprefix("torch."), "seconds": seconds, "tflops": 2 * size ** 3 / seconds / 1e12}


# ------------------------------------------------------------------------------------------ one variant
def warmup_spent(warm) -> str:
    """Why a share can be spent before its first row: the warm-up's compile counts against it, and
    with a cold Inductor cache (a fresh machine) it can take most of a short share."""
    if not isinstance(warm, dict) or warm.get("seconds") is None:
        return ""
    return (f" (the warm-up took {warm['seconds']:.0f} s; a cold compile cache costs most of it, and a rerun "
            "that finds the cache loads instead)")


def run_variant(args) -> int:
    """The ``--phase variant`` process: one engine's rows, latency and roofline into ``--part-out``."""
    import torch

    from stac_backend.engine.torch_runtime import TorchRuntime
    from stac_backend.model import build_model

    started = time.perf_counter()
    deadline = started + args.deadline_s
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    spec = json.loads(args.variant_spec)
    kwargs, applied = apply_switches(spec.get("switches", {}), {"build_model": build_model, "TorchRuntime": TorchRuntime,
                                                                "CacheConfig": CacheConfig})
    cache = CacheConfig.from_dict({"policy": "stac", "chunk": args.chunk, **json.loads(args.cache_overrides),
                                   **kwargs["CacheConfig"]})
    hw = (args.height, args.width)
    part = {"variant": args.variant, "switches": spec.get("switches", {}), "env": spec.get("env", {}),
            "args": spec.get("args", []), "switches_applied": applied, "cache_config": cache.to_dict(), "rows": []}

    def save(**changes) -> None:
        part.update(changes, seconds=round(time.perf_counter() - started, 1))
        Path(args.part_out).write_text(json.dumps(part, default=float))

    model = build_model(args.preset, device=device, dtype=engine_streams.DTYPES[args.dtype], **kwargs["build_model"])
    runtime = TorchRuntime(model, cache, **kwargs["TorchRuntime"])
    save(model_build_seconds=round(time.perf_counter() - started, 2))
    try:
        warm = runtime.warmup(hw, batch_sizes=(1, args.warmup_batch))
    except Exception as exc:  # noqa: BLE001 - recorded; the rows say what follows
        warm = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    engine_streams.release(device)
    save(warmup=warm, max_batch_streams=runtime.max_batch_streams)
    size = args.gemm_size or (8192 if device.type == "cuda" else 256)
    save(gemm_peak=gemm_peak_tflops(device, engine_streams.DTYPES[args.dtype], size))
    print(json.dumps({args.variant: {"warmup": warm, "gemm_peak": part["gemm_peak"]}}), flush=True)

    generator = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (64, 3, args.height, args.width), dtype=torch.uint8, generator=generator).to(device)
    for n in (int(x) for x in args.streams.split(",")):
        if time.perf_counter() > deadline - args.latency_reserve_s:
            row = {"streams": n, "status": f"skipped: the variant's time share of {args.deadline_s:.0f} s is spent"
                                            + warmup_spent(warm)}
        else:
            held = [r["cache_bytes_per_stream"] for r in part["rows"] if r.get("status") == "ok"]
            try:
                row = engine_streams.run_row(runtime, n, frames, args, device, max(held, default=None))
            except Exception as exc:  # noqa: BLE001 - e.g. an out-of-memory in the prediction's probe
                row = {"streams": n, "status": f"failed: {type(exc).__name__}: {str(exc)[:300]}"}
                engine_streams.release(device)
        row.pop("mode", None)
        part["rows"].append(row)
        print(json.dumps({args.variant: row}), flush=True)
        save()
    save(latency=run_latency(runtime, frames, args, device, deadline))
    return 0


def run_latency(runtime, frames, args, device, deadline: float) -> dict:
    """One stream to ``--latency-frames``; every ``--latency-sample-every``-th step (and the step
    holding frame 10, and the last) timed between two device synchronisations."""
    chunk = runtime.cache_config.chunk
    steps = max(1, -(-args.latency_frames // chunk))
    stream = runtime.open_stream()
    samples, status = [], "ok"
    span = len(frames) - chunk
    try:
        for step in range(steps):
            if time.perf_counter() > deadline:
                status = f"cut at frame {step * chunk}: the variant's time share is spent"
                break
            images = [stream.validate(frames[(step * chunk) % span:][:chunk])]
            timed = step % args.latency_sample_every == 0 or step * chunk <= 9 < (step + 1) * chunk or step == steps - 1
            if timed:
                engine_streams.synchronize(device)
                began = time.perf_counter()
            runtime.step([stream], images)
            if timed:
                engine_streams.synchronize(device)
                seconds = time.perf_counter() - began
                samples.append({"frame": (step + 1) * chunk, "ms_per_frame": 1e3 * seconds / chunk})
    except Exception as exc:  # noqa: BLE001 - recorded with what was measured
        status = f"failed at frame {step * chunk}: {type(exc).__name__}: {str(exc)[:300]}"
    cache_bytes = stream.memory_bytes()
    stream.reset()
    engine_streams.release(device)
    return {"status": status, "frames": samples[-1]["frame"] if samples else 0, "cache_bytes": cache_bytes,
            "sample_every_steps": args.latency_sample_every, "samples": samples,
            **latency_summary(samples, args.latency_frames)}


# ------------------------------------------------------------------------------------------ Triton
def triton_unavailable() -> Optional[str]:
    """Why a local tritonserver cannot run here (None: it can)."""
    import importlib.util

    try:
        from stac_backend.tools.triton_install import find_triton_install

        find_triton_install()
    except Exception as exc:  # noqa: BLE001 - the reason is the result
        return f"no tritonserver: {type(exc).__name__}: {str(exc)[:300]}"
    if importlib.util.find_spec("tritonclient") is None:
        return "no tritonclient (pip install 'tritonclient[grpc]')"
    return None


def run_triton(args) -> int:
    """The ``--phase triton`` process: per stream count, a server, a warm-up fleet and a timed one."""
    from stac_backend.loadgen.fleet import FleetConfig, make_frames, run_fleet, start_local_server

    deadline = time.perf_counter() + args.deadline_s
    rows = []
    for n in (int(x) for x in args.triton_streams.split(",")):
        if time.perf_counter() > deadline:
            rows.append({"streams": n, "status": "skipped: Triton's time share is spent"})
            continue
        row = {"streams": n, "max_batch_size": n}
        workdir = Path(tempfile.mkdtemp(prefix="stac-engine-step-"))
        server = None
        try:
            began = time.perf_counter()
            server = start_local_server(workdir, preset=args.preset, device=args.device, dtype=args.dtype,
                                        cache_config={"policy": "stac", "chunk": args.chunk, **json.loads(args.cache_overrides)},
                                        max_streams=n + 2, max_batch_size=n, strategy="oldest", max_queue_delay_us=100000,
                                        output_dtype="float16", decoupled=True,
                                        threads=2 if args.device == "cpu" else None)
            row["server_start_seconds"] = round(time.perf_counter() - began, 1)
            frames = [make_frames(k, args.triton_frames, args.height, args.width, "random") for k in range(n)]

            def fleet(first_id: int, count: int) -> dict:
                ids = list(range(first_id, first_id + n))
                config = FleetConfig(url=server.grpc_url, streams=n, stream_ids=ids, frames=count, chunk=args.chunk,
                                     height=args.height, width=args.width, fps=None, max_restarts=0, progress=False,
                                     request_timeout_s=600, connections=n, inflight=2, streaming=True)
                return run_fleet(config, frames={i: f[:count] for i, f in zip(ids, frames)}).aggregate()

            fleet(1000 * n, 2 * args.chunk)  # warm-up: every stream opened, its first steps run
            agg = fleet(1000 * n + 500, args.triton_frames)
            row.update(status="ok" if agg["errors"] == 0 else f"{agg['errors']} errors", frames=agg["frames"],
                       seconds=agg["seconds"], frames_per_second=agg["frames_per_second"], latency_ms=agg["latency_ms"])
        except Exception as exc:  # noqa: BLE001 - recorded; the next count still runs
            text = str(exc)  # a server's error ends with its log's last lines: keep the head and the tail
            row["status"] = f"failed: {type(exc).__name__}: {text if len(text) <= 3000 else text[:300] + ' ... ' + text[-2700:]}"
        finally:
            if server is not None:
                server.stop()
        rows.append(row)
        print(json.dumps({"triton": row}), flush=True)
        Path(args.part_out).write_text(json.dumps({"rows": rows}))
    Path(args.part_out).write_text(json.dumps({"rows": rows}))
    return 0


# ------------------------------------------------------------------------------------------ the run
def phase_command(args, phase: str, variant: str, spec: dict, deadline_s: float, part_out: Path) -> list[str]:
    common = ["--preset", args.preset, "--device", args.device, "--dtype", args.dtype, "--height", str(args.height),
              "--width", str(args.width), "--chunk", str(args.chunk), "--cache-overrides", args.cache_overrides,
              "--streams", args.streams, "--warmup-frames", str(args.warmup_frames), "--timed-frames", str(args.timed_frames),
              "--warmup-batch", str(args.warmup_batch), "--latency-frames", str(args.latency_frames),
              "--latency-sample-every", str(args.latency_sample_every), "--latency-reserve-s", str(args.latency_reserve_s),
              "--gemm-size", str(args.gemm_size), "--triton-streams", args.triton_streams,
              "--triton-frames", str(args.triton_frames)]
    if args.no_skip:
        common.append("--no-skip")
    return [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--variant", variant,
            "--variant-spec", json.dumps(spec), "--deadline-s", f"{deadline_s:.1f}", "--part-out", str(part_out),
            *common, *spec.get("args", [])]


def run_phase(args, phase: str, variant: str, spec: dict, share_s: float) -> dict:
    """A phase in a fresh process with ``spec``'s environment; what it wrote, or why it wrote nothing."""
    with tempfile.TemporaryDirectory(prefix="engine-step-") as tmp:
        part_out = Path(tmp) / "part.json"
        env = {**os.environ, **{k: str(v) for k, v in spec.get("env", {}).items()}}
        command = phase_command(args, phase, variant, spec, share_s, part_out)
        status = "ok"
        try:
            done = subprocess.run(command, env=env, timeout=share_s + args.grace_s, check=False)
            if done.returncode:
                status = f"exited with status {done.returncode}"
        except subprocess.TimeoutExpired:
            status = f"killed after {share_s + args.grace_s:.0f} s (share {share_s:.0f} s + grace {args.grace_s:.0f} s)"
        part = json.loads(part_out.read_text()) if part_out.exists() else {}
    part["process_status"] = status
    return part


def side_by_side(variants: dict, flops: dict, peaks: dict) -> list[dict]:
    table = []
    counts = dict.fromkeys(r["streams"] for v in variants.values() for r in v.get("rows", []))
    for n in counts:
        entry = {"streams": n, "frames_per_second": {}, "peak_gpu_gib": {}, "achieved_tflops": {}, "status": {}}
        for name, part in variants.items():
            row = next((r for r in part.get("rows", []) if r["streams"] == n), {})
            fps = row.get("aggregate_frames_per_second")
            entry["frames_per_second"][name] = fps
            entry["peak_gpu_gib"][name] = round(row["peak_gpu_bytes"] / GIB, 2) if row.get("peak_gpu_bytes") else None
            entry["achieved_tflops"][name] = step_flops.roofline(flops, fps, peaks)["achieved_tflops"]
            entry["status"][name] = row.get("status")
        names = list(variants)
        if len(names) >= 2 and all(entry["frames_per_second"].get(k) for k in names[:2]):
            entry[f"{names[1]}_over_{names[0]}"] = entry["frames_per_second"][names[1]] / entry["frames_per_second"][names[0]]
        table.append(entry)
    return table


def targets(report: dict, variant: str) -> dict:
    """The compiled step's targets on one H100 against ``variant``'s measurements: each value, its target
    and the margin (>= 1: met; measured over target where more is better, target over measured
    where less is better). None where the run did not measure it."""
    part = report["variants"].get(variant, {})
    rows = {r["streams"]: r for r in part.get("rows", [])}
    fps = [rows.get(n, {}).get("aggregate_frames_per_second") for n in (8, 16, 32)]
    row48 = rows.get(48, {})
    peak48 = row48.get("peak_reserved_bytes") if row48.get("status") == "ok" else None
    latency = part.get("latency", {})
    triton = [r.get("triton_over_engine") for r in report["triton"]["rows"] if r["streams"] in (8, 32)]

    def entry(value, target, more_is_better=True):
        margin = None if value is None else (value / target if more_is_better else (target / value if value else None))
        return {"measured": value, "target": target, "margin": margin}

    return {
        "variant": variant,
        "min_frames_per_second_8_to_32_streams": entry(min(fps) if all(fps) else None, 90.0),
        "peak_reserved_gib_48_streams": entry(None if peak48 is None else peak48 / GIB, 78.0, more_is_better=False),
        "one_stream_median_ms_per_frame_100_to_1000": entry(latency.get("median_ms_per_frame_100_on"), 15.0, more_is_better=False),
        "one_stream_frame1000_over_frame10": entry(latency.get("last_over_frame10"), 1.2, more_is_better=False),
        "triton_over_engine_min_8_and_32": entry(min(triton) if triton and all(triton) else None, 0.9),
    }


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vggt-1b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")
    p.add_argument("--height", type=int, default=392)
    p.add_argument("--width", type=int, default=518)
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--cache-overrides", default="{}", help="JSON of CacheConfig fields over the stac defaults")
    p.add_argument("--variants", default="baseline,new",
                   help=f"comma-separated names of VARIANTS ({', '.join(VARIANTS)})")
    p.add_argument("--streams", default="1,8,16,32,48")
    p.add_argument("--warmup-frames", type=int, default=24, help="frames per stream stepped before timing (caches filled)")
    p.add_argument("--timed-frames", type=int, default=8, help="frames per stream timed")
    p.add_argument("--warmup-batch", type=int, default=8, help="streams per step of the runtime's warm-up")
    p.add_argument("--no-skip", action="store_true", help="run rows predicted not to fit")
    p.add_argument("--latency-frames", type=int, default=1000, help="frames of the one-stream latency run")
    p.add_argument("--latency-sample-every", type=int, default=10, help="time every k-th step of it")
    p.add_argument("--latency-reserve-s", type=float, default=30.0, help="a variant's seconds kept for its latency run")
    p.add_argument("--gemm-size", type=int, default=0, help="the timed matmul's size (0: 8192 on CUDA, 256 on CPU)")
    p.add_argument("--triton-streams", default="8,32", help="stream counts served through Triton; 'none' skips it")
    p.add_argument("--triton-variant", default="", help="the variant Triton serves (default: the last)")
    p.add_argument("--triton-frames", type=int, default=40, help="frames per stream of the timed Triton fleet")
    p.add_argument("--triton-reserve-s", type=float, default=180.0, help="seconds of the budget kept for Triton")
    p.add_argument("--time-budget-s", type=float, default=500.0, help="the whole run's seconds")
    p.add_argument("--grace-s", type=float, default=30.0, help="a phase is killed this long after its share")
    p.add_argument("--benchmark", default="engine_step",
                   help="the name the result records (another name for a variant of the run, e.g. engine_step_store)")
    p.add_argument("--out", type=Path, default=None, help="default: docs/benchmarks/<benchmark>_<device>.json")
    p.add_argument("--phase", choices=("all", "variant", "triton"), default="all", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="", help=argparse.SUPPRESS)
    p.add_argument("--variant-spec", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--deadline-s", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--part-out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase == "variant":
        return run_variant(args)
    if args.phase == "triton":
        return run_triton(args)

    started = time.perf_counter()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; VARIANTS has {list(VARIANTS)}")
    triton_counts = [] if args.triton_streams.strip().lower() == "none" else [int(x) for x in args.triton_streams.split(",")]
    triton_variant = args.triton_variant or names[-1]
    if triton_variant not in names:
        p.error(f"--triton-variant {triton_variant!r} is not among the variants run ({', '.join(names)})")
    gpu = gpu_name(args.device)
    record = {**run_record(args.benchmark, "cpu"), "device": gpu}
    out = args.out or Path("docs/benchmarks") / f"{args.benchmark}_{device_key(gpu)}.json"
    from stac_backend.model import get_preset

    cache = CacheConfig.from_dict({"policy": "stac", "chunk": args.chunk, **json.loads(args.cache_overrides)})
    working_set = step_flops.working_set_frames(cache)
    flops = step_flops.frame_flops(get_preset(args.preset), args.height, args.width, working_set,
                                   camera_frames=len(cache.pinned_frames) + (cache.camera_window or 0) + args.chunk)
    skipped_triton = "not asked for (--triton-streams none)" if not triton_counts else triton_unavailable()
    report = {
        "run": record, "benchmark": args.benchmark, "preset": args.preset, "device": gpu, "dtype": args.dtype,
        "image_hw": [args.height, args.width], "chunk": args.chunk, "cache_config": cache.to_dict(),
        "variants_defined": {k: VARIANTS[k] for k in names}, "streams": [int(x) for x in args.streams.split(",")],
        "warmup_frames_per_stream": args.warmup_frames, "timed_frames_per_stream": args.timed_frames,
        "time_budget_s": args.time_budget_s,
        "flops_per_frame": {"working_set_frames": working_set, **flops},
        "peak_tflops": {"spec_bf16": spec_peak_tflops(gpu)},
        "variants": {}, "side_by_side": [], "flops_by_component": [], "roofline": {}, "latency": {},
        "triton": {"variant": triton_variant, "streams": triton_counts, "skipped": skipped_triton, "rows": []},
    }

    def write() -> None:
        variants = report["variants"]
        gemm = [v["gemm_peak"]["tflops"] for v in variants.values() if v.get("gemm_peak")]
        report["peak_tflops"]["measured_gemm"] = max(gemm, default=None)
        peaks = report["peak_tflops"]
        report["side_by_side"] = side_by_side(variants, flops, peaks)
        report["flops_by_component"] = step_flops.component_table(flops, peaks)
        report["roofline"] = {name: {
            **{f"streams_{r['streams']}": step_flops.roofline(flops, r.get("aggregate_frames_per_second"), peaks)
               for r in part.get("rows", [])},
            "one_stream_latency": step_flops.roofline(
                flops, 1e3 / part["latency"]["median_ms_per_frame_100_on"]
                if part.get("latency", {}).get("median_ms_per_frame_100_on") else None, peaks)}
            for name, part in variants.items()}
        report["latency"] = {name: {k: part.get("latency", {}).get(k) for k in
                                    ("status", "frames", "median_ms_per_frame_100_on", "last_over_frame10")}
                             for name, part in variants.items()}
        report["targets"] = targets(report, names[-1])
        report["seconds"] = round(time.perf_counter() - started, 1)
        write_result(out, report, args.benchmark, args.device)

    write()
    reserve = args.triton_reserve_s if triton_counts and not skipped_triton else 0.0
    for i, name in enumerate(names):
        left = args.time_budget_s - (time.perf_counter() - started) - reserve
        share = max(10.0, left / (len(names) - i))
        print(f"[engine_step] variant {name}: {share:.0f} s", file=sys.stderr, flush=True)
        report["variants"][name] = run_phase(args, "variant", name, VARIANTS[name], share)
        write()
    if triton_counts and not skipped_triton:
        share = max(30.0, args.time_budget_s - (time.perf_counter() - started) - args.grace_s / 2)
        print(f"[engine_step] Triton serving {triton_variant}: {share:.0f} s", file=sys.stderr, flush=True)
        part = run_phase(args, "triton", triton_variant, VARIANTS[triton_variant], share)
        engine_rows = {r["streams"]: r for r in report["variants"].get(triton_variant, {}).get("rows", [])}
        for row in part.get("rows", []):
            engine = engine_rows.get(row["streams"], {}).get("aggregate_frames_per_second")
            row["engine_frames_per_second"] = engine
            row["triton_over_engine"] = row["frames_per_second"] / engine if engine and row.get("frames_per_second") else None
        report["triton"].update(rows=part.get("rows", []), process_status=part["process_status"])
    write()
    print(json.dumps({"side_by_side": report["side_by_side"], "latency": report["latency"], "targets": report["targets"],
                      "triton": report["triton"]["rows"] or report["triton"]["skipped"]}, default=float), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
