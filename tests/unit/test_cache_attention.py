"""Tests for stac_backend.cache.attention.attention_with_key_mass (CPU, fp32/fp64)."""

from __future__ import annotations

import math

import pytest
import torch

from stac_backend.cache.attention import attention_with_key_mass


def _reference(q, k, v, key_bias=None, key_valid=None, query_valid=None):
    """Explicit float64 softmax: (out [B,H,Nq,Dv], mass [B,H,Nk])."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) / math.sqrt(D)
    if key_bias is not None:
        s = s + key_bias.double().expand(B, H, Nk)[:, :, None, :]
    if key_valid is not None:
        s = s.masked_fill(~key_valid.expand(B, H, Nk)[:, :, None, :], float("-inf"))
    any_key = torch.isfinite(s).any(dim=-1, keepdim=True)
    p = torch.softmax(torch.where(any_key, s, torch.zeros_like(s)), dim=-1)
    p = torch.where(any_key, p, torch.zeros_like(p))
    if query_valid is not None:
        p = p * query_valid.expand(B, Nq)[:, None, :, None].double()
    out = torch.einsum("bhqk,bhkd->bhqd", p, v.double())
    return out, p.sum(dim=-2)


def _random_case(gen, B=2, H=3, Nq=37, Nk=53, D=16, Dv=None, dtype=torch.float64, qk_scale=2.0):
    Dv = D if Dv is None else Dv
    q = torch.randn(B, H, Nq, D, generator=gen, dtype=dtype) * qk_scale
    k = torch.randn(B, H, Nk, D, generator=gen, dtype=dtype) * qk_scale
    v = torch.randn(B, H, Nk, Dv, generator=gen, dtype=dtype)
    bias = torch.log(torch.randint(1, 9, (B, H, Nk), generator=gen).to(dtype))
    key_valid = torch.rand(B, H, Nk, generator=gen) > 0.3
    query_valid = torch.rand(B, Nq, generator=gen) > 0.2
    return q, k, v, bias, key_valid, query_valid


@pytest.mark.parametrize("key_block", [1, 7, 16, 53, 1024])
@pytest.mark.parametrize("query_block", [5, 2048])
def test_matches_float64_reference_with_masks(key_block, query_block):
    gen = torch.Generator().manual_seed(0)
    q, k, v, bias, kvalid, qvalid = _random_case(gen, Dv=12)
    out, mass = attention_with_key_mass(
        q, k, v, bias, kvalid, qvalid, key_block=key_block, query_block=query_block
    )
    ref_out, ref_mass = _reference(q, k, v, bias, kvalid, qvalid)
    assert out.dtype == q.dtype and out.shape == ref_out.shape
    assert mass.dtype == torch.float32 and mass.shape == (2, 3, 53)
    assert torch.allclose(out[qvalid[:, None, :].expand(2, 3, 37)],
                          ref_out[qvalid[:, None, :].expand(2, 3, 37)], atol=1e-6, rtol=0)
    assert torch.allclose(mass.double(), ref_mass, atol=1e-6 * 37, rtol=1e-6)
    # masked keys receive exactly zero mass
    assert torch.all(mass[~kvalid] == 0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("key_block", [3, 64, 1000])
def test_fp32_matches_reference(key_block):
    gen = torch.Generator().manual_seed(1)
    # unit-scale logits, as after q/k LayerNorm; fp32 rounding alone is ~1e-7 per element
    q, k, v, bias, kvalid, qvalid = _random_case(
        gen, Nq=64, Nk=300, D=32, dtype=torch.float32, qk_scale=1.0
    )
    out, mass = attention_with_key_mass(q, k, v, bias, kvalid, qvalid, key_block=key_block)
    ref_out, ref_mass = _reference(q, k, v, bias, kvalid, qvalid)
    sel = qvalid[:, None, :].expand_as(out[..., 0])
    assert (out[sel].double() - ref_out[sel]).abs().max() <= 1e-6
    assert (mass.double() - ref_mass).abs().max() <= 1e-6


def test_no_masks_and_mass_sums_to_query_count():
    gen = torch.Generator().manual_seed(2)
    q, k, v, _, _, _ = _random_case(gen)
    out, mass = attention_with_key_mass(q, k, v, key_block=10)
    ref_out, ref_mass = _reference(q, k, v)
    assert torch.allclose(out, ref_out, atol=1e-6, rtol=0)
    assert torch.allclose(mass.double(), ref_mass, atol=1e-6)
    # every query distributes exactly 1 unit of probability
    assert torch.allclose(mass.sum(-1).double(), torch.full((2, 3), 37.0, dtype=torch.float64),
                          atol=1e-4)


def test_fast_path_agrees_with_blockwise():
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64):
        q, k, v, bias, _, _ = _random_case(gen, dtype=dtype, qk_scale=1.0)
        fast, none = attention_with_key_mass(q, k, v, bias, need_mass=False)
        slow, mass = attention_with_key_mass(q, k, v, bias, key_block=8, need_mass=True)
        assert none is None and mass is not None
        assert (fast.double() - slow.double()).abs().max() <= 1e-6
        fast0, _ = attention_with_key_mass(q, k, v, need_mass=False)
        slow0, _ = attention_with_key_mass(q, k, v, key_block=8)
        assert (fast0.double() - slow0.double()).abs().max() <= 1e-6


def test_need_mass_false_with_masks_uses_blockwise():
    gen = torch.Generator().manual_seed(4)
    q, k, v, bias, kvalid, qvalid = _random_case(gen)
    out, mass = attention_with_key_mass(q, k, v, bias, kvalid, qvalid, need_mass=False)
    assert mass is None
    ref_out, _ = _reference(q, k, v, bias, kvalid, qvalid)
    sel = qvalid[:, None, :].expand_as(out[..., 0])
    assert torch.allclose(out[sel], ref_out[sel], atol=1e-6, rtol=0)


@pytest.mark.parametrize("C", [1, 2, 5, 8])
def test_proportional_attention_equals_copies(C):
    """A pivot with bias log(C) behaves exactly like C identical copies of that key."""
    gen = torch.Generator().manual_seed(10 + C)
    B, H, Nq, Nk, D = 1, 2, 9, 6, 8
    q = torch.randn(B, H, Nq, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, H, Nk, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, H, Nk, D, generator=gen, dtype=torch.float64)
    j = 2
    # copies: the key j repeated C times
    idx = torch.tensor([i for i in range(Nk) if i != j] + [j] * C)
    k_rep, v_rep = k[:, :, idx], v[:, :, idx]
    bias = torch.zeros(Nk, dtype=torch.float64)
    bias[j] = math.log(C)
    out_p, mass_p = attention_with_key_mass(q, k, v, bias, key_block=4)
    out_c, mass_c = attention_with_key_mass(q, k_rep, v_rep, key_block=4)
    assert (out_p - out_c).abs().max() <= 1e-6
    assert abs(mass_p[..., j].double() - mass_c[..., Nk - 1:].sum(-1).double()).max() <= 1e-6
    others = [i for i in range(Nk) if i != j]
    assert torch.allclose(mass_p[..., others], mass_c[..., : Nk - 1], atol=1e-6)


def test_fully_masked_rows_give_zero_without_nan():
    gen = torch.Generator().manual_seed(5)
    q, k, v, bias, _, _ = _random_case(gen, B=2, H=2, Nq=5, Nk=7)
    key_valid = torch.ones(2, 2, 7, dtype=torch.bool)
    key_valid[1, 0] = False  # batch 1, head 0: no key at all
    out, mass = attention_with_key_mass(q, k, v, bias, key_valid, key_block=3)
    assert torch.isfinite(out).all() and torch.isfinite(mass).all()
    assert torch.all(out[1, 0] == 0)
    assert torch.all(mass[1, 0] == 0)
    ref_out, ref_mass = _reference(q, k, v, bias, key_valid)
    assert torch.allclose(out, ref_out, atol=1e-6)
    assert torch.allclose(mass.double(), ref_mass, atol=1e-6)

    # -inf bias (padding from a retrieval) behaves like an invalid key, also for the fast path
    bias_inf = bias.clone()
    bias_inf[0, 1] = float("-inf")
    out2, _ = attention_with_key_mass(q, k, v, bias_inf, need_mass=False)
    out3, mass3 = attention_with_key_mass(q, k, v, bias_inf)
    assert torch.isfinite(out2).all() and torch.all(out2[0, 1] == 0)
    assert torch.equal(out2, out3) and torch.all(mass3[0, 1] == 0)

    # all queries padded -> zero mass everywhere
    qvalid = torch.zeros(2, 5, dtype=torch.bool)
    out4, mass4 = attention_with_key_mass(q, k, v, bias, query_valid=qvalid)
    assert torch.all(mass4 == 0) and torch.isfinite(out4).all()


def test_empty_keys_and_queries():
    q = torch.randn(1, 2, 4, 8)
    k = torch.randn(1, 2, 0, 8)
    out, mass = attention_with_key_mass(q, k, k)
    assert out.shape == (1, 2, 4, 8) and torch.all(out == 0) and mass.shape == (1, 2, 0)
    out, mass = attention_with_key_mass(q[:, :, :0], torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    assert out.shape == (1, 2, 0, 8) and torch.all(mass == 0)


def test_broadcast_masks_and_bias():
    gen = torch.Generator().manual_seed(6)
    q, k, v, _, _, _ = _random_case(gen, B=2, H=3, Nq=6, Nk=9)
    bias = torch.randn(9, generator=gen, dtype=torch.float64)  # [Nk]
    kvalid = torch.rand(2, 1, 9, generator=gen) > 0.3  # [B,1,Nk]
    qvalid = torch.tensor([True, False, True, True, False, True])  # [Nq]
    out, mass = attention_with_key_mass(q, k, v, bias, kvalid, qvalid, key_block=4)
    ref_out, ref_mass = _reference(q, k, v, bias, kvalid, qvalid)
    assert torch.allclose(mass.double(), ref_mass, atol=1e-6)
    assert torch.allclose(out[:, :, qvalid], ref_out[:, :, qvalid], atol=1e-6)


def test_deterministic():
    gen = torch.Generator().manual_seed(7)
    q, k, v, bias, kvalid, qvalid = _random_case(gen, Nq=100, Nk=700, D=32, dtype=torch.float32)
    a = attention_with_key_mass(q, k, v, bias, kvalid, qvalid, key_block=128, query_block=32)
    b = attention_with_key_mass(q, k, v, bias, kvalid, qvalid, key_block=128, query_block=32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_arguments_raise():
    q = torch.randn(1, 2, 4, 8)
    k = torch.randn(1, 2, 5, 8)
    v = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="q must be 4-D"):
        attention_with_key_mass(q[0], k, v)
    with pytest.raises(ValueError, match="k and v"):
        attention_with_key_mass(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match=r"\[B, H\]"):
        attention_with_key_mass(q, torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8))
    with pytest.raises(ValueError, match="head dims"):
        attention_with_key_mass(q, torch.randn(1, 2, 5, 4), v)
    with pytest.raises(ValueError, match="key_bias"):
        attention_with_key_mass(q, k, v, key_bias=torch.zeros(4))
    with pytest.raises(ValueError, match="key_valid"):
        attention_with_key_mass(q, k, v, key_valid=torch.ones(1, 2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_valid must be a bool"):
        attention_with_key_mass(q, k, v, key_valid=torch.ones(1, 2, 5))
    with pytest.raises(ValueError, match="query_valid"):
        attention_with_key_mass(q, k, v, query_valid=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_block"):
        attention_with_key_mass(q, k, v, key_block=0)
    with pytest.raises(ValueError, match="query_block"):
        attention_with_key_mass(q, k, v, query_block=-1)


@pytest.mark.parametrize("stride", [2, 3, 4])
@pytest.mark.parametrize("query_block", [5, 2048])
def test_mass_from_every_nth_query_is_the_scaled_sum_over_those_rows(stride, query_block):
    """``mass_query_stride=S`` sums the mass over query rows 0, S, 2S, ... (across query blocks
    that do not start on a multiple of S) and scales it by Nq / rows used; the output is unchanged."""
    gen = torch.Generator().manual_seed(3)
    q, k, v, bias, kvalid, _ = _random_case(gen)
    out_all, _ = attention_with_key_mass(q, k, v, bias, kvalid, query_block=query_block)
    out, mass = attention_with_key_mass(q, k, v, bias, kvalid, query_block=query_block, mass_query_stride=stride)
    rows = torch.arange(0, q.shape[2], stride)
    _, ref_rows = _reference(q[:, :, rows], k, v, bias, kvalid)
    assert torch.equal(out, out_all)
    assert torch.allclose(mass.double(), ref_rows * (q.shape[2] / len(rows)), atol=1e-6 * 37, rtol=1e-6)
    assert torch.all(mass[~kvalid] == 0)


def test_mass_stride_one_is_the_exact_mass_and_bad_strides_are_refused():
    gen = torch.Generator().manual_seed(4)
    q, k, v, bias, kvalid, _ = _random_case(gen)
    assert torch.equal(attention_with_key_mass(q, k, v, bias, kvalid)[1],
                       attention_with_key_mass(q, k, v, bias, kvalid, mass_query_stride=1)[1])
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="mass_query_stride"):
            attention_with_key_mass(q, k, v, bias, kvalid, mass_query_stride=bad)
