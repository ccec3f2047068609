"""The interface between a stream and the policy that manages its global-attention key/value cache.

A ``CachePolicy`` instance belongs to one stream. The model calls ``attend(layer, q, k, v)`` at each
global-attention layer of a step (q, k, v after q/k norm and RoPE, [B, heads, N_step, head_dim]);
the policy decides which keys/values of earlier steps take part, stores what it wants to keep of
the new ones, and returns the attention output. Before the forward the engine calls
``begin_step(info)`` (which frames the step holds); after the heads have run it calls
``end_step(info)`` so the policy can do its end-of-step work (score decay, pruning, pooling) with
the step's predictions at hand (e.g. world points, for spatial policies).

Every policy also answers the same questions of memory and state: ``memory_bytes()`` (held now,
exactly), ``bytes_bound(tokens_per_frame)`` (the most it can hold; None where unbounded),
``resting_bytes_bound(tokens_per_frame)`` (the most it holds between steps: a step's new tokens
stay in the store only until the step's end prunes them, so that share is part of the step's
memory, paid by the streams being stepped, not by every stream at once) and
``export_state()`` / ``import_state(state)`` (its content as plain tensors, to move or restore a
stream between steps).

Policies know nothing of Triton or of the model beyond this contract; the model knows nothing of
policies beyond ``attend``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .key_sets import KeySet, attend_key_sets


@dataclass(frozen=True)
class CacheGeometry:
    """The numbers of the model a policy needs (and nothing more about it)."""

    num_layers: int  # global-attention layers
    num_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    # The camera trunk's cache (cache/camera.py): a key and a value of camera_width numbers per
    # frame for each of camera_entries (iteration, block) pairs; 0 without a camera head. Policies
    # reserve its share of a memory budget.
    camera_entries: int = 0
    camera_width: int = 0

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


def geometry_of(config, dtype: torch.dtype = torch.float32, device: str = "cpu") -> CacheGeometry:
    """The numbers of a model the caches need, from its configuration (a ``model.ModelConfig``, read
    by attribute so that this layer needs no import of the model): its global-attention layers and,
    for the camera cache, the camera trunk's (iteration, block) entries and their key width
    (2 * embed_dim)."""
    c = config
    entries = c.camera_iterations * c.camera_trunk_depth if c.enable_camera else 0
    return CacheGeometry(c.depth, c.num_heads, c.head_dim, dtype, str(device), camera_entries=entries,
                         camera_width=2 * c.embed_dim if c.enable_camera else 0)


@dataclass
class StepInfo:
    """What a policy may use at the end of a step."""

    frame_offset: int  # stream index of the step's first frame
    num_frames: int  # frames in this step (the chunk)
    tokens_per_frame: int
    patch_start_idx: int  # index of the first patch token in a frame
    grid_hw: tuple[int, int]  # patch grid (rows, cols)
    world_points: Optional[Tensor] = None  # [B, C, H, W, 3] point-head output
    world_points_conf: Optional[Tensor] = None  # [B, C, H, W]


class CachePolicy(ABC):
    """One stream's global-attention cache under some retention rule.

    Attention is split in two so that the engine can run one attention call for many streams:
    ``prepare`` stores the step's new keys and returns everything to attend to; the engine
    attends (with per-key mass if asked); ``absorb`` takes the mass back (e.g. to update scores).
    ``attend`` does all three for a single stream.
    """

    #: short name used in configs, logs and benchmark files
    name: str = "base"
    #: tokens evicted so far (a host-side count; policies that evict keep it up to date)
    evicted_tokens: int = 0

    @abstractmethod
    def prepare(self, layer: int, k: Tensor, v: Tensor) -> KeySet:
        """Store the step's new keys/values k, v [H, M, D]; return the key set to attend to."""

    def absorb(self, layer: int, mass: Optional[Tensor], num_queries: int) -> None:
        """Per-key probability mass [H, Nk] (summed over the step's queries) of the last prepare()."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention of one stream's step queries q [1, H, M, D] over its key set."""
        if q.shape[0] != 1:
            raise ValueError("a cache policy serves one stream: batch size must be 1")
        out, masses = attend_key_sets(q, [self.prepare(layer, k[0], v[0])])
        self.absorb(layer, masses[0], q.shape[2])
        return out

    def begin_step(self, info: StepInfo) -> None:
        """Called before the step's forward (predictions in ``info`` are not known yet)."""

    def end_step(self, info: StepInfo) -> None:
        """End-of-step maintenance; the default keeps everything as stored by ``attend``."""

    @abstractmethod
    def memory_bytes(self) -> int:
        """Bytes of every tensor this policy holds for its stream, exactly."""

    def bytes_bound(self, tokens_per_frame: int) -> Optional[int]:
        """The most bytes ``memory_bytes`` can ever be for frames of ``tokens_per_frame`` tokens
        (exactly: a long enough stream reaches it); None where the policy is unbounded. The camera
        cache states its own bound; a stream's bound is the sum."""
        return None

    def resting_bytes_bound(self, tokens_per_frame: int) -> Optional[int]:
        """The most bytes ``memory_bytes`` can be between steps (exactly: a long enough stream
        reaches it); None where unbounded. During a step a bounded store also holds the step's new
        tokens until ``end_step`` prunes them: ``bytes_bound`` minus this is that share, which a
        step adds for each stream it runs (admission counts it in the step's measured memory)."""
        return self.bytes_bound(tokens_per_frame)

    @abstractmethod
    def reset(self) -> None:
        """Forget the stream (free all memory)."""

    def stats(self) -> dict:
        """Numbers for logs and metrics (tokens retained, evictions, ...)."""
        return {"memory_bytes": self.memory_bytes()}

    def export_state(self) -> dict[str, Tensor]:
        """The stream's cache as plain tensors (copies, stable names; counters as 0-d int64), between
        steps. ``import_state`` into a policy built with the same configuration and geometry
        continues the stream exactly as this one would."""
        raise NotImplementedError(f"{type(self).__name__} does not export its state")

    def import_state(self, state: dict[str, Tensor]) -> None:
        """Replace this policy's content by a state ``export_state`` returned (tensors are copied)."""
        raise NotImplementedError(f"{type(self).__name__} does not import a state")


def check_state_names(what: str, state: dict[str, Tensor], required: Sequence[str], optional: Sequence[str] = ()) -> None:
    """Refuse a state with missing or unknown tensors, naming them."""
    missing = [n for n in required if n not in state]
    unknown = sorted(set(state) - set(required) - set(optional))
    if missing or unknown:
        raise ValueError(f"{what} state: missing {missing}, unknown {unknown}")
