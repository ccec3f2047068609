"""Streams of vggt-1b one GPU admits, by voxel-pool size: the admission rule's arithmetic on the
recorded step memory (no GPU). Prints the table of docs/performance.md ("The memory bound of a
stream, and streams per GPU").

    python benchmarks/streams_per_gpu.py                       # 78 GiB of an 80 GB H100
    python benchmarks/streams_per_gpu.py --capacity-gib 130    # an H200

Each stream is charged its resting bound (``stream_resting_memory_bound``, from the configuration
alone) plus its step outputs; the model's weights and one measured micro-batch step come from
``docs/benchmarks/engine_streams_h100.json`` (``TorchRuntime.warmup`` on the H100).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from stac_backend.cache import CacheConfig
from stac_backend.engine import stream_resting_memory_bound, streams_that_fit
from stac_backend.model import get_preset

RECORD = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "engine_streams_h100.json"
GIB = 2**30


def step_output_bytes(chunk: int, hw: tuple[int, int]) -> int:
    """One stream's step outputs (float32): depth, depth_conf, world_points (3), world_points_conf
    per pixel, the pose encoding (9), extrinsics (12), intrinsics (9) and an int64 frame index per
    frame: what ``TorchRuntime.step_output_bytes`` measures."""
    return chunk * (hw[0] * hw[1] * 6 * 4 + (9 + 12 + 9) * 4 + 8)


def recorded_h100(record: Path = RECORD) -> tuple[int, int]:
    """Model bytes and the measured peak of one micro-batch step (the "auto" mode) on the H100."""
    data = json.loads(record.read_text())
    return int(data["model_bytes"]), int(data["modes"]["auto"]["step_memory_bytes"])


def capacity_rows(capacity_bytes: int, pool_sizes=(256, 320, 384, 512), hw=(392, 518)) -> list[dict]:
    model_bytes, step_bytes = recorded_h100()
    rows = []
    for voxels in pool_sizes:
        cache = CacheConfig(max_voxels=voxels)
        charged = stream_resting_memory_bound(get_preset("vggt-1b"), cache, hw, torch.bfloat16) + step_output_bytes(cache.chunk, hw)
        rows.append({"max_voxels": voxels, "charged_bytes": charged,
                     "streams": streams_that_fit(capacity_bytes, charged, step_bytes, model_bytes)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--capacity-gib", type=float, default=78.0)
    args = p.parse_args(argv)
    print("| pool (`max_voxels`) | resting bound + outputs per stream | streams admitted |")
    print("| --- | --- | --- |")
    for row in capacity_rows(int(args.capacity_gib * GIB)):
        print(f"| {row['max_voxels']} | {row['charged_bytes'] / 1e9:.2f} GB | {row['streams']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
