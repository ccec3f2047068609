"""``CacheConfig``: which policy bounds a stream's cache, with its sizes, validated up front.

Sizes are in frame-equivalents (one frame = tokens_per_frame tokens per layer and head) like the
STAC reference; defaults are the reference settings. ``memory_budget_bytes`` optionally caps a
stream's total cache memory: bounded policies check that their fixed part fits and the ``stac``
policy gives what is left to its voxel pool.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

POLICIES = ("full", "window", "sink_window", "heavy_hitter", "stac")
STORES = ("compact", "slots")
DEFAULT_CAMERA_WINDOW = 64


@dataclass(frozen=True)
class CacheConfig:
    policy: str = "stac"
    chunk: int = 4  # frames per step
    window: int = 4  # most recent frames always kept
    pinned_frames: tuple[int, ...] = (0,)  # always kept (attention sink); sink_window / heavy_hitter / stac
    hh: int = 2  # heavy-hitter frame-equivalents kept by decayed attention score
    gamma: float = 0.9  # score decay per step
    retrieval: int = 2  # frame-equivalents of pooled tokens retrieved per step (stac)
    # No retrieval before this many frames. None = the reference rule: retrieve once the step's
    # first frame index exceeds max(chunk + pinned + window + hh, 16) (frame 20 at the defaults).
    retrieval_start_frame: Optional[int] = None
    retrieval_every: Optional[int] = None  # steps between retrievals; default max(1, window // chunk)
    retrieval_radius: int = 2  # voxels (Chebyshev) around the window's voxels
    include_buffer: bool = False  # also retrieve buffered raw tokens (bias 0) after the pivots
    # Within a step: retrieve from the pool as it was before this step's evictions, then prune and
    # file them (the reference order); False prunes and files first, then retrieves.
    retrieve_before_prune: bool = True
    # A patch token's position: "centre" samples the point map at the patch centre (bilinear, as
    # the reference resizes it); "mean" averages the points and confidences over the patch.
    patch_position: str = "centre"
    voxel_size: float = 0.05
    conf_threshold: float = 2.0  # tokens whose point confidence is not above this are not pooled
    buffer_size: int = 8
    max_pivots: int = 4
    merge_cos: float = 0.8
    # Pool tokens per (layer, head, voxel) that did not fit a full buffer and are carried over to
    # the next insert (the reference carries them all, without bound); beyond it they are dropped.
    pool_carry_slots: int = 8
    # Hard cap of the voxel pool per stream. The reference grows it without bound; 256 voxels hold
    # 1,024 pivots and 4,096 raw token slots per (layer, head) (0.52 GB for vggt-1b in bf16). Chosen
    # so that 48 streams of vggt-1b at 518x392 fit an 80 GB H100 (docs/performance.md, "Memory
    # bound"); it is also the pool's first allocation, so a default pool never grows inside a step.
    max_voxels: Optional[int] = 256
    memory_budget_bytes: Optional[int] = None  # cap of all cache memory of a stream
    # Camera-trunk history (one token per frame): frames kept besides the pinned ones. None keeps
    # all (the default of ``full``); bounded policies default to 64 frames.
    camera_window: Optional[int] = -1
    # full only: capacity factor of each layer's key/value buffer. 1.0 re-makes an exactly sized
    # tensor every step (a copy of the whole cache per step, as the reference code does); e.g. 1.25
    # keeps up to 25% spare so that steps append in place (see cache/full.py).
    full_growth: float = 1.0
    # heavy_hitter / stac only: how each layer's hot store is held. "compact" joins a step's new
    # tokens onto the store and gathers the kept ones after pruning (two copies of the store per
    # step), in time order. "slots" preallocates the store at its resting bound (pinned + window +
    # hh frames, plus one sink slot) and writes in place: a step's new tokens are attended beside it
    # and the kept ones fill the slots evicted tokens left (cache/slot_store.py). Same tokens kept
    # and pooled, the same memory bound; the attention sums its keys in another order, so outputs
    # agree to float rounding, not bit for bit.
    store: str = "compact"
    # heavy_hitter / stac only: score keys from every N-th query of the step instead of all of them
    # (rows 0, N, 2N, ... of the step's tokens; the sum is scaled by queries / rows used). 1 is
    # STAC's rule. A larger N makes the attention's key-mass pass N times cheaper; the scores
    # become an estimate, so which tokens are kept can change.
    mass_query_stride: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "pinned_frames", tuple(int(f) for f in self.pinned_frames))
        if self.camera_window == -1:  # "default": unbounded for full, 64 frames otherwise
            object.__setattr__(self, "camera_window", None if self.policy == "full" else DEFAULT_CAMERA_WINDOW)
        self.validate()

    def validate(self) -> None:
        problems = []
        if self.policy not in POLICIES:
            problems.append(f"unknown cache policy {self.policy!r}; choose one of {POLICIES}")
        for name in ("chunk", "window", "buffer_size", "max_pivots", "mass_query_stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        for name in ("hh", "retrieval", "retrieval_radius", "pool_carry_slots"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                problems.append(f"{name} must be a non-negative integer, got {value!r}")
        if self.retrieval_start_frame is not None and (not isinstance(self.retrieval_start_frame, int)
                                                        or self.retrieval_start_frame < 0):
            problems.append(f"retrieval_start_frame must be a non-negative integer or None, got {self.retrieval_start_frame!r}")
        if self.store not in STORES:
            problems.append(f"store must be one of {STORES}, got {self.store!r}")
        elif self.store == "slots" and self.policy not in ("heavy_hitter", "stac"):
            problems.append(f"store='slots' is implemented for the heavy_hitter and stac policies, not {self.policy!r}")
        if self.patch_position not in ("centre", "mean"):
            problems.append(f"patch_position must be 'centre' or 'mean', got {self.patch_position!r}")
        if self.camera_window is not None and (not isinstance(self.camera_window, int) or self.camera_window < 1):
            problems.append(f"camera_window must be a positive integer or None, got {self.camera_window!r}")
        if self.retrieval_every is not None and (not isinstance(self.retrieval_every, int) or self.retrieval_every < 1):
            problems.append(f"retrieval_every must be a positive integer, got {self.retrieval_every!r}")
        if not (isinstance(self.gamma, (int, float)) and 0 < self.gamma <= 1):
            problems.append(f"gamma must lie in (0, 1], got {self.gamma!r}")
        if not (isinstance(self.voxel_size, (int, float)) and math.isfinite(self.voxel_size) and self.voxel_size > 0):
            problems.append(f"voxel_size must be a positive number, got {self.voxel_size!r}")
        if not math.isfinite(float(self.conf_threshold)):
            problems.append("conf_threshold must be finite")
        if not (isinstance(self.full_growth, (int, float)) and math.isfinite(self.full_growth) and self.full_growth >= 1):
            problems.append(f"full_growth must be a number >= 1, got {self.full_growth!r}")
        if not -1 <= self.merge_cos <= 1:
            problems.append(f"merge_cos must lie in [-1, 1], got {self.merge_cos!r}")
        if self.max_voxels is not None and (not isinstance(self.max_voxels, int) or self.max_voxels < 1):
            problems.append(f"max_voxels must be a positive integer or None, got {self.max_voxels!r}")
        if self.memory_budget_bytes is not None and (not isinstance(self.memory_budget_bytes, int) or self.memory_budget_bytes <= 0):
            problems.append(f"memory_budget_bytes must be a positive integer or None, got {self.memory_budget_bytes!r}")
        if any(f < 0 for f in self.pinned_frames):
            problems.append("pinned_frames must be frame indices >= 0")
        if self.policy != "full" and isinstance(self.chunk, int) and isinstance(self.window, int) and self.chunk > self.window:
            problems.append(f"chunk ({self.chunk}) may not be larger than the window ({self.window}): "
                            "frames of the current chunk would fall out of the window they were just added to")
        if problems:
            raise ValueError("invalid CacheConfig: " + "; ".join(problems))

    @property
    def refresh_steps(self) -> int:
        return self.retrieval_every or max(1, self.window // self.chunk)

    @property
    def first_retrieval_frames(self) -> int:
        """Frames seen after the first step that may retrieve (for steps of ``chunk`` frames)."""
        if self.retrieval_start_frame is not None:
            return self.retrieval_start_frame
        return max(self.chunk + len(self.pinned_frames) + self.window + self.hh, 16) + 1 + self.chunk

    def retrieves_at(self, first_frame: int, num_frames: int, step: int) -> bool:
        """Whether the step of frames first_frame .. first_frame + num_frames - 1 (the
        ``step``-th, counted from 1) retrieves from the voxel pool."""
        if not self.retrieval:
            return False
        if self.retrieval_start_frame is None:
            hot = self.chunk + len(self.pinned_frames) + self.window + self.hh
            started = first_frame > max(hot, 16)
        else:
            started = first_frame + num_frames >= self.retrieval_start_frame
        return started and step % self.refresh_steps == 0

    def replace(self, **changes: Any) -> "CacheConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CacheConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown CacheConfig fields: {unknown}")
        return cls(**data)

    @classmethod
    def unbounded(cls, policy: str, frames: int, **changes: Any) -> "CacheConfig":
        """Sizes large enough that nothing is ever evicted from a stream of ``frames`` frames."""
        return cls(policy=policy, window=max(frames, 4), hh=frames, camera_window=None, **changes)
