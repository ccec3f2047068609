"""The fused attention-with-key-mass kernel equals the blockwise reference (needs CUDA + Triton;
on CPU it can be run in Triton's interpreter: TRITON_INTERPRET=1 pytest tests/test_kernels.py)."""

from __future__ import annotations

import os

import pytest
import torch

from stac_backend.cache.attention import attention_with_key_mass
from stac_backend.kernels.attention_mass import HAVE_TRITON, MASS_METHODS, fused_attention_with_key_mass

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(
    not HAVE_TRITON or not (torch.cuda.is_available() or INTERPRET), reason="needs a CUDA GPU and OpenAI Triton"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# (input dtype, key-mass method, output-pass exponentials): float32 is always exact; 16-bit inputs on
# a GPU take each mass method and each way of taking the output pass's exponentials
CASES = [(torch.float32, "auto", "auto")] + (
    [(torch.bfloat16, m, "float16x2") for m in MASS_METHODS] + [(torch.bfloat16, "auto", "float32")]
    if DEVICE == "cuda" else []
)


@pytest.mark.parametrize("dtype,mass_method,forward_exp", CASES)
@pytest.mark.parametrize("shape", [(1, 2, 37, 91, 64), (2, 4, 130, 300, 64), (1, 16, 1041, 3123, 64)])
def test_fused_matches_reference(dtype, mass_method, forward_exp, shape):
    B, H, M, N, D = shape
    if DEVICE == "cpu" and M * N > 20000:
        pytest.skip("too slow in the interpreter")
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g, device=DEVICE) for n in (M, N, N))
    bias = torch.randn(B, H, N, generator=g, device=DEVICE).abs().log1p()
    valid = torch.rand(B, H, N, generator=g, device=DEVICE) > 0.1
    ref_out, ref_mass = attention_with_key_mass(q.double(), k.double(), v.double(), key_bias=bias.double(), key_valid=valid)
    out, mass = fused_attention_with_key_mass(q.to(dtype), k.to(dtype), v.to(dtype), bias, valid, mass_method=mass_method,
                                              forward_exp=forward_exp)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-5
    assert (out.double() - ref_out).abs().max().item() <= tol
    # masses are sums over M queries of probabilities: compare relative to the total M
    assert ((mass.double() - ref_mass).abs().max() / M).item() <= tol
    assert torch.equal(mass[~valid], torch.zeros_like(mass[~valid]))
    if dtype != torch.float32:  # the float16 sums still rank keys as the exact sum does, up to near-ties
        exact_out, exact = fused_attention_with_key_mass(q.to(dtype), k.to(dtype), v.to(dtype), bias, valid,
                                                         mass_method="exact", forward_exp="float32")
        assert ((mass - exact).abs() <= 2e-3 * exact.abs() + 1e-3).all()
        # float16 exponentials move the output by at most a few bf16 units of its values
        assert (out.float() - exact_out.float()).abs().max().item() <= 1e-2


@pytest.mark.parametrize("with_bias", [False, True])
def test_mass_keys_zero_the_unread_keys_and_leave_the_rest_exact(with_bias):
    """Keys whose mass is not read (a range of whole and partial 128-key blocks, and a padded
    tail) get mass 0; every other key's mass and the output are bit for bit those without the mask."""
    g = torch.Generator(device=DEVICE).manual_seed(2)
    B, H, M, N, D = 2, 2, 70, 700, 64
    q, k, v = (torch.randn(B, H, n, D, generator=g, device=DEVICE) for n in (M, N, N))
    bias = torch.randn(B, H, N, generator=g, device=DEVICE).abs().log1p() if with_bias else None
    valid = torch.ones(B, H, N, dtype=torch.bool, device=DEVICE)
    valid[1, :, 600:] = False  # stream 1 is shorter: padding
    read = valid.clone()
    read[0, :, 100:420] = False  # e.g. retrieved keys
    out, mass = fused_attention_with_key_mass(q, k, v, bias, valid)
    out_m, mass_m = fused_attention_with_key_mass(q, k, v, bias, valid, mass_keys=read)
    assert torch.equal(out, out_m)
    assert torch.equal(mass_m[read], mass[read])
    assert torch.equal(mass_m[~read], torch.zeros_like(mass_m[~read]))


