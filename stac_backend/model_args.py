"""The command line's model options (preset, checkpoint, device, dtype), shared by every subcommand that
loads a model (``stac stream``, ``serve``, ``demo``, ``eval``). torch is imported only when a model
is loaded, so that a client-only install can still parse them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = ("bfloat16", "float16", "float32")


def _default_device() -> str:
    try:
        import torch
    except ImportError:  # a client-only install: the server side is not there anyway
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None,
                   help="model preset (tiny, small, vggt-1b); default: the checkpoint's own config, and with no "
                        "checkpoint the embedded trained small model")
    p.add_argument("--checkpoint", type=Path, default=None, help="weights (.pt/.pth/.safetensors)")
    p.add_argument("--device", default=_default_device(), help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and activations")


def resolve_model_args(args: argparse.Namespace) -> None:
    """No --checkpoint and no --preset: the embedded trained model. A preset alone: random weights."""
    from .assets import EMBEDDED_CHECKPOINT

    if args.checkpoint is None and args.preset is None:
        if EMBEDDED_CHECKPOINT.is_file():
            args.checkpoint = EMBEDDED_CHECKPOINT
        else:
            args.preset = "tiny"
    if args.checkpoint is None:
        print(f"note: no --checkpoint given, using random weights for preset {args.preset!r}", file=sys.stderr)


def load_model_from_args(args: argparse.Namespace):
    import torch

    from .model import build_model

    resolve_model_args(args)
    return build_model(args.preset, checkpoint=args.checkpoint, device=args.device, dtype=getattr(torch, args.dtype))
