"""A stream: one camera's frames pushed chunk by chunk through the model with its own caches.

    stream = Stream(model, chunk_size=4)           # full cache by default
    stream = Stream(model, cache="stac")           # or a CacheConfig / CachePolicy
    out = stream.push(frames)                      # frames [C <= 4, 3, H, W], uint8 or float in [0, 1]
    out["depth"], out["world_points"], out["extrinsics"], ...   # each [C, ...]
    stream.memory_bytes()                          # bytes held by the stream's caches right now

Each push is one step: the chunk's frames attend to each other both ways and to the cache of
earlier frames, and the camera head is causal across frames through its own small cache. Pushing
chunks of C frames gives exactly what ``model(images, chunk_size=C)`` gives on the whole sequence.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ..cache import CacheConfig, CacheGeometry, CachePolicy, CameraCache, FullCache, camera_bytes_per_frame, geometry_of, make_cache
from ..model.config import ModelConfig
from ..model.vggt import VGGT
from .batch import run_batched_step
from .frames import FrameInput, to_frame_tensor
from .runtime import RuntimeStream


def cache_geometry(model: VGGT) -> CacheGeometry:
    param = next(model.parameters())
    return geometry_of(model.config, param.dtype, str(param.device))


class Stream(RuntimeStream):
    """One camera stream. ``cache``: a policy name, a ``CacheConfig``, a ready ``CachePolicy`` or
    None (full cache). ``chunk_size`` defaults to the CacheConfig's chunk (else 4)."""

    def __init__(
        self,
        model: VGGT,
        chunk_size: Optional[int] = None,
        cache: Union[str, CacheConfig, CachePolicy, None] = None,
    ):
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if cache is None or isinstance(cache, str):
            cache = CacheConfig(policy=cache or "full", chunk=chunk_size or 4)
        geometry = cache_geometry(model)
        if isinstance(cache, CacheConfig):
            config = cache if chunk_size is None else cache.replace(chunk=chunk_size)
            cache = make_cache(config, geometry)
        else:  # a ready policy: its own config, else the full cache's defaults (unbounded camera window)
            config = getattr(cache, "config", None) or CacheConfig(policy="full", chunk=chunk_size or 4)
            if chunk_size is not None and chunk_size != config.chunk:
                config = config.replace(chunk=chunk_size)
        self.chunk_size = config.chunk
        self.model = model
        self.cache: CachePolicy = cache
        self.camera_cache = CameraCache(config, geometry)
        self.frames_seen = 0
        self.image_hw: Optional[tuple[int, int]] = None
        self.broken: Optional[str] = None
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def validate(self, frames: FrameInput) -> Tensor:
        """Checked float frames [C, 3, H, W] on the model's device; raises ValueError naming the problem."""
        if self.broken is not None:
            raise RuntimeError(f"stream is unusable after an earlier failure ({self.broken}); reset it or open a new one")
        return to_frame_tensor(
            frames, self.config.patch_size, self.chunk_size, self.image_hw, device=self.device, dtype=self.dtype
        )

    def push(self, frames: FrameInput) -> dict[str, Tensor]:
        """Run one step on a chunk of frames; returns per-frame outputs [C, ...] (detached)."""
        images = self.validate(frames)
        return push_many([self], [images])[0]

    def _advance(self, out: dict[str, Tensor], count: int, image_hw: tuple[int, int]) -> dict[str, Tensor]:
        out["frame_index"] = torch.arange(self.frames_seen, self.frames_seen + count)
        self.image_hw = image_hw
        self.frames_seen += count
        return out

    def memory_bytes(self) -> int:
        """Bytes of every cache tensor this stream holds (global-attention cache + camera cache)."""
        return self.cache.memory_bytes() + self.camera_cache.memory_bytes()

    def memory_bound(self, image_hw: Optional[tuple[int, int]] = None) -> Optional[int]:
        """Most bytes this stream's caches can ever hold at frames of ``image_hw`` (default: the
        size it has seen); None where a cache is unbounded or the size is not known yet."""
        image_hw = image_hw or self.image_hw
        if image_hw is None:
            return None
        return _sum_bounds(self.cache.bytes_bound(self.config.tokens_per_frame(*image_hw)), self.camera_cache.bytes_bound())

    def resting_memory_bound(self, image_hw: Optional[tuple[int, int]] = None) -> Optional[int]:
        """Most bytes this stream's caches hold between steps at frames of ``image_hw``: the
        memory bound less the step's new tokens, which a step holds only until its end prunes
        them (see ``CachePolicy.resting_bytes_bound``); None where unbounded or the size is unknown."""
        image_hw = image_hw or self.image_hw
        if image_hw is None:
            return None
        return _sum_bounds(self.cache.resting_bytes_bound(self.config.tokens_per_frame(*image_hw)),
                           self.camera_cache.bytes_bound())

    def evicted_tokens(self) -> int:
        return int(self.cache.evicted_tokens)

    def reset(self) -> None:
        """Forget everything; the next push starts a new stream (frame 0)."""
        self.cache.reset()
        self.camera_cache.reset()
        self.frames_seen = 0
        self.image_hw = None
        self.broken = None

    close = reset

    def export_state(self) -> dict[str, Tensor]:
        """Everything the stream holds as plain tensors (copies), between steps: ``cache.<name>`` (the
        policy's ``export_state``), ``camera.<name>`` (the camera cache's), ``frames_seen`` and
        ``image_hw`` ([2], or [0] before the first step)."""
        state = {"cache." + name: t for name, t in self.cache.export_state().items()}
        state.update({"camera." + name: t for name, t in self.camera_cache.export_state().items()})
        state["frames_seen"] = torch.tensor(self.frames_seen, dtype=torch.int64)
        state["image_hw"] = torch.tensor(self.image_hw or (), dtype=torch.int64)
        return state

    def import_state(self, state: dict[str, Tensor]) -> None:
        """Continue the stream ``export_state`` exported (same model and cache configuration)."""
        self.reset()
        self.cache.import_state({n[6:]: t for n, t in state.items() if n.startswith("cache.")})
        self.camera_cache.import_state({n[7:]: t for n, t in state.items() if n.startswith("camera.")})
        self.frames_seen = int(state["frames_seen"])
        hw = state["image_hw"].tolist()
        self.image_hw = (int(hw[0]), int(hw[1])) if hw else None