def test_fully_masked_rows_give_zero_output():
    q = torch.randn(1, 1, 16, 16, device=DEVICE)
    k = torch.randn(1, 1, 32, 16, device=DEVICE)
    out, mass = fused_attention_with_key_mass(q, k, k, valid=torch.zeros(1, 1, 32, dtype=torch.bool, device=DEVICE))
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(mass, torch.zeros_like(mass))


@pytest.mark.parametrize("n_keys", [64, 128, 100])
def test_strided_views_without_bias_match_reference(n_keys):
    """Caches hand over slices of larger buffers (not contiguous over heads); no copy, same result.
    Key counts on and off the block size exercise the unmasked main loop and the ragged tail."""
    g = torch.Generator(device=DEVICE).manual_seed(1)
    q = torch.randn(1, 2, 40, 32, generator=g, device=DEVICE)
    buffer = torch.randn(2, 1, 2, 200, 32, generator=g, device=DEVICE)  # [k/v, B, H, capacity, D]
    k, v = buffer[0, :, :, :n_keys], buffer[1, :, :, :n_keys]
    assert not k.is_contiguous()
    ref_out, ref_mass = attention_with_key_mass(q.double(), k.double(), v.double())
    out, mass = fused_attention_with_key_mass(q, k, v)
    assert (out.double() - ref_out).abs().max().item() <= 2e-5
    assert ((mass.double() - ref_mass).abs().max() / q.shape[2]).item() <= 2e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32])
