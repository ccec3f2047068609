"""Where the Triton model's time goes outside Triton: the serving code's steps, in this process.

The ``stac`` Python-backend model does, per batch of requests: ``StreamSessions.handle`` (checks,
stream bookkeeping, one batched ``push_many``) and then, per request, ``outputs_on_host`` (wire
dtype cast on the GPU, one device-to-host copy into pinned memory). This script times those
steps on the same streams and frames as the bare engine step (``push_many``), so that the part
of Triton's ``compute_infer`` that is our own code can be told from Triton's (shared-memory
hops, gRPC). Each phase is timed with a device synchronisation at its end.

    python benchmarks/serving_path.py --preset vggt-1b --device cuda --dtype bfloat16 --streams 8 \\
        --output-dtype float16 --out docs/benchmarks/serving_path_h100.json
    python benchmarks/serving_path.py --out /tmp/serving_path_cpu.json      # tiny model on CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from stac_backend.cache import CacheConfig
from stac_backend.engine.torch_runtime import TorchRuntime
from stac_backend.engine import Stream, push_many
from stac_backend.model import build_model
from stac_backend.results import write_result
from stac_backend.loadgen.fleet import make_frames
from stac_backend.serving.sessions import FrameRequest, ServingLimits, StreamSessions

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> int:
    from stac_backend.serving.triton_model import outputs_on_host

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--size", default="56x84", help="HxW")
    p.add_argument("--output-dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--policy", default="stac")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    height, width = (int(x) for x in args.size.split("x"))
    chunk = 4
    total = (args.warmup + args.steps) * chunk
    frames = [make_frames(k, total, height, width, "synthetic", scene_frames=16, device=args.device)
              for k in range(args.streams)]
    model = build_model(args.preset, device=args.device, dtype=DTYPES[args.dtype]).eval()
    cache = CacheConfig.from_dict({"policy": args.policy, "chunk": chunk})
    dense = {"float32": torch.float32, "float16": torch.float16}[args.output_dtype]

    # 1. the bare engine step (as benchmarks/triton_overhead.py's engine side)
    streams = [Stream(model, cache=cache) for _ in frames]
    engine_ms = []
    for step in range(args.warmup + args.steps):
        s = step * chunk
        sync(args.device)
        t0 = time.perf_counter()
        push_many(streams, [st.validate(f[s:s + chunk]) for st, f in zip(streams, frames)])
        sync(args.device)
        if step >= args.warmup:
            engine_ms.append((time.perf_counter() - t0) * 1e3)
    del streams

    # 2. the model's path: sessions.handle, then outputs_on_host per request
    sessions = StreamSessions(TorchRuntime(model, cache), ServingLimits(max_streams=args.streams + 1))
    handle_ms, outputs_ms = [], []
    for step in range(args.warmup + args.steps):
        s = step * chunk
        requests = [FrameRequest(corr_id=k + 1, start=step == 0, end=False, frames=np.ascontiguousarray(f[s:s + chunk]))
                    for k, f in enumerate(frames)]
        sync(args.device)
        t0 = time.perf_counter()
        results = sessions.handle(requests)
        sync(args.device)
        t1 = time.perf_counter()
        for result in results:
            outputs_on_host(result.outputs, None, dense)
        t2 = time.perf_counter()
        if step >= args.warmup:
            handle_ms.append((t1 - t0) * 1e3)
            outputs_ms.append((t2 - t1) * 1e3)
    sessions.close_all()

    med = statistics.median
    data = {
        "benchmark": "serving_path",
        "preset": args.preset,
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "dtype": args.dtype,
        "output_dtype": args.output_dtype,
        "frame_size": [height, width],
        "streams": args.streams,
        "policy": args.policy,
        "steps": args.steps,
        "median_ms_per_step": {"engine_push_many": med(engine_ms), "sessions_handle": med(handle_ms),
                               "outputs_on_host_all_requests": med(outputs_ms)},
        "all_ms": {"engine_push_many": engine_ms, "sessions_handle": handle_ms, "outputs_on_host_all_requests": outputs_ms},
        "torch": torch.__version__,
    }
    write_result(args.out, data, "serving_path", args.device)
    print(json.dumps(data["median_ms_per_step"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
