"""Build a TensorRT engine from an exported step graph, with the stac plugins.

    python plugins/tensorrt/build_engine.py stac_step.onnx stac_step.plan --max-batch 4 [--fp16] [--plugins aot|jit]

--plugins aot (default): StacAttention and StacScoreDecay run as compiled kernels baked into the
engine (TensorRT >= 10.10 and OpenAI Triton at build time); the other stac ops stay JIT Python
callbacks. --plugins jit: every stac op is a JIT callback.

Writes the plan and ``<plan>.layout.json`` (the state layout the runtime needs). NOT EXERCISED
HERE: needs TensorRT >= 10.7 with its Python bindings and a GPU (the NGC Triton container).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("onnx", type=Path)
    parser.add_argument("plan", type=Path)
    parser.add_argument("--max-batch", type=int, default=1, help="streams per engine call (optimisation profile max)")
    parser.add_argument("--opt-batch", type=int, default=1)
    parser.add_argument("--fp16", action="store_true", help="allow fp16 in standard layers (state and plugins stay fp32)")
    parser.add_argument("--workspace-gib", type=float, default=8.0)
    parser.add_argument("--plugins", choices=["aot", "jit"], default="aot",
                        help="aot: compiled kernels where the op has one (docs/export.md); jit: Python callbacks only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[tensorrt] %(message)s")
    from stac_backend.export.trt_build import build_engine

    build_engine(args.onnx, args.plan, max_batch=args.max_batch, opt_batch=args.opt_batch, fp16=args.fp16,
                 workspace_gib=args.workspace_gib, plugins=args.plugins)
    return 0


if __name__ == "__main__":
    sys.exit(main())