def test_fused_qk_norm_rope_matches_eager_ops(dtype):
    """The fused q/k LayerNorm + 2D RoPE kernel gives what nn.LayerNorm then RotaryEmbedding2D give,
    for shared (expanded) and per-row positions."""
    from stac_backend.kernels.qk_norm_rope import qk_norm_rope
    from stac_backend.model.rope import RotaryEmbedding2D, frame_token_positions

    g = torch.Generator(device="cpu").manual_seed(2)
    B, H, D = 2, 3, 64
    pos = frame_token_positions(5, 7, 5).to(DEVICE)
    N = pos.shape[0]
    qkv = torch.randn(B, N, 3, H, D, generator=g).to(DEVICE, dtype) * 3 + 1
    q_norm, k_norm = (torch.nn.LayerNorm(D, eps=1e-6).to(DEVICE, dtype) for _ in range(2))
    with torch.no_grad():
        for norm in (q_norm, k_norm):
            norm.weight.copy_(torch.randn(D, generator=g).to(dtype))
            norm.bias.copy_(torch.randn(D, generator=g).to(dtype))
    rope = RotaryEmbedding2D(100.0)
    for positions in (pos.unsqueeze(0).expand(B, -1, -1), torch.stack([pos, pos.flip(0)])):
        with torch.no_grad():
            eager_q = rope(q_norm(qkv[:, :, 0].transpose(1, 2)), positions)
            eager_k = rope(k_norm(qkv[:, :, 1].transpose(1, 2)), positions)
            cos, sin = rope.tables(positions, D // 2, qkv.device, dtype)
            q, k = qk_norm_rope(qkv, positions, cos, sin, q_norm, k_norm)
        tol = 5e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: LayerNorm's reduction order may move one rounding step
        assert q.shape == eager_q.shape == (B, H, N, D)
        assert (q.float() - eager_q.float()).abs().max().item() <= tol
        assert (k.float() - eager_k.float()).abs().max().item() <= tol


# ---------------------------------------------------------------------------------------------
# Voxel-pool kernels (kernels/pool_kernels.py) against the eager ops they replace
# ---------------------------------------------------------------------------------------------


def _fill_pool(dtype=torch.float32, steps=4, buffer_size=4, max_pivots=3, score_gate=0.2, M=None, voxels=2,
               ties=False, carry_slots=8):
    """Insert clustered keys into a few voxels over several steps: rows fill their buffers, collapse,
    run out of pivot slots (sibling merges), merge and gate - every stage of an insert. ``voxels``
    per axis (8 voxels by default; 1: every token of a (layer, head) lands in one row)."""
    from stac_backend.cache.voxel_pool import VoxelPool

    if M is None:  # (fewer tokens in the CPU interpreter, where every kernel op costs milliseconds)
        M = 300 if INTERPRET else 800
    g = torch.Generator(device=DEVICE).manual_seed(1)
    pool = VoxelPool(2, 2, 16, buffer_size=buffer_size, max_pivots=max_pivots, score_gate=score_gate,
                     max_voxels=32, initial_voxels=4, carry_slots=carry_slots, dtype=dtype, device=DEVICE)
    base = torch.randn(6, 16, generator=g, device=DEVICE)
    for step in range(steps):
        layer = torch.randint(0, 2, (M,), generator=g, device=DEVICE)
        head = torch.randint(0, 2, (M,), generator=g, device=DEVICE)
        k = base[torch.randint(0, 6, (M,), generator=g, device=DEVICE)] + 0.6 * torch.randn(M, 16, generator=g, device=DEVICE)
        v = torch.randn(M, 16, generator=g, device=DEVICE)
        score = torch.rand(M, generator=g, device=DEVICE)
        if ties:
            score = (score * 8).floor() / 8  # many equal scores: buffer order falls back to arrival
        coords = torch.randint(0, voxels, (M, 3), generator=g, device=DEVICE)
        pool.insert(layer, head, k, v, score, coords, step)
    return pool


@pytest.fixture
def launch(monkeypatch):
    """Set insert_rows' launch (tokens per key loop, warps) and ranking (rounds, counts; None:
    chosen from the tokens per row); in the CPU interpreter, where a loop iteration costs
    milliseconds, wider blocks keep the test short (the code path is the same)."""
    from stac_backend.kernels import pool_kernels

    def use(config, ranking=None):
        if config is None and INTERPRET:
            config = (32, 1)
        block, warps = config if config is not None else (None, None)
        monkeypatch.setattr(pool_kernels, "_SEGMENT_BLOCK", block)
        monkeypatch.setattr(pool_kernels, "_INSERT_WARPS", warps)
        monkeypatch.setattr(pool_kernels, "_RANK_BY_ROUNDS", None if ranking is None else ranking == "rounds")

    return use


RANKINGS = ("rounds", "counts")


def _kernel_and_eager(monkeypatch, **kw):
    from stac_backend.cache import voxel_pool

    monkeypatch.setattr(voxel_pool, "kernels_apply", lambda t: True)
    fused = _fill_pool(**kw)
    monkeypatch.setattr(voxel_pool, "kernels_apply", lambda t: False)
    return fused, _fill_pool(**kw)


def _assert_same_pool(fused, eager, atol=1e-4):
    assert fused.stats() == eager.stats()
    for name, t in eager._tensors.items():
        assert torch.allclose(fused._tensors[name].float(), t.float(), atol=atol), name


@pytest.mark.parametrize("ranking", RANKINGS)
@pytest.mark.parametrize("buffer_size,max_pivots,score_gate", [(4, 3, 0.2), (8, 4, 0.2), (4, 2, 0.0)])
def test_pool_insert_with_kernels_equals_eager_insert(monkeypatch, launch, buffer_size, max_pivots, score_gate, ranking):
    """Float32 pool: several inserts through the kernel (insert_rows: every touched row, new and
    carried tokens, in one launch), ranked either way, make the same decisions as the torch ops
    and the same values to float32 rounding."""
    launch(None, ranking)
    fused, eager = _kernel_and_eager(monkeypatch, buffer_size=buffer_size, max_pivots=max_pivots, score_gate=score_gate)
    stats = eager.stats()
    # the case reaches every stage (so a kernel that skipped one could not pass)
    assert stats["merged_tokens"] > 10 and stats["pivots_created"] > 10 and stats["carried_tokens"] > 0
    assert (stats["sibling_merges"] > 0) == (max_pivots < 4)
    assert (stats["gated_tokens"] > 10) == (score_gate > 0)
    _assert_same_pool(fused, eager)


@pytest.mark.parametrize("ranking", RANKINGS)
@pytest.mark.parametrize("config", [None, (8, 1), (16, 2)] if DEVICE == "cuda" else [None])
def test_pool_insert_kernel_long_rows_and_score_ties(monkeypatch, launch, config, ranking):
    """One voxel: ~200 tokens per (layer, head) row per insert, so the score loops cross their
    blocks (32 or 128 tokens), rows overflow their buffer and carry, and tied scores keep arrival
    order, ranked either way."""
    launch(config, ranking)
    fused, eager = _kernel_and_eager(monkeypatch, steps=3, M=300 if INTERPRET else 800, voxels=1, ties=True)
    stats = eager.stats()
    assert stats["overflow_dropped_tokens"] > 0 and stats["carried_tokens"] > 0
    _assert_same_pool(fused, eager)


@pytest.mark.parametrize("ranking", RANKINGS)
@pytest.mark.parametrize("buffer_size,carry_slots", [(4, 0), (8, 3)])
def test_pool_insert_kernel_carry_caps(monkeypatch, launch, buffer_size, carry_slots, ranking):
    """Other carry caps (none; buffer + carry not a power of two): the ranking of buffered, new
    and carried candidates (either way) still fills buffer and carry slots as the torch path
    does, drops and zeroed slots included."""
    launch(None, ranking)
    fused, eager = _kernel_and_eager(monkeypatch, steps=3, voxels=1, buffer_size=buffer_size, carry_slots=carry_slots)
    stats = eager.stats()
    assert stats["overflow_dropped_tokens"] > 0 and (stats["carried_tokens"] > 0) == (carry_slots > 0)
    _assert_same_pool(fused, eager)


def test_pool_insert_kernels_bfloat16_pool(monkeypatch, launch):
    """bf16 pool, one insert: same decisions; pivots equal to bf16 rounding (later inserts may then
    differ where a rounded pivot tips a merge decision, as they may between GPUs)."""
    launch(None)
    fused, eager = _kernel_and_eager(monkeypatch, dtype=torch.bfloat16, steps=1)
    assert fused.stats() == eager.stats() and eager.stats()["pivots_created"] > 0
    for name, t in eager._tensors.items():
        torch.testing.assert_close(fused._tensors[name].float(), t.float(), rtol=2e-2, atol=5e-2, msg=name)


@pytest.mark.parametrize("stride", [2, 4])
def test_mass_from_every_nth_query_matches_reference(stride):
    """The mass pass over a strided view of the queries equals the blockwise reference with the
    same ``mass_query_stride``; the output is the one without it, bit for bit."""
    g = torch.Generator(device=DEVICE).manual_seed(3)
    B, H, M, N, D = 2, 2, 130, 300, 64
    q, k, v = (torch.randn(B, H, n, D, generator=g, device=DEVICE) for n in (M, N, N))
    bias = torch.randn(B, H, N, generator=g, device=DEVICE).abs().log1p()
    valid = torch.rand(B, H, N, generator=g, device=DEVICE) > 0.1
    _, ref_mass = attention_with_key_mass(q.double(), k.double(), v.double(), key_bias=bias.double(), key_valid=valid,
                                          mass_query_stride=stride)
    out_all, _ = fused_attention_with_key_mass(q, k, v, bias, valid)
    out, mass = fused_attention_with_key_mass(q, k, v, bias, valid, mass_query_stride=stride)
    assert torch.equal(out, out_all)
    assert ((mass.double() - ref_mass).abs().max() / M).item() <= 2e-5
    assert torch.equal(mass[~valid], torch.zeros_like(mass[~valid]))
