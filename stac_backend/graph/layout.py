"""The explicit, fixed-budget state of one exported streaming step.

The exported step is a pure function ``(images, frame_offset, state) -> (outputs, new state)``.
``StepLayout`` says which tensors make up the state for a policy, their shapes (without the
leading batch dimension, one row per stream) and how an empty stream's state looks. The same
layout is used to export the graph, to build an empty stream's state in every runtime (torch,
ONNX Runtime, TensorRT) and to render Triton's implicit-state configuration, so they cannot drift
apart. It travels inside the ONNX file as JSON metadata (``stac.layout``).

Budgets (in tokens per layer and head unless said otherwise; P = tokens per frame):

``full``
    ``kv_k/kv_v [L, H, max_frames * P, D]`` + ``kv_len [1]`` (tokens held, the same for every layer).
``heavy_hitter`` / ``stac``
    hot store ``hot_* [L, H, (pinned + window + hh) * P, ...]`` (what a head holds after pruning;
    the step's new tokens are appended inside the step) + ``hot_len [L]``;
    ``stac`` adds the retrieved tokens ``ret_* [L, H, retrieval * P, ...]`` and the voxel pool at
    its cap ``pool_* [L, H, max_voxels, ...]`` (``VoxelPool``'s own dense tensors, its
    ``pool_carry_slots`` carried-over tokens per row included) + ``steps [1]``.
camera trunk (every policy)
    ``cam_k/cam_v [iterations * trunk_depth, heads, F_cam, 2 * embed_dim / heads]`` and
    ``cam_frame [F_cam]`` (-1 = empty slot); F_cam = pinned + camera_window (bounded policies) or
    max_frames (``full`` with an unbounded camera window).

Every state tensor appears twice in the graph: input ``in_<name>`` and output ``out_<name>``
(names sort in the same order in both lists, as Triton's implicit state requires).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..cache import CacheConfig, CacheGeometry, StacCache, geometry_of
from ..cache.voxel_pool import VoxelPool
from ..model.config import ModelConfig

EXPORTED_POLICIES = ("full", "heavy_hitter", "stac")
OUTPUTS = ("depth", "depth_conf", "world_points", "world_points_conf", "pose_enc", "extrinsics", "intrinsics")
# piv_k, piv_v, ..., car_k, ..., row_last_used: every tensor of the voxel pool (its carried-over
# tokens included; pool_carry_slots = 0 gives them a zero-size carry axis)
POOL_FIELDS = tuple(VoxelPool.state_specs(1, 1, 1, 1, torch.float32, 1, 2))
LAYOUT_METADATA_KEY = "stac.layout"

_DTYPES = {"float32": torch.float32, "int32": torch.int32, "int64": torch.int64, "bool": torch.bool}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class StateTensor:
    """One state tensor: shape without the batch dim; ``dims`` names each axis (a name = a budget
    axis that is dynamic in the exported graph, None = fixed by the model)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: float
    dims: tuple[Optional[str], ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    def empty(self, batch: int = 1, device="cpu") -> Tensor:
        return torch.full((batch,) + self.shape, self.fill, dtype=self.dtype, device=device)


@dataclass(frozen=True)
class StepLayout:
    model: ModelConfig
    cache: CacheConfig
    height: int
    width: int
    max_frames: Optional[int] = None  # frames a stream may hold: required for full (and unbounded camera windows)

    def __post_init__(self) -> None:
        c, m = self.cache, self.model
        problems = []
        if c.policy not in EXPORTED_POLICIES:
            problems.append(f"policy {c.policy!r} cannot be exported; choose one of {EXPORTED_POLICIES}")
        if self.height % m.patch_size or self.width % m.patch_size or self.height <= 0 or self.width <= 0:
            problems.append(f"height and width must be positive multiples of {m.patch_size}, got {self.height}x{self.width}")
        needs_frames = c.policy == "full" or c.camera_window is None
        if needs_frames and (not isinstance(self.max_frames, int) or self.max_frames < 1):
            problems.append(f"policy {c.policy!r} (camera_window={c.camera_window}) needs max_frames, the stream length "
                            "the fixed-size state is allocated for")
        if c.policy == "stac" and c.patch_position != "centre":
            problems.append(f"patch_position={c.patch_position!r} is not exported: the exported step samples the point "
                            "map at each patch centre (patch_position='centre')")
        if c.mass_query_stride != 1:
            problems.append(f"mass_query_stride={c.mass_query_stride} is not exported: the exported attention op sums "
                            "each key's mass over every query (mass_query_stride=1)")
        if not (m.enable_camera and m.enable_depth and m.enable_point):
            problems.append("the exported step needs the camera, depth and point heads")
        if problems:
            raise ValueError("invalid export layout: " + "; ".join(problems))

    # ------------------------------------------------------------------ sizes
    @property
    def policy(self) -> str:
        return self.cache.policy

    @property
    def tokens_per_frame(self) -> int:
        return self.model.tokens_per_frame(self.height, self.width)

    @property
    def geometry(self) -> CacheGeometry:
        return geometry_of(self.model, torch.float32, "cpu")

    @property
    def hot_tokens(self) -> int:
        c = self.cache
        return (len(c.pinned_frames) + c.window + c.hh) * self.tokens_per_frame

    @property
    def retrieved_tokens(self) -> int:
        return self.cache.retrieval * self.tokens_per_frame

    @property
    def voxels(self) -> int:
        return StacCache(self.cache, self.geometry).pool_voxels(self.tokens_per_frame)

    @property
    def camera_frames(self) -> int:
        c = self.cache
        if c.camera_window is None:
            return int(self.max_frames)
        return len(c.pinned_frames) + c.camera_window

    @property
    def camera_entries(self) -> int:
        return self.model.camera_iterations * self.model.camera_trunk_depth

    @property
    def max_chunk(self) -> int:
        return self.cache.chunk

    # ------------------------------------------------------------------ state
    def state(self) -> list[StateTensor]:
        m, c = self.model, self.cache
        L, H, D = m.depth, m.num_heads, m.head_dim
        out: list[StateTensor] = []
        f32, i32, i64 = torch.float32, torch.int32, torch.int64
        nan = float("nan")
        if c.policy == "full":
            N = int(self.max_frames) * self.tokens_per_frame
            out += [
                StateTensor("kv_k", (L, H, N, D), f32, 0.0, (None, None, "kv_tokens", None)),
                StateTensor("kv_v", (L, H, N, D), f32, 0.0, (None, None, "kv_tokens", None)),
                StateTensor("kv_len", (1,), i64, 0, (None,)),
            ]
        else:
            N = self.hot_tokens
            ax = (None, None, "hot_tokens")
            out += [
                StateTensor("hot_k", (L, H, N, D), f32, 0.0, ax + (None,)),
                StateTensor("hot_v", (L, H, N, D), f32, 0.0, ax + (None,)),
                StateTensor("hot_frame", (L, H, N), i32, -1, ax),
                StateTensor("hot_index", (L, H, N), i32, 0, ax),
                StateTensor("hot_score", (L, H, N), f32, 0.0, ax),
                StateTensor("hot_pos", (L, H, N, 3), f32, nan, ax + (None,)),
                StateTensor("hot_len", (L,), i64, 0, (None,)),
            ]
        if c.policy == "stac":
            T = self.retrieved_tokens
            ax = (None, None, "ret_tokens")
            out += [
                StateTensor("ret_k", (L, H, T, D), f32, 0.0, ax + (None,)),
                StateTensor("ret_v", (L, H, T, D), f32, 0.0, ax + (None,)),
                StateTensor("ret_bias", (L, H, T), f32, float("-inf"), ax),
                StateTensor("ret_valid", (L, H, T), torch.bool, False, ax),
            ]
            V = self.voxels
            for name, f in VoxelPool.state_specs(V, L, H, D, f32, c.buffer_size, c.max_pivots,
                                                 carry_slots=c.pool_carry_slots).items():
                dims = tuple("voxels" if axis == f.voxel_axis else None for axis in range(len(f.shape)))
                out.append(StateTensor("pool_" + name, f.shape, f.dtype, f.fill, dims))
            out.append(StateTensor("steps", (1,), i64, 0, (None,)))
        E, Hc = self.camera_entries, m.camera_num_heads
        Dc = 2 * m.embed_dim // Hc
        Fc = self.camera_frames
        out += [
            StateTensor("cam_k", (E, Hc, Fc, Dc), f32, 0.0, (None, None, "cam_frames", None)),
            StateTensor("cam_v", (E, Hc, Fc, Dc), f32, 0.0, (None, None, "cam_frames", None)),
            StateTensor("cam_frame", (Fc,), i64, -1, ("cam_frames",)),
        ]
        return out

    def state_names(self) -> list[str]:
        return [s.name for s in self.state()]

    def empty_state(self, batch: int = 1, device="cpu") -> dict[str, Tensor]:
        return {s.name: s.empty(batch, device) for s in self.state()}

    def state_bytes(self) -> int:
        """Bytes of one stream's state (what it holds, always: the budgets are allocated up front)."""
        return sum(s.nbytes for s in self.state())

    def frames_capacity(self) -> Optional[int]:
        """Most frames a stream may push (None: unbounded)."""
        if self.cache.policy == "full" or self.cache.camera_window is None:
            return int(self.max_frames)
        return None

    # ------------------------------------------------------------------ (de)serialisation
    def to_json(self) -> str:
        return json.dumps(
            {
                "model": self.model.to_dict(),
                "cache": self.cache.to_dict(),
                "height": self.height,
                "width": self.width,
                "max_frames": self.max_frames,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> "StepLayout":
        d = json.loads(text)
        cache = dict(d["cache"])
        cache["pinned_frames"] = tuple(cache["pinned_frames"])
        return cls(ModelConfig.from_dict(d["model"]), CacheConfig.from_dict(cache), int(d["height"]), int(d["width"]),
                   d.get("max_frames"))


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]
