"""The ``stac`` command line.

    stac stream SOURCE --out DIR       reconstruct a folder of images, a video or `synthetic:N`
    stac synth --out DIR               write a synthetic scene with ground truth
    stac info                          presets, parameter counts, cache bytes per frame
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="model preset (tiny, vggt-1b); default: the checkpoint's own, else tiny")
    p.add_argument("--checkpoint", type=Path, default=None, help="weights (.pt/.pth/.safetensors)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")


def load_model_from_args(args: argparse.Namespace):
    from .model import build_model

    preset = args.preset or (None if args.checkpoint else "tiny")
    if args.checkpoint is None:
        print(f"note: no --checkpoint given, using random weights for preset {preset!r}", file=sys.stderr)
    return build_model(preset, checkpoint=args.checkpoint, device=args.device, dtype=DTYPES[args.dtype])


def cmd_stream(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .engine import Stream
    from .results import ReconstructionWriter
    from .sources import chunks, open_source

    model = load_model_from_args(args)
    target = args.size or model.config.img_size
    source = open_source(args.source, mode=args.mode, target=target, max_frames=args.max_frames)
    print(f"streaming {source.description} through {model.config.patch_embed} model, chunks of {args.chunk_size}", file=sys.stderr)
    stream = Stream(model, chunk_size=args.chunk_size)
    writer = ReconstructionWriter(args.out, conf_threshold=args.conf_threshold, save_frames=not args.no_frames)
    started = time.perf_counter()
    with tqdm(total=source.length, unit="frame", disable=args.quiet) as bar:
        for chunk in chunks(source, args.chunk_size):
            out = stream.push(chunk)
            for i, index in enumerate(out["frame_index"].tolist()):
                writer.add(index, {k: v[i] for k, v in out.items() if k != "frame_index"}, chunk[i])
            bar.update(len(chunk))
            bar.set_postfix(cache=f"{stream.memory_bytes() / 2**20:.1f}MiB")
    elapsed = time.perf_counter() - started
    summary = writer.finish()
    summary.update(seconds=round(elapsed, 3), frames_per_second=round(stream.frames_seen / max(elapsed, 1e-9), 2),
                   cache_bytes=stream.memory_bytes())
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .engine import full_cache_bytes_per_frame
    from .model import PRESETS, VGGT, count_parameters

    for name, config in PRESETS.items():
        with torch.device("meta"):
            params = count_parameters(VGGT(config))
        side = config.img_size
        h = int(round(side * 3 / 4 / config.patch_size) * config.patch_size)
        per_frame = full_cache_bytes_per_frame(config, h, side, torch.bfloat16)
        print(f"{name:8s} {params:>14,d} parameters; full cache at {side}x{h} bf16: {per_frame / 2**20:.2f} MiB/frame")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stac", description="Streaming 3D reconstruction with STAC cache compression")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stream", help="reconstruct a folder of images, a video or a synthetic scene")
    p.add_argument("source", help="folder of images, video file, or synthetic[:FRAMES]")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--chunk-size", type=int, default=4)
    p.add_argument("--mode", choices=("crop", "pad"), default="crop")
    p.add_argument("--size", type=int, default=None, help="target width in pixels (default: the model's img_size)")
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--conf-threshold", type=float, default=2.0, help="keep points whose confidence exceeds this")
    p.add_argument("--no-frames", action="store_true", help="skip the per-frame npz files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_args(p)
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser("info", help="presets, parameter counts and cache sizes")
    p.set_defaults(func=cmd_info)

    try:
        from .data.cli import register as register_synth
    except ImportError:  # the synthetic-data package is optional at import time
        register_synth = None
    if register_synth is not None:
        register_synth(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"stac: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
