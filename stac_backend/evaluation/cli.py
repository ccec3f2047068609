"""``stac eval``: stream a dataset through the model under each cache policy and score it.

    stac eval DATASET --out DIR [--format auto|tum|7scenes|scannet|folder|synthetic]
              [--policies full,stac] [--stride 20] [--max-frames 200] [--checkpoint W --preset vggt-1b]

Writes ``DIR/results.json``, ``DIR/results.md`` and ``DIR/results.png`` (see docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_parser", "cmd_eval"]


def _floats(text: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in text.replace(",", " ").split())
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"expected fx,fy,cx,cy, got {text!r}")
    return values


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..model_args import add_model_args
    from .datasets import FORMATS

    p = subparsers.add_parser("eval", help="score every cache policy on a dataset with ground truth (TUM, 7-Scenes, "
                                           "ScanNet, a folder)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", type=Path, help="dataset folder (a TUM sequence, a 7-Scenes scene or seq-XX, an exported "
                                              "ScanNet scene, a folder of images, a `stac synth` folder)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS])
    p.add_argument("--policies", default="all", help="comma-separated cache policies, or all (default)")
    p.add_argument("--policy-overrides", default="{}",
                   help='JSON of CacheConfig fields per policy, e.g. \'{"stac": {"conf_threshold": 1.0}}\'')
    p.add_argument("--chunk-size", type=int, default=4)
    p.add_argument("--stride", type=int, default=1, help="keep every N-th frame (e.g. 20 for 7-Scenes)")
    p.add_argument("--start", type=int, default=0, help="first frame (before striding)")
    p.add_argument("--max-frames", type=int, default=None, help="at most this many frames per sequence (after striding)")
    p.add_argument("--sequences", default=None, help="comma-separated sub-sequences to keep (7-Scenes: seq-01,seq-02)")
    p.add_argument("--size", type=int, default=None, help="model input width (default: the model's img_size)")
    p.add_argument("--mode", choices=("crop", "pad"), default="crop")
    p.add_argument("--intrinsics", type=_floats, default=None, help="fx,fy,cx,cy at the files' resolution")
    p.add_argument("--depth-scale", type=float, default=None, help="depth PNG value per metre (default: the format's)")
    p.add_argument("--max-depth", type=float, default=None, help="ignore GT depth beyond this many metres")
    p.add_argument("--point-frame-stride", type=int, default=1, help="point metrics on every N-th frame only")
    p.add_argument("--icp-iterations", type=int, default=30)
    p.add_argument("--no-points-from-depth", dest="points_from_depth", action="store_false",
                   help="score the point head's map only, not also the points from predicted depth + cameras")
    p.add_argument("--max-points", type=int, default=20_000, help="query points of accuracy / completeness")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_model_args(p)
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from ..model_args import load_model_from_args
    from .datasets import LoadOptions, load_sequences
    from .report import provenance, write_report
    from .runner import evaluate, policy_configs
    from .scoring import MetricSettings

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        overrides = json.loads(args.policy_overrides)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--policy-overrides is not valid JSON: {exc}") from None
    names = None if args.policies == "all" else [n.strip() for n in args.policies.split(",") if n.strip()]
    configs = policy_configs(names, chunk=args.chunk_size, overrides=overrides)
    model = load_model_from_args(args)
    options = LoadOptions(target=args.size or model.config.img_size, mode=args.mode, patch_size=model.config.patch_size,
                          stride=args.stride, start=args.start, max_frames=args.max_frames,
                          sequences=args.sequences.split(",") if args.sequences else None, intrinsics=args.intrinsics,
                          depth_scale=args.depth_scale, max_depth=args.max_depth)
    sequences = load_sequences(args.dataset, args.format, options)
    print(f"evaluating {len(sequences)} sequence(s) x {len(configs)} policies: "
          + ", ".join(f"{s.name} ({s.num_frames} frames, GT: {', '.join(s.metadata['ground_truth']) or 'none'})"
                      for s in sequences), file=sys.stderr)
    settings = MetricSettings(icp_iterations=args.icp_iterations, max_points=args.max_points,
                              point_frame_stride=args.point_frame_stride, points_from_depth=args.points_from_depth,
                              max_depth=args.max_depth if args.max_depth is not None else 70.0)
    results = evaluate(model, sequences, configs, settings)
    results = {"benchmark": "eval", "provenance": provenance(args.device), "dataset": str(args.dataset),
               "checkpoint": str(args.checkpoint) if args.checkpoint else None, "preset": args.preset,
               "options": {k: v for k, v in vars(options).items()}, **results}
    paths = write_report(results, args.out, f"stac eval: {args.dataset.name}")
    print(Path(paths["markdown"]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0
