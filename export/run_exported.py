"""Run an exported step graph on ONNX Runtime against the torch engine, one after the other (so a
vggt-1b comparison fits in 24 GB: ONNX Runtime first, its outputs kept, then torch).

    python export/run_exported.py out/vggt1b/stac_step.onnx --random-weights --frames 2 --chunk 2 --threads 2
    python export/run_exported.py out/stac_tiny.onnx --checkpoint tiny.safetensors --frames 20

The weights must be the ones the graph was exported with (--random-weights = seed 0, as the
exporter's --random-weights). Prints JSON: per-step seconds for both and max |difference| per output.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from pathlib import Path



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graph", type=Path)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=None, help="frames per step (default: the graph's chunk)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--low-memory", action="store_true", help="ONNX Runtime without weight pre-packing / arena")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from stac_backend.engine import Stream
    from stac_backend.engine.runtimes.onnx_runtime import OnnxRuntimeStream, OnnxStep
    from stac_backend.graph.io import read_layout
    from stac_backend.model import build_model

    layout = read_layout(args.graph)
    chunk = args.chunk or layout.max_chunk
    frames = torch.rand(args.frames, 3, layout.height, layout.width, generator=torch.Generator().manual_seed(0))
    report = {"graph": str(args.graph), "policy": layout.policy, "frames": args.frames, "chunk": chunk,
              "size": f"{layout.height}x{layout.width}", "state_bytes": layout.state_bytes()}

    started = time.perf_counter()
    step = OnnxStep(args.graph, threads=args.threads, low_memory=args.low_memory)
    report["ort_session_s"] = round(time.perf_counter() - started, 1)
    stream = OnnxRuntimeStream(step)
    got, ort_s = [], []
    for i in range(0, args.frames, chunk):
        t = time.perf_counter()
        got.append(stream.push(frames[i : i + chunk]))
        ort_s.append(round(time.perf_counter() - t, 2))
    report["ort_step_s"] = ort_s
    report["ort_peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    del stream, step
    gc.collect()

    if not args.checkpoint and not args.random_weights:
        parser.error("give --checkpoint or --random-weights (the graph's weights)")
    model = build_model(None if args.checkpoint else layout.model, checkpoint=args.checkpoint, seed=0).eval()
    reference = Stream(model, cache=layout.cache)
    worst, torch_s = {}, []
    for i, out in zip(range(0, args.frames, chunk), got):
        t = time.perf_counter()
        want = reference.push(frames[i : i + chunk])
        torch_s.append(round(time.perf_counter() - t, 2))
        for k in ("depth", "depth_conf", "world_points", "world_points_conf", "pose_enc", "extrinsics"):
            worst[k] = max(worst.get(k, 0.0), (out[k] - want[k]).abs().max().item())
    report["torch_step_s"] = torch_s
    report["max_abs_diff"] = worst
    report["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
