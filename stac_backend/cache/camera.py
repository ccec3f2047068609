"""The camera trunk's per-stream cache: keys and values of earlier frames per (iteration, block).

The camera head refines each frame's pose over a few iterations of a small transformer trunk whose
attention is causal across frames: iteration i of a frame attends to iteration i of the earlier
frames. Streaming keeps those keys and values here, one token per frame for each (iteration,
block) "entry". The model sees this cache only through ``prepare`` (store the step's keys, return
the key set to attend to), as the global attention sees a ``CachePolicy``.

It is small, but it grows with the stream, so it is counted in a stream's memory and bounded by
``CacheConfig.camera_window``: only the pinned frames and the most recent ``camera_window`` frames
are kept (a sliding window with attention sinks); None keeps every frame.

``camera_bytes_per_frame`` and ``camera_bytes_bound`` are the one size formula of this cache; the
policies use the bound to reserve its share of a stream's memory budget.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import CacheGeometry, check_state_names
from .config import CacheConfig
from .key_sets import KeySet

Entry = tuple[int, int]  # (iteration, block)


def camera_bytes_per_frame(geometry: CacheGeometry) -> int:
    """Bytes one frame adds to the camera cache: a key and a value of ``camera_width`` numbers for
    each of the ``camera_entries`` (iteration, block) pairs."""
    return 2 * geometry.camera_entries * geometry.camera_width * geometry.element_size


def camera_bytes_bound(config: CacheConfig, geometry: CacheGeometry) -> Optional[int]:
    """The most bytes the camera cache can hold: during a step, the pinned frames, the window and the
    step's chunk. None where ``camera_window`` is None (it grows with the stream); 0 without a
    camera head."""
    per_frame = camera_bytes_per_frame(geometry)
    if per_frame == 0:
        return 0
    if config.camera_window is None:
        return None
    return (len(config.pinned_frames) + config.camera_window + config.chunk) * per_frame


def camera_budget_share(config: CacheConfig, geometry: CacheGeometry) -> int:
    """The part of ``config.memory_budget_bytes`` the camera cache reserves; a budget needs a bound."""
    bound = camera_bytes_bound(config, geometry)
    if bound is None:
        if config.memory_budget_bytes is not None:
            raise ValueError("a memory budget needs a bounded camera_window")
        return 0
    return bound


class CameraCache:
    """One stream's camera-trunk cache (see the module docstring)."""

    def __init__(self, config: CacheConfig, geometry: CacheGeometry) -> None:
        self.config = config
        self.geometry = geometry
        self.window = config.camera_window
        self.pinned_frames = tuple(config.pinned_frames)
        self.keys: dict[Entry, Tensor] = {}  # [H, N, D] per entry
        self.values: dict[Entry, Tensor] = {}
        self.frames = torch.zeros(0, dtype=torch.long)  # stream index of each cached token (host)
        self._pending = 0

    def prepare(self, iteration: int, block: int, k: Tensor, v: Tensor) -> KeySet:
        """Store the step's keys/values [H, M, D]; return every key/value to attend to [H, N, D]."""
        entry = (iteration, block)
        self._pending = k.shape[1]
        if entry in self.keys:
            k = torch.cat([self.keys[entry], k], dim=1)
            v = torch.cat([self.values[entry], v], dim=1)
        self.keys[entry], self.values[entry] = k, v
        return KeySet(k, v)

    def attend(self, iteration: int, block: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention of one stream's step queries q [1, H, M, D] over its cache (the model's
        ``CameraAttention`` for a single stream)."""
        if q.shape[0] != 1:
            raise ValueError("a camera cache serves one stream: batch size must be 1")
        keys = self.prepare(iteration, block, k[0], v[0])
        return F.scaled_dot_product_attention(q, keys.k[None], keys.v[None])

    def end_step(self, frame_offset: int) -> None:
        """Record the step's frames and drop those that fell out of the window."""
        new = torch.arange(frame_offset, frame_offset + self._pending)
        self.frames = torch.cat([self.frames, new])
        self._pending = 0
        if self.window is None or not self.keys:
            return
        latest = int(self.frames.max())
        keep = self.frames > latest - self.window
        for f in self.pinned_frames:
            keep |= self.frames == f
        if bool(keep.all()):
            return
        idx = keep.nonzero().squeeze(1)
        self.frames = self.frames[idx]
        # One host-to-device copy for all entries, through pinned memory so that the host does not
        # wait for the GPU's queued work (a plain copy from pageable memory would).
        device = next(iter(self.keys.values())).device
        device_idx = idx.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else idx.to(device)
        for entry in self.keys:
            self.keys[entry] = self.keys[entry].index_select(1, device_idx)
            self.values[entry] = self.values[entry].index_select(1, device_idx)

    def memory_bytes(self) -> int:
        """Bytes of every key/value tensor held, exactly."""
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))

    def bytes_bound(self) -> Optional[int]:
        """The most bytes ``memory_bytes`` can ever be; None while the window is unbounded."""
        return camera_bytes_bound(self.config, self.geometry)

    def reset(self) -> None:
        """Forget the stream (free all memory)."""
        self.keys.clear()
        self.values.clear()
        self.frames = torch.zeros(0, dtype=torch.long)
        self._pending = 0

    # ------------------------------------------------------------------ state
    def export_state(self) -> dict[str, Tensor]:
        """The cache as plain tensors (copies), between steps:

        ``entry [E, 2]`` int64 (iteration, block) of each entry, ``k``/``v`` [E, H, N, D] and
        ``frame [N]`` int64 (stream index of each cached token; every entry holds the same frames).
        """
        if self._pending:
            raise RuntimeError("export_state() is only valid between steps")
        entries = sorted(self.keys)
        if entries:
            k = torch.stack([self.keys[e] for e in entries])
            v = torch.stack([self.values[e] for e in entries])
        else:
            k = torch.zeros(0, 0, 0, 0, dtype=self.geometry.dtype, device=self.geometry.device)
            v = k.clone()
        return {
            "entry": torch.tensor(entries, dtype=torch.int64).reshape(-1, 2),
            "k": k,  # stacked: already copies
            "v": v,
            "frame": self.frames.clone(),
        }

    def import_state(self, state: dict[str, Tensor]) -> None:
        """Replace the cache by one ``export_state`` returned (the tensors are copied)."""
        check_state_names("camera cache", state, ("entry", "k", "v", "frame"))
        entries = [tuple(int(x) for x in e) for e in state["entry"].tolist()]
        k, v, frame = state["k"], state["v"], state["frame"]
        if k.shape[:1] != (len(entries),) or v.shape != k.shape or (entries and k.shape[2] != frame.shape[0]):
            raise ValueError(f"camera cache state: inconsistent shapes entry {tuple(state['entry'].shape)}, "
                             f"k {tuple(k.shape)}, v {tuple(v.shape)}, frame {tuple(frame.shape)}")
        self.reset()
        device = self.geometry.device
        for i, entry in enumerate(entries):
            self.keys[entry] = k[i].to(device).clone()
            self.values[entry] = v[i].to(device).clone()
        self.frames = frame.to("cpu", torch.long).clone()

