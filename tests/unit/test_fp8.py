"""FP8 GEMMs (model/fp8.py): clean refusal without FP8 hardware, and the e4m3 helpers (pure torch)."""

from __future__ import annotations

import pytest
import torch

from stac_backend.model import build_model
from stac_backend.model.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    Fp8Linear,
    dequantize_rows,
    fp8_unsupported_reason,
    quantize_rows,
    use_fp8_gemms,
)

# e4m3 keeps 3 mantissa bits: a normal value rounds to within 2^-4 of itself, relative.
E4M3_RELATIVE = 2.0 ** -4


def test_fp8_refuses_on_cpu_saying_what_it_needs():
    model = build_model("tiny", seed=0)
    reason = fp8_unsupported_reason("cpu")
    assert "compute capability 8.9" in reason and "cpu" in reason
    with pytest.raises(RuntimeError, match="compute capability 8.9"):
        use_fp8_gemms(model)
    with pytest.raises(RuntimeError, match="compute capability 8.9"):
        build_model("tiny", seed=0, fp8=True)


def test_quantize_round_trip_within_e4m3_tolerance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g) * torch.logspace(-3, 3, 64)[:, None]  # rows of very different scales
    values, scale = quantize_rows(x)
    assert values.dtype == FP8_DTYPE and scale.shape == (64, 1) and scale.dtype == torch.float32
    assert values.float().abs().amax(dim=-1).eq(FP8_MAX).all()  # each row's largest value uses the full range
    back = dequantize_rows(values, scale)
    # Relative to each row's largest value (scaled to 448): at most half of the widest step, 32
    # between 256 and 448.
    error = (back - x).abs() / x.abs().amax(dim=-1, keepdim=True)
    assert error.max() <= 16 / FP8_MAX + 1e-6
    big = x.abs() > x.abs().amax(dim=-1, keepdim=True) / 64  # well inside e4m3's normal range
    assert ((back - x).abs()[big] <= E4M3_RELATIVE * x.abs()[big] + 1e-12).all()
    zero_values, zero_scale = quantize_rows(torch.zeros(2, 16))
    assert torch.equal(dequantize_rows(zero_values, zero_scale), torch.zeros(2, 16))


def test_emulated_fp8_linear_keeps_state_dict_and_stays_close():
    model = build_model("tiny", seed=0)
    keys = set(model.state_dict())
    x = torch.randn(3, 10, model.config.embed_dim)
    block = model.aggregator.frame_blocks[0]
    expected = block.mlp.fc1(x)
    replaced = use_fp8_gemms(model, mode="emulate")
    assert replaced == 4 * 2 * model.config.depth
    assert isinstance(block.mlp.fc1, Fp8Linear) and set(model.state_dict()) == keys
    got = block.mlp.fc1(x)
    assert (got - expected).abs().max() <= 0.1 * expected.abs().max()
    assert (got - expected).norm() / expected.norm() < 0.05
    model.to(torch.float64)  # the e4m3 copy is not cast with the parameters
    assert block.mlp.fc1.weight_fp8.dtype == FP8_DTYPE
