"""Floating-point operations of one streamed frame, by component, from the model's configuration and
the cache's working set: the numerator of the roofline table of ``benchmarks/engine_step.py``.

Counted are the multiply-adds of matrix products and convolutions (2 FLOPs each), the work a GPU's
tensor cores do; normalisations, activations, RoPE, softmax and interpolation are left out (they
are bound by memory traffic, not by arithmetic). The counts follow the modules of
``stac_backend/model`` exactly (``torch.utils.flop_counter`` agrees on the tiny model, see
``tests/unit/test_engine_step_bench.py``):

- ``patch_embed``: the 14x14 patch projection and, for a DINOv2 patch embedding, its ViT blocks over
  the class, register and patch tokens of the frame;
- ``frame_blocks``: the aggregator's frame blocks (projections, MLP, attention within the frame);
- ``global_blocks_dense``: the projections and MLPs of the global blocks;
- ``global_attention``: the global blocks' attention of the frame's tokens over the cache's working
  set (``working_set_frames`` frames of tokens, the step's own frames included): Q K^T and P V;
- ``key_mass``: the second pass over the same keys that scores them (Q K^T again);
- ``camera_head``: the camera trunk's iterations over the frame's camera token, attending
  ``camera_frames`` camera tokens;
- ``dpt_heads``: the depth and point heads (projections, resizes, fusion blocks, output convs).

Everything is per frame: a step of S streams x C frames costs S x C times as much.
"""

from __future__ import annotations

from typing import Optional

from stac_backend.cache import CacheConfig
from stac_backend.model.config import DINO_VARIANTS, ModelConfig

COMPONENTS = ("patch_embed", "frame_blocks", "global_blocks_dense", "global_attention", "key_mass",
              "camera_head", "dpt_heads")
#: The parts a step runs without reading a stream's cache (what compiling the step can speed up).
CACHE_FREE = ("patch_embed", "frame_blocks", "global_blocks_dense", "camera_head", "dpt_heads")


def working_set_frames(cache: CacheConfig) -> Optional[int]:
    """Frames of keys a global block attends at most during a step of a bounded policy: the step's
    chunk, the pinned frames, the recent window, the heavy hitters and (stac) the retrieved
    frame-equivalents; None for ``full`` (it grows with the stream)."""
    if cache.policy == "full":
        return None
    frames = cache.chunk + cache.window
    if cache.policy in ("sink_window", "heavy_hitter", "stac"):
        frames += len(cache.pinned_frames)
    if cache.policy in ("heavy_hitter", "stac"):
        frames += cache.hh
    if cache.policy == "stac":
        frames += cache.retrieval
    return frames


