"""How many PyTorch operations the host issues for one batched stac step, per hot store.

A GPU step of many streams is close to bound by the host that launches its kernels
(docs/performance.md, the 6-stream profile), so the operations a cache adds per layer and stream
matter. This counts the top-level ``aten::`` operations of one batched step of a few stac streams
of a model with as many global layers as vggt-1b (the tiny preset, deeper), on the CPU, after
steps that filled the caches, evicted and retrieved: once with all of them and once without the
ones that only make a view (they launch no kernel on a GPU).

    python benchmarks/cache_host_ops.py --out docs/benchmarks/cache_host_ops_cpu.json
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile

from stac_backend.cache import CacheConfig
from stac_backend.engine import Stream, push_many
from stac_backend.model import build_model, config_with, get_preset
from stac_backend.results import write_result

# Operations that only describe a view of a tensor (no kernel on a GPU).
VIEWS = {"aten::view", "aten::slice", "aten::select", "aten::expand", "aten::unsqueeze", "aten::squeeze",
         "aten::reshape", "aten::as_strided", "aten::alias", "aten::t", "aten::transpose", "aten::permute",
         "aten::lift_fresh", "aten::detach", "aten::_unsafe_view", "aten::unflatten", "aten::flatten",
         "aten::split", "aten::chunk", "aten::unbind", "aten::narrow", "aten::expand_as", "aten::view_as"}
# Small cache settings under which a short run evicts, pools and retrieves (the tests' settings).
SMALL = dict(chunk=2, window=2, hh=1, retrieval_start_frame=4, voxel_size=0.05, conf_threshold=0.0, buffer_size=2,
             max_pivots=2)


def top_level_ops(step) -> Counter:
    """The ``aten::`` operations ``step()`` issues that no other ``aten::`` operation issued."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ops = Counter()
    for event in prof.events():
        parent = event.cpu_parent
        if event.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::")):
            ops[event.name] += 1
    return ops


def count_store(model, store: str, streams: int, warm_steps: int, frames: torch.Tensor) -> Counter:
    group = [Stream(model, cache=CacheConfig(policy="stac", store=store, **SMALL)) for _ in range(streams)]
    chunk = SMALL["chunk"]
    for i in range(warm_steps):
        push_many(group, [s.validate(frames[i * chunk : (i + 1) * chunk]) for s in group])
    last = frames[warm_steps * chunk : (warm_steps + 1) * chunk]
    ops = top_level_ops(lambda: push_many(group, [s.validate(last) for s in group]))
    if group[0].cache.stats()["evicted_tokens"] == 0:
        raise RuntimeError("the warm-up steps evicted nothing: raise --warm-steps")
    return ops


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=24, help="global (and frame) layers of the model (vggt-1b: 24)")
    p.add_argument("--streams", type=int, default=3)
    p.add_argument("--warm-steps", type=int, default=12, help="batched steps before the counted one")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/cache_host_ops_cpu.json"))
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = build_model(config_with(get_preset("tiny"), depth=args.depth), seed=0)
    frames = torch.rand((args.warm_steps + 1) * SMALL["chunk"], 3, 56, 84, generator=torch.Generator().manual_seed(5))
    rows = {}
    for store in ("compact", "slots"):
        ops = count_store(model, store, args.streams, args.warm_steps, frames)
        launching = {name: n for name, n in ops.items() if name not in VIEWS}
        rows[store] = {"ops": sum(ops.values()), "ops_without_views": sum(launching.values()),
                       "by_op": dict(sorted(ops.items(), key=lambda item: -item[1]))}
        print(f"{store:8s} {rows[store]['ops']:6d} ops, {rows[store]['ops_without_views']:6d} without views")
    result = {"depth": args.depth, "streams": args.streams, "warm_steps": args.warm_steps, "cache_settings": SMALL,
              "stores": rows,
              "note": "top-level aten:: operations of one batched stac step (tiny preset at this depth, CPU, "
                      "float32); 'without views' leaves out operations that only make a view"}
    write_result(args.out, result, "cache_host_ops", device="cpu")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
