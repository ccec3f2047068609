"""``stac export``: export a streaming step to ONNX, build a TensorRT engine, prepare a repository.

    stac export onnx --preset tiny --random-weights --policy stac --height 56 --width 84 --out stac.onnx
    stac export onnx --checkpoint model.safetensors --policy full --max-frames 32 --out full.onnx
    stac export tensorrt stac.onnx stac.plan --max-batch 4            # tensorrt or tensorrt_rtx, whichever is installed
    stac export repository /models                                    # the deployment hook: export + engine + RUNTIME=tensorrt
    stac export repository model_repository_onnx --stock-backends     # implicit-state configs for Triton's own backends

``python -m stac_backend.export ...`` is the same command. Each prints a JSON summary on stdout.
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


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``export`` (with its subcommands onnx / tensorrt / repository) to a CLI's subparsers."""
    parser = subparsers.add_parser("export", help="export to ONNX, build TensorRT engines, prepare repositories",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _fill(parser)
    return parser


def _fill(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="export_command", required=True)

    p = sub.add_parser("onnx", help="one streaming step of a model -> ONNX (stac nodes = TensorRT plugins)")
    p.add_argument("--out", required=True, type=Path, help="the .onnx file to write")
    _model_args(p)
    p.add_argument("--policy", default="stac", choices=["full", "heavy_hitter", "stac"])
    p.add_argument("--cache-config", default="{}", help="JSON of CacheConfig fields (policy comes from --policy)")
    p.add_argument("--external-data", choices=["auto", "yes", "no"], default="auto",
                   help="weights in <out>.data (auto: when they exceed 1 GiB)")
    p.add_argument("--no-optimize", action="store_true", help="skip the onnxscript graph optimizer (faster export)")
    p.add_argument("--attention", choices=["stac", "onnx"], default="stac",
                   help="full policy only: 'onnx' = standard ops instead of StacAttention nodes (no custom nodes)")
    p.set_defaults(export_func=cmd_onnx)

    p = sub.add_parser("tensorrt", help="TensorRT engine from an exported graph (tensorrt or tensorrt_rtx)")
    p.add_argument("onnx", type=Path)
    p.add_argument("plan", type=Path)
    _engine_args(p, max_batch=1)
    p.add_argument("--opt-batch", type=int, default=1)
    p.add_argument("--workspace-gib", type=float, default=8.0)
    p.set_defaults(export_func=cmd_tensorrt)

    p = sub.add_parser("repository", help="build the engine of a rendered model repository and switch it to "
                                          "RUNTIME=tensorrt, or render the stock-backend variants")
    p.add_argument("repository", type=Path)
    p.add_argument("--model", default="stac", help="the model folder to build for")
    p.add_argument("--height", type=int, default=392)
    p.add_argument("--width", type=int, default=518)
    p.add_argument("--max-frames", type=int, default=None, help="full policy: frames a stream may hold")
    _engine_args(p, max_batch=4)
    p.add_argument("--stock-backends", action="store_true",
                   help="render the implicit-state variants for Triton's onnxruntime / tensorrt backends instead")
    p.add_argument("--model-files", action="store_true", help="--stock-backends: also export 1/model.onnx (vggt-1b)")
    p.add_argument("--tensorrt", action="store_true", help="--stock-backends: also build 1/model.plan")
    p.add_argument("--checkpoint", default=None, help="--stock-backends: weights (default: random, seed 0)")
    p.set_defaults(export_func=cmd_repository)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="model preset (tiny, vggt-1b); default: the checkpoint's own")
    p.add_argument("--checkpoint", default=None, help="weights (.pt/.pth/.safetensors)")
    p.add_argument("--random-weights", action="store_true", help="no checkpoint: random weights (seed 0)")
    p.add_argument("--height", type=int, default=392)
    p.add_argument("--width", type=int, default=518)
    p.add_argument("--max-frames", type=int, default=None, help="frames a stream may hold (full policy)")


def _engine_args(p: argparse.ArgumentParser, max_batch: int) -> None:
    p.add_argument("--max-batch", type=int, default=max_batch, help="streams per engine call (profile max)")
    p.add_argument("--fp16", action="store_true", help="allow fp16 in standard layers (state and plugins stay fp32)")
    p.add_argument("--plugins", choices=["python", "aot"], default="python",
                   help="python: every stac op an IPluginV3 Python plugin (tensorrt and tensorrt_rtx); aot: "
                        "StacAttention / StacScoreDecay as compiled kernels (datacenter tensorrt >= 10.10)")


def _logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="[export] %(message)s")
    logging.getLogger("stac.export").setLevel(logging.INFO)


def cmd_onnx(args: argparse.Namespace) -> int:
    import onnx
    import torch

    from ..cache import CacheConfig
    from ..model import build_model
    from .onnx_export import export_step

    if not args.checkpoint and not args.random_weights:
        raise SystemExit("stac export onnx: give --checkpoint, or --random-weights to export random weights")
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
    _print({
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
    })
    return 0


def cmd_tensorrt(args: argparse.Namespace) -> int:
    from .trt_build import build_engine, read_plan_meta

    plan = build_engine(args.onnx, args.plan, max_batch=args.max_batch, opt_batch=args.opt_batch, fp16=args.fp16,
                        workspace_gib=args.workspace_gib, plugins=args.plugins)
    _, meta = read_plan_meta(plan)
    _print({"plan": str(plan), **{k: meta[k] for k in ("tensorrt", "plan_bytes", "plugin_layers", "needs_python")}})
    return 0


def cmd_repository(args: argparse.Namespace) -> int:
    if args.stock_backends:
        from .triton_variant import write_stock_variants

        written = write_stock_variants(args.repository, model_files=args.model_files or args.tensorrt,
                                       tensorrt=args.tensorrt, checkpoint=args.checkpoint)
        _print({"written": [str(p) for p in written]})
        return 0
    from .trt_repository import build_repository_engine

    plan = build_repository_engine(args.repository, model=args.model, height=args.height, width=args.width,
                                   max_frames=args.max_frames, max_batch=args.max_batch, fp16=args.fp16,
                                   plugins=args.plugins)
    _print({"plan": str(plan), "config": str(args.repository / args.model / "config.pbtxt"), "runtime": "tensorrt"})
    return 0


def _print(summary: dict) -> None:
    print(json.dumps(summary, indent=2), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stac_backend.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _fill(parser)
    args = parser.parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    _logging()
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    return args.export_func(args)


if __name__ == "__main__":
    sys.exit(main())