def linear_flops(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def attention_flops(queries: int, keys: int, width: int) -> int:
    """Q K^T and P V over all heads (``width`` = heads x head dim)."""
    return 4 * queries * keys * width


def block_dense_flops(tokens: int, width: int, mlp_ratio: float) -> int:
    """A transformer block's qkv, output projection and two MLP layers."""
    hidden = int(width * mlp_ratio)
    return linear_flops(tokens, width, 3 * width) + linear_flops(tokens, width, width) + 2 * linear_flops(tokens, width, hidden)


def conv_flops(out_h: int, out_w: int, c_in: int, c_out: int, kernel: int) -> int:
    """A convolution (or a transposed one, counted on its input grid) producing / reading
    ``out_h x out_w`` positions."""
    return 2 * out_h * out_w * c_in * c_out * kernel * kernel


def dpt_head_flops(config: ModelConfig, height: int, width: int, output_dim: int) -> int:
    """One DPT head over one frame (``stac_backend/model/dpt_head.py``)."""
    p = config.patch_size
    ph, pw = height // p, width // p
    dim_in, features, oc = 2 * config.embed_dim, config.dpt_features, config.dpt_out_channels
    flops = sum(conv_flops(ph, pw, dim_in, c, 1) for c in oc)  # projections
    flops += conv_flops(ph, pw, oc[0], oc[0], 4) + conv_flops(ph, pw, oc[1], oc[1], 2)  # transposed: on their input grid
    h4, w4 = (ph - 1) // 2 + 1, (pw - 1) // 2 + 1  # 3x3 stride-2 conv, padding 1
    flops += conv_flops(h4, w4, oc[3], oc[3], 3)
    grids = [(4 * ph, 4 * pw), (2 * ph, 2 * pw), (ph, pw), (h4, w4)]  # layer1 .. layer4
    flops += sum(conv_flops(h, w, c, features, 3) for (h, w), c in zip(grids, oc))  # layer*_rn
    unit = 2 * conv_flops(1, 1, features, features, 3)  # a residual conv unit, per position
    fused = 2 * grids[0][0], 2 * grids[0][1]  # refinenet1 doubles layer1's grid
    flops += grids[3][0] * grids[3][1] * unit + conv_flops(*grids[2], features, features, 1)  # refinenet4
    for (h, w), (out_h, out_w) in ((grids[2], grids[1]), (grids[1], grids[0]), (grids[0], fused)):  # refinenet3..1
        flops += 2 * h * w * unit + conv_flops(out_h, out_w, features, features, 1)
    flops += conv_flops(*fused, features, features // 2, 3)  # output_conv1
    full_h, full_w = ph * p, pw * p
    flops += conv_flops(full_h, full_w, features // 2, 32, 3) + conv_flops(full_h, full_w, 32, output_dim, 1)
    return flops


def patch_embed_flops(config: ModelConfig, height: int, width: int) -> int:
    patches = (height // config.patch_size) * (width // config.patch_size)
    if config.patch_embed == "conv":
        return conv_flops(1, patches, 3, config.embed_dim, config.patch_size)
    spec = DINO_VARIANTS[config.patch_embed]
    dim, tokens = spec["embed_dim"], 1 + config.num_register_tokens + patches
    block = block_dense_flops(tokens, dim, 4.0) + attention_flops(tokens, tokens, dim)
    return conv_flops(1, patches, 3, dim, config.patch_size) + spec["depth"] * block


def camera_head_flops(config: ModelConfig, camera_frames: int) -> int:
    """The trunk's iterations over one frame's camera token, attending ``camera_frames`` tokens."""
    width = 2 * config.embed_dim
    per_iteration = (linear_flops(1, 9, width) + linear_flops(1, width, 3 * width)  # pose embedding, AdaLN
                     + config.camera_trunk_depth * (block_dense_flops(1, width, config.camera_mlp_ratio)
                                                    + attention_flops(1, camera_frames, width))
                     + linear_flops(1, width, width // 2) + linear_flops(1, width // 2, 9))  # pose branch
    return config.camera_iterations * per_iteration


def frame_flops(config: ModelConfig, height: int, width: int, working_set: float, camera_frames: int = 64,
                key_mass: bool = True) -> dict[str, int]:
    """FLOPs of one frame by component (``COMPONENTS``), and their ``total``.

    ``working_set``: frames of keys each global block attends (``working_set_frames``);
    ``camera_frames``: camera tokens the camera trunk attends; ``key_mass``: whether the cache
    scores its keys (a second pass over them).
    """
    tokens = config.tokens_per_frame(height, width)
    c, depth = config.embed_dim, config.depth
    keys = int(round(working_set * tokens))
    heads = [o for o, on in ((4, config.enable_point), (2, config.enable_depth)) if on]
    out = {
        "patch_embed": patch_embed_flops(config, height, width),
        "frame_blocks": depth * (block_dense_flops(tokens, c, config.mlp_ratio) + attention_flops(tokens, tokens, c)),
        "global_blocks_dense": depth * block_dense_flops(tokens, c, config.mlp_ratio),
        "global_attention": depth * attention_flops(tokens, keys, c),
        "key_mass": depth * attention_flops(tokens, keys, c) // 2 if key_mass else 0,
        "camera_head": camera_head_flops(config, camera_frames) if config.enable_camera else 0,
        "dpt_heads": sum(dpt_head_flops(config, height, width, o) for o in heads),
    }
    out["total"] = sum(out[k] for k in COMPONENTS)
    return out


def roofline(flops: dict[str, int], frames_per_second: Optional[float], peaks_tflops: dict[str, Optional[float]]) -> dict:
    """Achieved TFLOP/s at ``frames_per_second`` and its share of each peak (TFLOP/s), with the
    frames/s each peak would allow."""
    total = flops["total"]
    achieved = None if not frames_per_second else total * frames_per_second / 1e12
    out: dict = {"frames_per_second": frames_per_second, "achieved_tflops": achieved}
    for name, peak in peaks_tflops.items():
        if peak:
            out[f"share_of_{name}"] = None if achieved is None else achieved / peak
            out[f"frames_per_second_at_{name}"] = peak * 1e12 / total
    return out


def component_table(flops: dict[str, int], peaks_tflops: dict[str, Optional[float]]) -> list[dict]:
    """Per component: TFLOP per frame, its share of the frame, whether it reads the cache, and the
    milliseconds per frame it would take at each peak."""
    table = []
    for name in COMPONENTS:
        row = {"component": name, "tflop_per_frame": flops[name] / 1e12, "share": flops[name] / flops["total"],
               "cache_free": name in CACHE_FREE}
        row.update({f"ms_per_frame_at_{peak_name}": 1e3 * flops[name] / (peak * 1e12)
                    for peak_name, peak in peaks_tflops.items() if peak})
        table.append(row)
    return table
