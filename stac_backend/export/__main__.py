"""Command line: export one streaming step of a model to ONNX.

    python -m stac_backend.export --preset tiny --policy stac --height 56 --width 84 --out out/stac_tiny.onnx
    python -m stac_backend.export --preset vggt-1b --random-weights --policy stac --out out/vggt1b/stac_step.onnx
    python -m stac_backend.export --checkpoint model.safetensors --policy full --max-frames 32 --out full.onnx

Prints a JSON summary (file sizes, node counts, custom nodes, time, peak memory).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from collections import Counter
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stac_backend.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="the .onnx file to write")
    parser.add_argument("--preset", default=None, help="model preset (tiny, vggt-1b); default: the checkpoint's own")
    parser.add_argument("--checkpoint", default=None, help="weights (.pt/.pth/.safetensors)")
    parser.add_argument("--random-weights", action="store_true", help="no checkpoint: random weights (seed 0)")
    parser.add_argument("--policy", default="stac", choices=["full", "heavy_hitter", "stac"])
    parser.add_argument("--cache-config", default="{}", help="JSON of CacheConfig fields (policy comes from --policy)")
    parser.add_argument("--height", type=int, default=392)
    parser.add_argument("--width", type=int, default=518)
    parser.add_argument("--max-frames", type=int, default=None, help="frames a stream may hold (full policy)")
    parser.add_argument("--external-data", choices=["auto", "yes", "no"], default="auto",
                        help="weights in <out>.data (auto: when they exceed 1 GiB)")
    parser.add_argument("--no-optimize", action="store_true", help="skip the onnxscript graph optimizer (faster export)")
    parser.add_argument("--attention", choices=["stac", "onnx"], default="stac",
                        help="full policy only: 'onnx' = standard ops instead of StacAttention nodes (no custom nodes)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[export] %(message)s")
    logging.getLogger("stac.export").setLevel(logging.INFO)

    import onnx
    import torch

    from ..cache import CacheConfig
    from ..model import build_model
    from .onnx_export import export_step

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if not args.checkpoint and not args.random_weights:
        parser.error("give --checkpoint, or --random-weights to export random weights")
    cache = CacheConfig.from_dict({**json.loads(args.cache_config), "policy": args.policy})
    started = time.perf_counter()
    model = build_model(args.preset, checkpoint=args.checkpoint, device="cpu", dtype=torch.float32, seed=0).eval()
    built = time.perf_counter()
    external = {"auto": None, "yes": True, "no": False}[args.external_data]
    path = export_step(model, cache, args.out, height=args.height, width=args.width, max_frames=args.max_frames,
                       external_data=external, optimize=not args.no_optimize,
                       standard_attention=args.attention == "onnx")
    exported = time.perf_counter()
    proto = onnx.load(str(path), load_external_data=False)
    data = path.with_name(path.name + ".data")
    summary = {
        "out": str(path),
        "graph_bytes": path.stat().st_size,
        "external_data_bytes": data.stat().st_size if data.exists() else 0,
        "parameters": sum(p.numel() for p in model.parameters()),
        "nodes": len(proto.graph.node),
        "stac_nodes": dict(Counter(n.op_type for n in proto.graph.node if n.domain == "stac")),
        "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "build_model_s": round(built - started, 1),
        "export_s": round(exported - built, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
