"""Configuration of the VGGT-family network.

Field names mirror the constructor arguments of the original VGGT code (Aggregator, CameraHead,
DPTHead), so any configuration of that code can be written down here and its state dict loads
strictly. Two presets: ``vggt-1b`` (the released VGGT / StreamVGGT / STream3R sizes) and ``tiny``
(a test and demo size that streams 32 frames on a laptop CPU in seconds).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

# Patch-embed kinds the original code accepts: a plain conv, or a DINOv2 ViT with registers.
# For the ViTs the width/depth/heads are fixed by the variant (DINOv2's vit_small/base/large/giant2).
DINO_VARIANTS: dict[str, dict[str, int]] = {
    "dinov2_vits14_reg": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "dinov2_vitb14_reg": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "dinov2_vitl14_reg": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
    "dinov2_vitg2_reg": {"embed_dim": 1536, "depth": 40, "num_heads": 24},
}
PATCH_EMBED_KINDS = ("conv",) + tuple(DINO_VARIANTS)


@dataclass(frozen=True)
class ModelConfig:
    # --- aggregator (names as in the original Aggregator constructor) ---
    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    patch_embed: str = "dinov2_vitl14_reg"
    aa_order: tuple[str, ...] = ("frame", "global")
    aa_block_size: int = 1
    qk_norm: bool = True
    rope_freq: float = 100.0
    init_values: float = 0.01
    # --- camera head ---
    camera_trunk_depth: int = 4
    camera_num_heads: int = 16
    camera_mlp_ratio: float = 4.0
    camera_init_values: float = 0.01
    camera_iterations: int = 4
    # --- DPT heads (depth, points; the track head's feature extractor uses the same layout) ---
    dpt_features: int = 256
    dpt_out_channels: tuple[int, ...] = (256, 512, 1024, 1024)
    dpt_intermediate_layer_idx: tuple[int, ...] = (4, 11, 17, 23)
    # --- which heads exist (released checkpoints have all four) ---
    enable_camera: bool = True
    enable_depth: bool = True
    enable_point: bool = True
    enable_track: bool = True
    # --- track head (parameters only; see track_head.py) ---
    track_features: int = 128
    track_corr_levels: int = 7
    track_corr_radius: int = 4
    track_hidden_size: int = 384
    track_depth: int = 6
    track_num_virtual_tracks: int = 64

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise list arguments to tuples so configs are hashable.
        for name in ("aa_order", "dpt_out_channels", "dpt_intermediate_layer_idx"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        problems = []
        if self.patch_embed not in PATCH_EMBED_KINDS:
            problems.append(f"patch_embed must be one of {PATCH_EMBED_KINDS}, got {self.patch_embed!r}")
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        elif (self.embed_dim // self.num_heads) % 4 and self.rope_freq > 0:
            problems.append("2D RoPE needs a head dim divisible by 4")
        if self.depth % self.aa_block_size:
            problems.append(f"depth {self.depth} must be divisible by aa_block_size {self.aa_block_size}")
        if set(self.aa_order) - {"frame", "global"}:
            problems.append(f"aa_order may only name 'frame' and 'global', got {self.aa_order}")
        if len(self.dpt_out_channels) != 4 or len(self.dpt_intermediate_layer_idx) != 4:
            problems.append("dpt_out_channels and dpt_intermediate_layer_idx need 4 entries each")
        if any(not 0 <= i < self.depth for i in self.dpt_intermediate_layer_idx):
            problems.append(f"dpt_intermediate_layer_idx {self.dpt_intermediate_layer_idx} outside 0..{self.depth - 1}")
        if (2 * self.embed_dim) % self.camera_num_heads:
            problems.append("camera head width (2 * embed_dim) must be divisible by camera_num_heads")
        if self.img_size % self.patch_size:
            problems.append(f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        if self.patch_embed in DINO_VARIANTS and DINO_VARIANTS[self.patch_embed]["embed_dim"] != self.embed_dim:
            problems.append(
                f"{self.patch_embed} produces {DINO_VARIANTS[self.patch_embed]['embed_dim']}-dim tokens "
                f"but embed_dim is {self.embed_dim}"
            )
        if self.camera_iterations < 1:
            problems.append("camera_iterations must be >= 1")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_start_idx(self) -> int:
        """Index of the first patch token in a frame: 1 camera token + the register tokens."""
        return 1 + self.num_register_tokens

    def tokens_per_frame(self, height: int, width: int) -> int:
        return self.patch_start_idx + (height // self.patch_size) * (width // self.patch_size)

    @property
    def kept_layers(self) -> tuple[int, ...]:
        """Aggregator layers whose outputs the heads read (all others can be dropped at once)."""
        return tuple(sorted(set(self.dpt_intermediate_layer_idx) | {self.depth - 1}))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


PRESETS: dict[str, ModelConfig] = {
    # The released VGGT-1B / StreamVGGT / STream3R sizes (1.26 B parameters).
    "vggt-1b": ModelConfig(),
    # Small enough that a 32-frame stream runs on a CPU in seconds; same module layout.
    "tiny": ModelConfig(
        img_size=112,
        patch_size=14,
        embed_dim=64,
        depth=4,
        num_heads=4,
        num_register_tokens=4,
        patch_embed="conv",
        camera_trunk_depth=2,
        camera_num_heads=4,
        camera_iterations=2,
        dpt_features=32,
        dpt_out_channels=(16, 32, 64, 64),
        dpt_intermediate_layer_idx=(0, 1, 2, 3),
        enable_track=False,
    ),
    # The trained embedded default: small enough to ship (fp16 weights ~12 MB) and to
    # stream on a CPU, large enough to learn synthetic indoor scenes.
    "small": ModelConfig(
        img_size=112,
        patch_size=14,
        embed_dim=128,
        depth=6,
        num_heads=4,
        num_register_tokens=4,
        patch_embed="conv",
        camera_trunk_depth=2,
        camera_num_heads=4,
        camera_iterations=2,
        dpt_features=64,
        dpt_out_channels=(32, 64, 128, 128),
        dpt_intermediate_layer_idx=(1, 3, 4, 5),
        enable_track=False,
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None


def config_with(base: ModelConfig, **changes: Any) -> ModelConfig:
    """A copy of ``base`` with some fields changed (validated)."""
    return dataclasses.replace(base, **changes)


__all__ = ["ModelConfig", "PRESETS", "get_preset", "config_with", "DINO_VARIANTS", "PATCH_EMBED_KINDS"]
