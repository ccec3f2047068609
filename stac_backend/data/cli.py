"""Command-line glue for synthetic data: the ``synth`` subcommand.

Wire it into a larger argparse CLI with ``register(subparsers)``; the handler is stored as the
``func`` default, so the caller runs ``args.func(args)`` (it returns a process exit code). It also
runs standalone::

    python -m stac_backend.data.cli synth --frames 32 --height 84 --width 112 --out /tmp/seq
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .io import GROUND_TRUTH_FILE, write_sequence
from .sequence import WORLD_FRAMES, make_sequence
from .trajectory import TRAJECTORIES

__all__ = ["register", "run_synth", "main"]


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``synth`` subcommand to an argparse subparsers object and return its parser."""
    parser = subparsers.add_parser(
        "synth",
        help="render a synthetic indoor stream with ground truth",
        description="Render a procedural room along a camera trajectory and write PNG frames plus "
        "ground_truth.npz (depth, valid, world points, OpenCV extrinsics, intrinsics, metadata).",
    )
    parser.add_argument("--frames", type=int, default=32, help="number of frames (default 32)")
    parser.add_argument("--height", type=int, default=392, help="image height in pixels (default 392)")
    parser.add_argument("--width", type=int, default=518, help="image width in pixels (default 518)")
    parser.add_argument("--trajectory", choices=sorted(TRAJECTORIES), default="loop", help="camera path")
    parser.add_argument("--seed", type=int, default=0, help="scene and trajectory seed (default 0)")
    parser.add_argument("--fov", type=float, default=60.0, help="horizontal field of view, degrees")
    parser.add_argument(
        "--world-frame", choices=WORLD_FRAMES, default="scene",
        help="world frame of the ground truth: scene (z up, floor z=0) or first_camera (VGGT)",
    )
    parser.add_argument("--device", default="cpu", help="torch device to render on (default cpu)")
    parser.add_argument("--no-world-points", action="store_true", help="omit world_points from the npz")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    parser.set_defaults(func=run_synth)
    return parser


def run_synth(args: argparse.Namespace) -> int:
    """Render and write one sequence as described by ``args``; prints a summary."""
    for name in ("frames", "height", "width"):
        if getattr(args, name) <= 0:
            print(f"error: --{name} must be positive", file=sys.stderr)
            return 2
    start = time.perf_counter()
    seq = make_sequence(
        args.frames, args.height, args.width, trajectory=args.trajectory, seed=args.seed, device=args.device,
        fov_deg=args.fov, world_frame=args.world_frame,
    )
    rendered = time.perf_counter()
    paths = write_sequence(seq, args.out, include_world_points=not args.no_world_points)
    written = time.perf_counter()
    gt = args.out / GROUND_TRUTH_FILE
    print(
        f"wrote {seq.num_frames} frames ({seq.width}x{seq.height}, trajectory={args.trajectory}, seed={args.seed}, "
        f"world_frame={args.world_frame}) to {args.out}: "
        f"{paths[0].name} .. {paths[-2].name}, {gt.name} ({gt.stat().st_size / 1e6:.1f} MB); "
        f"render {rendered - start:.2f} s, write {written - rendered:.2f} s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m stac_backend.data.cli synth ...``."""
    parser = argparse.ArgumentParser(prog="python -m stac_backend.data.cli", description="synthetic data tools")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
