"""Frame-window baselines: the last W frames (``window``), or frame 0 plus the last W frames
(``sink_window``, STream3R's window mode / StreamingLLM's attention sink).

Memory is flat: at most (pinned + W + chunk) frames of tokens per layer, whatever the stream length.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .base import CacheGeometry, CachePolicy, KeySet, StepInfo, check_state_names
from .camera import camera_budget_share
from .config import CacheConfig
from .token_store import LayerTokens, bytes_per_token, export_layers, import_layers, step_token_ids


class WindowCache(CachePolicy):
    name = "window"

    def __init__(self, config: CacheConfig, geometry: CacheGeometry, pinned_frames: tuple[int, ...] = ()):
        self.config = config
        self.geometry = geometry
        self.window = config.window
        self.pinned = tuple(pinned_frames)
        self.layers: dict[int, LayerTokens] = {}
        self.evicted_tokens = 0
        self._step: Optional[StepInfo] = None

    def begin_step(self, info: StepInfo) -> None:
        budget = self.config.memory_budget_bytes
        if budget is not None:
            need = self.bytes_bound(info.tokens_per_frame) + camera_budget_share(self.config, self.geometry)
            if need > budget:
                raise ValueError(f"memory budget {budget} B is too small for a {self.name} cache of {self.window} frames "
                                 f"at {info.tokens_per_frame} tokens/frame (needs {need} B with the camera cache)")
        self._step = info

    def bytes_bound(self, tokens_per_frame: int) -> int:
        """During a step: the pinned frames, the window and the step's chunk, whole."""
        return self._frames_bytes(len(self.pinned) + self.window + self.config.chunk, tokens_per_frame)

    def resting_bytes_bound(self, tokens_per_frame: int) -> int:
        """Between steps: the pinned frames and the window, whole."""
        return self._frames_bytes(len(self.pinned) + self.window, tokens_per_frame)

    def _frames_bytes(self, frames: int, tokens_per_frame: int) -> int:
        g = self.geometry
        return g.num_layers * g.num_heads * frames * tokens_per_frame * bytes_per_token(g.head_dim, g.element_size, False, False)

    def prepare(self, layer: int, k: Tensor, v: Tensor) -> KeySet:
        if self._step is None:
            raise RuntimeError("begin_step() must be called before attention")
        store = self.layers.get(layer)
        frame, index = step_token_ids(k.shape[0], self._step.frame_offset, self._step.num_frames, self._step.tokens_per_frame, k.device)
        if store is None:
            store = self.layers[layer] = LayerTokens(k, v, frame, index, None, None)
        else:
            store.append(k, v, frame, index, None, None)
        return KeySet(store.k, store.v)

    def end_step(self, info: StepInfo) -> None:
        latest = info.frame_offset + info.num_frames - 1
        # Every layer and head holds the same frames in the same order, so which tokens stay is
        # decided once (one host synchronisation per step, not one per layer).
        keep_idx = None
        for layer, store in self.layers.items():
            if keep_idx is None:
                frames = store.frame[0]
                keep = frames > latest - self.window
                for f in self.pinned:
                    keep |= frames == f
                if bool(keep.all()):
                    break
                keep_idx = keep.nonzero().squeeze(1)
            self.evicted_tokens += store.frame.shape[0] * (store.num_tokens - keep_idx.numel())
            self.layers[layer] = store.select(keep_idx.expand(store.frame.shape[0], -1))
        self._step = None

    def memory_bytes(self) -> int:
        return sum(s.memory_bytes() for s in self.layers.values())

    def reset(self) -> None:
        self.layers.clear()
        self.evicted_tokens = 0
        self._step = None

    def stats(self) -> dict:
        tokens = next(iter(self.layers.values())).num_tokens if self.layers else 0
        return {"memory_bytes": self.memory_bytes(), "tokens": tokens, "evicted_tokens": self.evicted_tokens}

    def export_state(self) -> dict[str, Tensor]:
        """``hot_k``/``hot_v`` [L, H, N, D], ``hot_frame``/``hot_index`` [L, H, N] and ``evicted_tokens``."""
        if self._step is not None:
            raise RuntimeError("export_state() is only valid between steps")
        g = self.geometry
        state = export_layers(self.layers, g.num_heads, g.head_dim, g.dtype, g.device, False, False)
        state["evicted_tokens"] = torch.tensor(self.evicted_tokens, dtype=torch.int64)
        return state

    def import_state(self, state: dict[str, Tensor]) -> None:
        check_state_names(self.name, state, ("hot_k", "hot_v", "hot_frame", "hot_index", "evicted_tokens"))
        g = self.geometry
        layers = import_layers(state, g.num_heads, g.head_dim, g.device, False, False)
        self.reset()
        self.layers = layers
        self.evicted_tokens = int(state["evicted_tokens"])


class SinkWindowCache(WindowCache):
    name = "sink_window"

    def __init__(self, config: CacheConfig, geometry: CacheGeometry):
        super().__init__(config, geometry, pinned_frames=config.pinned_frames)
