"""Several streams in one forward: the scheduler-side half of multi-stream serving.

Streams whose chunks have the same shape (frames, height, width) run as one batched forward - the
patch embed, frame blocks, MLPs and heads see a batch of B streams - while each stream's global
attention and camera trunk attend to its own cache (one padded, masked attention call per layer
for all of them). Streams with different chunk shapes run in separate forwards.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Protocol, Sequence

import torch
from torch import Tensor

from ..cache import CameraCache, CachePolicy, StepInfo
from ..cache.key_sets import attend_key_sets
from ..model.vggt import VGGT


class StepMember(Protocol):
    """What a step needs of a stream (``engine.Stream`` is one)."""

    model: VGGT
    cache: CachePolicy
    camera_cache: CameraCache
    frames_seen: int


class BatchedGlobalAttention:
    """GlobalAttention over a batch whose row b belongs to the stream with cache ``caches[b]``."""

    def __init__(self, caches: Sequence[CachePolicy]):
        self.caches = list(caches)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        sets = [cache.prepare(layer, k[b], v[b]) for b, cache in enumerate(self.caches)]
        out, masses = attend_key_sets(q, sets)
        for cache, mass in zip(self.caches, masses):
            cache.absorb(layer, mass, q.shape[2])
        return out


class BatchedCameraAttention:
    """The camera trunk's attention over a batch whose row b belongs to the stream with camera cache
    ``caches[b]``."""

    def __init__(self, caches: Sequence[CameraCache]):
        self.caches = list(caches)

    def attend(self, iteration: int, block: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        sets = [cache.prepare(iteration, block, k[b], v[b]) for b, cache in enumerate(self.caches)]
        return attend_key_sets(q, sets)[0]


def run_batched_step(streams: Sequence[StepMember], images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
    """One step of each stream on its validated frames (float [C, 3, H, W] on the model's device).

    Returns per stream the outputs [C, ...]. All streams must share one model. Errors are
    the caller's to attribute: a failure here leaves the streams of the failing group broken.
    """
    if len(streams) != len(images):
        raise ValueError("one chunk per stream")
    if not streams:
        return []
    model = streams[0].model
    if any(s.model is not model for s in streams):
        raise ValueError("streams of one batched step must share a model")
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, frames in enumerate(images):
        groups[tuple(frames.shape)].append(i)
    results: list[dict[str, Tensor]] = [None] * len(streams)  # type: ignore[list-item]
    for shape, members in groups.items():
        outs = _run_group(model, [streams[i] for i in members], torch.stack([images[i] for i in members]))
        for i, out in zip(members, outs):
            results[i] = out
    return results


def _run_group(model: VGGT, streams: list[StepMember], batch: Tensor) -> list[dict[str, Tensor]]:
    B, C, _, H, W = batch.shape
    config = model.config
    infos = [
        StepInfo(
            frame_offset=s.frames_seen,
            num_frames=C,
            tokens_per_frame=config.tokens_per_frame(H, W),
            patch_start_idx=config.patch_start_idx,
            grid_hw=(H // config.patch_size, W // config.patch_size),
        )
        for s in streams
    ]
    # Budget checks come first: a refusal (ValueError) leaves every stream untouched.
    for s, info in zip(streams, infos):
        s.cache.begin_step(info)
    with torch.inference_mode():
        out = model.forward_step(
            batch,
            [s.frames_seen for s in streams],
            BatchedGlobalAttention([s.cache for s in streams]),
            BatchedCameraAttention([s.camera_cache for s in streams]),
        )
        results = []
        for b, (s, info) in enumerate(zip(streams, infos)):
            info.world_points = out["world_points"][b : b + 1] if "world_points" in out else None
            info.world_points_conf = out["world_points_conf"][b : b + 1] if "world_points_conf" in out else None
            s.cache.end_step(info)
            s.camera_cache.end_step(s.frames_seen)
            results.append({name: value[b] for name, value in out.items()})
    return results
