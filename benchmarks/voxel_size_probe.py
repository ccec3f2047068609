"""Does ``stac``'s voxel pool form pivots at a model's resolution? One training-range scene per
voxel size: pooled tokens, pivots created and tokens retrieved per head at the stream's end.

    python benchmarks/voxel_size_probe.py --out docs/benchmarks/voxel_size_probe_cpu.json

A pivot forms when a voxel's buffer fills (``buffer_size`` tokens of one layer and head) before
the pool's LRU rule evicts the voxel. A small model at 112x84 has 48 patch tokens per frame, each
covering a large part of the view, so at the reference's 5 cm a voxel rarely fills. The scene is
a training-range seed (below the held-out seeds from 1,000,000): choosing a voxel size here is not
tuning on the scenes the quality benchmarks score.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from stac_backend.assets import EMBEDDED_CHECKPOINT
from stac_backend.cache import CacheConfig
from stac_backend.data import HELD_OUT_SEED, make_sequence
from stac_backend.data.sequence import to_first_camera_frame
from stac_backend.engine import Stream
from stac_backend.model import build_model
from stac_backend.results import write_result

STATS = ("pooled_tokens", "pool_pivots_created", "pool_pivots", "retrieved_per_head", "pool_merged_tokens",
         "pool_evicted_voxels", "pool_capacity_dropped_tokens")


def probe(model, seq, voxel_size: float, chunk: int) -> dict:
    stream = Stream(model, cache=CacheConfig(policy="stac", chunk=chunk, voxel_size=voxel_size))
    with torch.inference_mode():
        for i in range(0, seq.num_frames, chunk):
            stream.push(seq.images[i : i + chunk])
    stats = stream.cache.stats()
    return {"voxel_size": voxel_size, **{k: stats.get(k) for k in STATS}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=EMBEDDED_CHECKPOINT)
    p.add_argument("--seed", type=int, default=12345, help="a training-range scene (below 1,000,000)")
    p.add_argument("--frames", type=int, default=120)
    p.add_argument("--height", type=int, default=84)
    p.add_argument("--width", type=int, default=112)
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--voxel-sizes", default="0.05,0.1,0.2,0.4")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.seed >= HELD_OUT_SEED:
        p.error(f"--seed must be a training-range scene (below {HELD_OUT_SEED:,}): sizes are not chosen on held-out scenes")
    torch.set_num_threads(args.threads)
    model = build_model(checkpoint=args.checkpoint, device="cpu")
    seq = to_first_camera_frame(make_sequence(args.frames, args.height, args.width, trajectory="loop", seed=args.seed))
    rows = []
    for size in (float(x) for x in args.voxel_sizes.split(",")):
        rows.append(probe(model, seq, size, args.chunk))
        print(rows[-1], file=sys.stderr, flush=True)
    write_result(args.out, {"checkpoint": str(args.checkpoint.name), "seed": args.seed, "frames": args.frames,
                            "image_hw": [args.height, args.width], "chunk": args.chunk, "rows": rows},
                 "voxel_size_probe", "cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
