"""The DPT head adds its positional embeddings, made once per frame size, exactly where and as the
reference adds them: 0.1 x the sinusoidal UV embedding of each projected map and of the output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stac_backend.model import build_model
from stac_backend.model.dpt_head import uv_position_embedding

HW = (56, 84)


def _reference_add(x: torch.Tensor) -> torch.Tensor:
    """The reference: the embedding of x's own shape, computed at the call, added in x's dtype."""
    emb = uv_position_embedding(x.shape[-2], x.shape[-1], x.shape[1], HW[1] / HW[0], x.device, x.dtype)
    return x + 0.1 * emb.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_position_embeddings_are_added_as_the_reference_adds_them(dtype):
    head = build_model("tiny", seed=0).depth_head.to(dtype)
    tokens = (HW[0] // head.patch_size) * (HW[1] // head.patch_size)
    layers = [torch.randn(2, 1, 6 + tokens, head.norm.normalized_shape[0], dtype=dtype)
              for _ in range(max(head.intermediate_layer_idx) + 1)]
    seen = {}
    hooks = [head.projects[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(("projected", i), out))
             for i in range(4)]
    hooks += [head.resize_layers[i].register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(("resized", i), a[0]))
              for i in range(4)]
    hooks.append(head.scratch.output_conv1.register_forward_hook(lambda m, a, out: seen.__setitem__("conv1", out)))
    hooks.append(head.scratch.output_conv2.register_forward_pre_hook(lambda m, a: seen.__setitem__("conv2", a[0])))
    with torch.no_grad():
        head._forward_frames(layers, HW, 6, 0, 2)
    for h in hooks:
        h.remove()
    for i in range(4):
        assert torch.equal(seen[("resized", i)], _reference_add(seen[("projected", i)])), i
    upsampled = F.interpolate(seen["conv1"], size=HW, mode="bilinear", align_corners=True)
    assert torch.equal(seen["conv2"], _reference_add(upsampled))
    # made once per (size, device, dtype): the next call gets the same tensors
    first = head.position_embeddings(HW, "cpu", dtype)
    assert all(a is b for a, b in zip(first, head.position_embeddings(HW, "cpu", dtype)))
    assert head.position_embeddings((28, 42), "cpu", dtype)[0].shape[-2:] == (2, 3)
    assert "_position_embeddings" not in str(list(head.state_dict()))  # not part of the weights
