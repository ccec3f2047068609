"""Step time of the eager, compiled and compiled + FP8 engine side by side, in one run.

For each variant a model is built (random weights), put behind a ``TorchRuntime`` that steps all
streams in one batch, and warmed up at every stream count measured (for compiled variants this
compiles each (streams, chunk) bucket; its seconds are recorded). One model is carried through
eager -> compiled -> compiled + fp8, so the last compiles only the graphs FP8 changes. Then, per stream count, fresh
stac streams (default config) take ``--warm-steps`` steps and ``--steps`` timed steps; the JSON has
milliseconds per step (median and mean), per frame, aggregate frames/s and the peak GPU memory.
The JSON is rewritten after every variant, so a run cut short keeps what it measured.

    python benchmarks/compile_ab.py --out compile_ab_h100.json            # vggt-1b 518x392 bf16, 1 and 8 streams
    python benchmarks/compile_ab.py --preset tiny --device cpu --hw 112x112 --dtype float32 \
        --streams 1,2 --variants eager,compiled --backend aot_eager --steps 2 --warm-steps 1 --out /tmp/ab.json
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

from stac_backend.cache import CacheConfig
from stac_backend.engine.torch_runtime import TorchRuntime
from stac_backend.model import build_model
from stac_backend.model.compiled import compile_static_parts
from stac_backend.model.fp8 import use_fp8_gemms
from stac_backend.results import write_result

VARIANTS = {"eager": (False, False), "compiled": (True, False), "compiled+fp8": (True, True), "fp8": (False, True)}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Models:
    """One model carried from variant to variant where it can be (random init of vggt-1b takes
    seconds): eager -> compiled -> compiled + fp8 only add switches; a variant that needs one off
    gets a fresh model."""

    def __init__(self, args):
        self.args, self.model, self.compiled, self.fp8 = args, None, False, False

    def get(self, compiled: bool, fp8: bool):
        a = self.args
        if self.model is None or (self.compiled and not compiled) or (self.fp8 and not fp8):
            self.model = None
            gc.collect()
            self.model = build_model(a.preset, device=a.device, dtype=getattr(torch, a.dtype), seed=0, compile=False, fp8=False)
            self.compiled = self.fp8 = False
        if fp8 and not self.fp8:
            use_fp8_gemms(self.model, mode=a.fp8_mode)
            self.fp8 = True
        if compiled and not self.compiled:
            compile_static_parts(self.model, mode=a.mode, backend=a.backend)
            self.compiled = True
        return self.model


def run_variant(name: str, args, hw: tuple[int, int], counts: list[int], models: Models) -> dict:
    compiled, fp8 = VARIANTS[name]
    model = models.get(compiled, fp8)
    cache = CacheConfig(policy="stac")
    runtime = TorchRuntime(model, cache, max_batch_streams=None)
    started = time.perf_counter()
    warm = runtime.warmup(hw, batch_sizes=counts)
    result = {"warmup_seconds": round(time.perf_counter() - started, 3),
              "compile_seconds": warm.get("compile_seconds"), "by_streams": {}}
    if compiled:
        # cumulative over the variants that shared this model: compiled + fp8 reuses the graphs of
        # the parts FP8 does not change (patch embed blocks, camera trunk, DPT heads)
        result["compile_stats"] = {k: v for k, v in model.compiled_parts.stats.to_dict().items() if k != "shapes"}
        result["compiled_graphs"] = len(model.compiled_parts.stats.shapes)
    for n in counts:
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        streams = [runtime.open_stream() for _ in range(n)]
        chunk = streams[0].chunk_size
        g = torch.Generator().manual_seed(n)
        frames = torch.randint(0, 256, (args.warm_steps + args.steps, n, chunk, 3, *hw), dtype=torch.uint8, generator=g)
        times = []
        for t in range(args.warm_steps + args.steps):
            images = [s.validate(frames[t, i]) for i, s in enumerate(streams)]
            sync(args.device)
            began = time.perf_counter()
            runtime.step(streams, images)
            sync(args.device)
            if t >= args.warm_steps:
                times.append(time.perf_counter() - began)
        median = statistics.median(times)
        result["by_streams"][str(n)] = {
            "ms_per_step_median": round(1000 * median, 3), "ms_per_step_mean": round(1000 * statistics.fmean(times), 3),
            "ms_per_frame": round(1000 * median / (n * chunk), 3), "frames_per_second": round(n * chunk / median, 2),
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None,
            "frames_before_timing": args.warm_steps * chunk}
        if compiled:
            result["by_streams"][str(n)]["eager_fallback_calls"] = model.compiled_parts.stats.eager_calls
        print(f"{name} {n} streams: {result['by_streams'][str(n)]}", file=sys.stderr)
        for s in streams:
            s.reset()
        del streams
    del runtime, model
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vggt-1b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--hw", default="392x518", help="HEIGHTxWIDTH of the frames")
    p.add_argument("--streams", default="1,8")
    p.add_argument("--variants", default="eager,compiled,compiled+fp8")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warm-steps", type=int, default=5)
    p.add_argument("--mode", default=None, help="torch.compile mode (default: STAC_COMPILE_MODE or 'default')")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--fp8-mode", default="scaled_mm", choices=["scaled_mm", "emulate"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.hw.split("x"))
    counts = [int(v) for v in args.streams.split(",")]
    report = {"preset": args.preset, "weights": "random", "torch": torch.__version__, "dtype": args.dtype, "image_hw": [h, w], "cache": "stac (default config)",
              "compile_mode": args.mode or "default", "backend": args.backend, "steps": args.steps,
              "warm_steps": args.warm_steps, "variants": {}}
    models = Models(args)
    for name in args.variants.split(","):
        try:
            report["variants"][name] = run_variant(name, args, (h, w), counts, models)
        except Exception as error:  # one variant failing (e.g. FP8 refused) must not lose the others
            report["variants"][name] = {"error": f"{type(error).__name__}: {error}"}
            print(f"{name} failed: {error}", file=sys.stderr)
        eager = report["variants"].get("eager", {}).get("by_streams", {})
        for other in report["variants"].values():
            for n, row in other.get("by_streams", {}).items():
                if n in eager:
                    row["speedup_vs_eager"] = round(eager[n]["ms_per_step_median"] / row["ms_per_step_median"], 3)
        write_result(args.out, report, "compile_ab", args.device)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