def stream_memory_bound(model: ModelConfig, cache: CacheConfig, image_hw: tuple[int, int],
                        dtype: torch.dtype = torch.float32) -> Optional[int]:
    """What ``Stream.memory_bound`` says for a stream of this model and cache configuration, from the
    configurations alone (no weights): the most bytes its caches can hold; None where unbounded."""
    geometry = geometry_of(model, dtype)
    policy = make_cache(cache, geometry).bytes_bound(model.tokens_per_frame(*image_hw))
    return _sum_bounds(policy, CameraCache(cache, geometry).bytes_bound())


def stream_resting_memory_bound(model: ModelConfig, cache: CacheConfig, image_hw: tuple[int, int],
                                dtype: torch.dtype = torch.float32) -> Optional[int]:
    """What ``Stream.resting_memory_bound`` says, from the configurations alone (no weights)."""
    geometry = geometry_of(model, dtype)
    policy = make_cache(cache, geometry).resting_bytes_bound(model.tokens_per_frame(*image_hw))
    return _sum_bounds(policy, CameraCache(cache, geometry).bytes_bound())


def _sum_bounds(*bounds: Optional[int]) -> Optional[int]:
    return None if any(b is None for b in bounds) else sum(bounds)


def full_cache_bytes_per_frame(config: ModelConfig, height: int, width: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes one more frame adds to a stream with the full cache (global attention and camera trunk)."""
    geometry = geometry_of(config, dtype)
    return FullCache.bytes_per_frame(geometry, config.tokens_per_frame(height, width)) + camera_bytes_per_frame(geometry)


def push_many(streams: list[Stream], images: list[Tensor]) -> list[dict[str, Tensor]]:
    """One step for several streams at once (frames already validated by ``Stream.validate``).

    A ValueError (e.g. a memory budget refused at the start of a step) leaves all streams intact;
    any other failure marks the streams of the step as broken, since their caches may be half-updated.
    """
    try:
        outs = run_batched_step(streams, images)
    except ValueError:
        raise
    except Exception as exc:
        for s in streams:
            s.broken = f"{type(exc).__name__}: {exc}"
        raise
    return [s._advance(out, frames.shape[0], tuple(frames.shape[-2:])) for s, out, frames in zip(streams, outs, images)]
