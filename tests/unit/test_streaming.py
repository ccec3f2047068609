"""Streaming with chunks equals one batched forward under the matching block-causal mask."""

from __future__ import annotations

import pytest
import torch

from stac_backend.engine import Stream, full_cache_bytes_per_frame
from stac_backend.model import OUTPUT_NAMES

from conftest import make_tiny_model


def max_diff(name, a, b, image_hw=(56, 84)):
    """Max abs difference; intrinsics (pixels, ~100) are compared per image size, since 1e-5 pixels
    is below float32 resolution at that magnitude (they derive from pose_enc, compared as is)."""
    if name == "intrinsics":
        scale = torch.tensor([image_hw[1], image_hw[0], 1.0]).view(3, 1)
        a, b = a / scale, b / scale
    return (a - b).abs().max().item()


def stream_all(model, frames, chunk):
    stream = Stream(model, chunk_size=chunk)
    outs = [stream.push(frames[i : i + chunk]) for i in range(0, len(frames), chunk)]
    return {name: torch.cat([o[name] for o in outs]) for name in outs[0]}


@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_stream_equals_block_causal_batch(tiny_model, frames12, chunk):
    with torch.no_grad():
        batched = tiny_model(frames12.unsqueeze(0), chunk_size=chunk)
    streamed = stream_all(tiny_model, frames12, chunk)
    assert set(OUTPUT_NAMES) <= set(streamed)
    for name in OUTPUT_NAMES:
        diff = max_diff(name, streamed[name], batched[name][0])
        assert diff <= 1e-5, f"{name} differs by {diff} (chunk {chunk})"


def test_causality_future_frames_do_not_change_the_past(tiny_model, frames12):
    first = stream_all(tiny_model, frames12[:4], 2)
    altered = frames12.clone()
    altered[4:] = torch.rand_like(altered[4:])
    both = stream_all(tiny_model, altered, 2)
    for name in OUTPUT_NAMES:
        assert torch.equal(first[name], both[name][:4]), name


def test_single_chunk_equals_offline_vggt(tiny_model, frames12):
    """One chunk holding every frame is plain (non-causal) VGGT."""
    with torch.no_grad():
        offline = tiny_model(frames12[:4])
    streamed = stream_all(tiny_model, frames12[:4], 4)
    for name in OUTPUT_NAMES:
        assert max_diff(name, streamed[name], offline[name][0]) <= 1e-5, name


def test_block_causal_mask_differs_from_offline(tiny_model, frames12):
    """Sanity: the causal mask matters, so the equivalence tests above are not vacuous."""
    with torch.no_grad():
        offline = tiny_model(frames12[:4])
        causal = tiny_model(frames12[:4].unsqueeze(0), chunk_size=1)
    # Random dense heads are nearly flat, so the differences there are small but far above 1e-5.
    assert (offline["depth"] - causal["depth"]).abs().max() > 1e-4
    assert (offline["world_points"] - causal["world_points"]).abs().max() > 1e-4
    assert (offline["pose_enc"] - causal["pose_enc"]).abs().max() > 1e-2


def test_dino_patch_embed_streams_too(frames12):
    """The DINOv2 patch embed (non-square grid -> interpolated position embedding) streams exactly."""
    model = make_tiny_model(patch_embed="dinov2_vits14_reg", embed_dim=384, num_heads=6, depth=2,
                            dpt_intermediate_layer_idx=(0, 0, 1, 1))
    with torch.no_grad():
        batched = model(frames12[:4].unsqueeze(0), chunk_size=2)
    streamed = stream_all(model, frames12[:4], 2)
    for name in OUTPUT_NAMES:
        assert max_diff(name, streamed[name], batched[name][0]) <= 1e-5, name


def test_uint8_and_float_frames_agree(tiny_model, frames12):
    as_uint8 = (frames12[:2] * 255).round().to(torch.uint8)
    a = Stream(tiny_model, chunk_size=2).push(as_uint8)
    b = Stream(tiny_model, chunk_size=2).push(as_uint8.float() / 255)
    assert torch.equal(a["depth"], b["depth"])


@pytest.mark.parametrize("chunk", [1, 3])
def test_cache_bytes_grow_by_documented_amount(tiny_model, frames12, chunk):
    per_frame = full_cache_bytes_per_frame(tiny_model.config, 56, 84, torch.float32)
    # tokens = 1 camera + 4 registers + 4x6 patches = 29; 2 * depth 4 * 29 * 64 dims * 4 B, plus camera
    assert per_frame == (2 * 4 * 29 * 64 + 2 * 2 * 2 * 128) * 4
    stream = Stream(tiny_model, chunk_size=chunk)
    assert stream.memory_bytes() == 0
    for i in range(0, 9, chunk):
        stream.push(frames12[i : i + chunk])
        assert stream.memory_bytes() == per_frame * stream.frames_seen
    stream.reset()
    assert stream.memory_bytes() == 0 and stream.frames_seen == 0


def test_bit_identical_reruns(tiny_model, frames12):
    a = stream_all(tiny_model, frames12[:6], 2)
    b = stream_all(tiny_model, frames12[:6], 2)
    for name in OUTPUT_NAMES:
        assert torch.equal(a[name], b[name])
