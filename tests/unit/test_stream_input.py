"""Bad input to a stream raises a clear ValueError and leaves the stream usable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stac_backend.engine import Stream


@pytest.mark.parametrize(
    "frames, message",
    [
        (torch.rand(56, 84), "rank"),
        (torch.rand(1, 1, 3, 56, 84), "rank"),
        (torch.rand(1, 4, 56, 84), "3 colour channels"),
        (torch.rand(1, 3, 50, 84), "multiples of the patch size"),
        (torch.rand(1, 3, 56, 80), "multiples of the patch size"),
        (torch.full((1, 3, 56, 84), float("nan")), "non-finite"),
        (torch.full((1, 3, 56, 84), float("inf")), "non-finite"),
        (torch.randint(0, 255, (1, 3, 56, 84), dtype=torch.int32), "dtype"),
        (np.zeros((1, 3, 56, 84), dtype=np.int64), "dtype"),
        (torch.rand(0, 3, 56, 84), "at least one frame"),
        (torch.rand(3, 3, 56, 84), "at most 2 frames"),
        (torch.rand(1, 3, 56, 84) * 255, r"\[0, 1\]"),
        ([[1.0]], "tensor or numpy"),
    ],
)
def test_bad_frames_are_refused_and_stream_survives(tiny_model, frames12, frames, message):
    stream = Stream(tiny_model, chunk_size=2)
    good = stream.push(frames12[:2])
    with pytest.raises(ValueError, match=message):
        stream.push(frames)
    assert stream.frames_seen == 2
    # The stream continues exactly as if the bad push never happened.
    reference = Stream(tiny_model, chunk_size=2)
    reference.push(frames12[:2])
    assert torch.equal(stream.push(frames12[2:4])["depth"], reference.push(frames12[2:4])["depth"])
    assert good["frame_index"].tolist() == [0, 1]


def test_frame_size_may_not_change_within_a_stream(tiny_model, frames12):
    stream = Stream(tiny_model, chunk_size=2)
    stream.push(frames12[:1])
    with pytest.raises(ValueError, match="size changed"):
        stream.push(torch.rand(1, 3, 70, 84))


def test_numpy_uint8_frames_are_accepted(tiny_model, frames12):
    frames = (frames12[:2].numpy() * 255).astype(np.uint8)
    out = Stream(tiny_model, chunk_size=2).push(frames)
    assert out["depth"].shape == (2, 56, 84)


def test_invalid_chunk_size(tiny_model):
    with pytest.raises(ValueError, match="chunk_size"):
        Stream(tiny_model, chunk_size=0)


def test_token_positions_are_reused_while_the_shape_stays(tiny_model):
    """RoPE reads the largest position from the device once per positions tensor it has not seen; the
    aggregator hands it the same tensors while the step's shape stays, so that read (a host
    synchronisation on a GPU) happens once per shape, not once per step."""
    aggregator = tiny_model.aggregator
    first = aggregator._token_positions(4, 6, 1, 2, torch.device("cpu"))
    again = aggregator._token_positions(4, 6, 1, 2, torch.device("cpu"))
    assert first[0] is again[0] and first[1] is again[1]
    wider = aggregator._token_positions(4, 6, 2, 2, torch.device("cpu"))  # another batch: new positions
    assert wider[0].shape == (4, 29, 2) and wider[1].shape == (2, 58, 2)
    assert torch.equal(wider[1][1], first[1][0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_frames_reach_the_gpu_without_a_host_synchronisation():
    """uint8 and float frames cross to the GPU through pinned memory without making the host wait for
    the GPU (torch's sync debug mode raises on any synchronising call), and arrive unchanged."""
    from conftest import make_tiny_model

    stream = Stream(make_tiny_model().to("cuda"))  # its own model: the shared fixture stays on the CPU
    uint8 = torch.randint(0, 256, (2, 3, 56, 84), dtype=torch.uint8)
    floats = torch.rand(2, 3, 56, 84)
    torch.cuda.set_sync_debug_mode("error")
    try:
        from_uint8, from_float = stream.validate(uint8), stream.validate(floats)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # the same values as the blocking copy (scaled on the GPU, as before)
    assert torch.equal(from_uint8, uint8.to("cuda").float() / 255.0)
    assert torch.equal(from_float.cpu(), floats)
