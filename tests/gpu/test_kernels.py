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


# ---------------------------------------------------------------------------------------------
# Segmented keys (fused_segmented_attention_with_key_mass): each row's keys read where they lie
# ---------------------------------------------------------------------------------------------


def _segment_rows(g, H, D):
    """Rows of (k, v) segments of every kind the kernels meet: a slice of a larger cache buffer (read
    in place), an empty segment, fresh tensors, a view with tokens H*D apart and one misaligned
    from q (both copied first), lengths on and off the block sizes, and a row far shorter than
    the longest."""
    buffer = torch.randn(2, H, 200, D, generator=g, device=DEVICE)  # [k/v, H, capacity, D]
    # [k/v, H, 50, D] with tokens H*D apart
    token_major = torch.randn(2, 50, H, D, generator=g, device=DEVICE).transpose(1, 2)
    flat = torch.randn(2, 3 + H * 20 * D, generator=g, device=DEVICE)
    misaligned = flat[:, 3:].view(2, H, 20, D)  # 12 bytes past a 16-byte boundary

    def fresh(n):
        return _fresh_segment(g, H, n, D)

    return [
        [(buffer[0, :, :70], buffer[1, :, :70]), fresh(0), fresh(64), (token_major[0], token_major[1]),
         (misaligned[0], misaligned[1])],
        [fresh(9)],
        [fresh(30), fresh(129), fresh(1), fresh(0)],
    ]


def _fresh_segment(g, H, n, D):
    return tuple(torch.randn(H, n, D, generator=g, device=DEVICE) for _ in range(2))


def _padded_concatenation(rows, H, D):
    """The rows' keys and values joined and right-padded with zeros: [B, H, N, D] each, and each row's count."""
    lengths = [sum(k.shape[1] for k, _ in row) for row in rows]
    k = torch.zeros(len(rows), H, max(lengths), D, device=DEVICE)
    v = torch.zeros_like(k)
    for b, row in enumerate(rows):
        if row:
            k[b, :, : lengths[b]] = torch.cat([s for s, _ in row], dim=1)
            v[b, :, : lengths[b]] = torch.cat([s for _, s in row], dim=1)
    return k, v, lengths


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("with_mass_keys", [False, True])
def test_segmented_keys_equal_the_padded_concatenation(stride, with_mass_keys):
    """Out and mass over segments equal ``fused_attention_with_key_mass`` on the joined, padded keys
    (the padding invalid there); keys past a row's end get mass 0 though valid and mass_keys say
    they are read; only the segments that are not readable in place are copied."""
    from stac_backend.kernels.attention_mass import _segment_table, fused_segmented_attention_with_key_mass

    g = torch.Generator(device=DEVICE).manual_seed(4)
    H, M, D = 2, 37, 16
    rows = _segment_rows(g, H, D)
    k, v, lengths = _padded_concatenation(rows, H, D)
    B, N = len(rows), k.shape[2]
    q = torch.randn(B, H, M, D, generator=g, device=DEVICE)
    bias = torch.randn(B, H, N, generator=g, device=DEVICE).abs().log1p()
    valid = torch.rand(B, H, N, generator=g, device=DEVICE) > 0.1
    in_row = torch.arange(N, device=DEVICE)[None, None, :] < torch.tensor(lengths, device=DEVICE)[:, None, None]
    mass_keys = None
    if with_mass_keys:
        mass_keys = torch.ones(B, H, N, dtype=torch.bool, device=DEVICE)
        mass_keys[0, :, 20:150] = False  # a range of unread keys across segments and whole blocks
    ref_out, ref_mass = fused_attention_with_key_mass(q, k, v, bias, valid & in_row, mass_keys=mass_keys,
                                                      mass_query_stride=stride)
    out, mass = fused_segmented_attention_with_key_mass(q, rows, bias, valid, mass_keys=mass_keys,
                                                        mass_query_stride=stride)
    assert mass.shape == (B, H, N) and mass.dtype == torch.float32
    assert (out - ref_out).abs().max().item() <= 2e-5
    assert ((mass - ref_mass).abs().max() / M).item() <= 2e-5
    absent = ~(valid & in_row) if mass_keys is None else ~(valid & in_row & mass_keys)
    assert torch.equal(mass[absent], torch.zeros_like(mass[absent]))
    copies = _segment_table(q, rows, 128).copies
    assert len(copies) == 4  # k and v of the token-major view and of the misaligned one


def test_segmented_keys_without_bias_or_valid():
    """No bias and no valid mask (no bias loads): keys past each row's end are still absent; a
    segment slot empty in every row takes no mass programs; an empty row gets output 0 and mass 0;
    without need_mass the output is the same and no mass comes back."""
    from stac_backend.kernels.attention_mass import fused_segmented_attention_with_key_mass

    g = torch.Generator(device=DEVICE).manual_seed(5)
    H, M, D = 2, 20, 16
    rows = [[_fresh_segment(g, H, n, D) for n in lengths] for lengths in ((9, 0, 40), (30, 0, 1, 129), ())]
    k, v, lengths = _padded_concatenation(rows, H, D)
    B, N = len(rows), k.shape[2]
    q = torch.randn(B, H, M, D, generator=g, device=DEVICE)
    in_row = torch.arange(N, device=DEVICE)[None, None, :] < torch.tensor(lengths, device=DEVICE)[:, None, None]
    ref_out, ref_mass = fused_attention_with_key_mass(q, k, v, valid=in_row.expand(B, H, N))
    out, mass = fused_segmented_attention_with_key_mass(q, rows)
    assert (out - ref_out).abs().max().item() <= 2e-5
    assert ((mass - ref_mass).abs().max() / M).item() <= 2e-5
    assert torch.equal(out[-1], torch.zeros_like(out[-1])) and torch.equal(mass[-1], torch.zeros_like(mass[-1]))
    out_only, none = fused_segmented_attention_with_key_mass(q, rows, need_mass=False)
    assert none is None and torch.equal(out_only, out)


@pytest.mark.parametrize("batch", [1, 3])
def test_attend_key_sets_on_the_segmented_kernel_equals_the_reference_path(monkeypatch, batch):
    """attend_key_sets with segmented key sets (bias, valid, skipped keys, a mass query stride) gives
    on the fused kernel (reading the segments in place) what the blockwise reference gives on the
    padded keys: same outputs, same per-stream masses."""
    from stac_backend.cache import key_sets
    from stac_backend.cache.key_sets import KeySet, attend_key_sets

    g = torch.Generator(device=DEVICE).manual_seed(6)
    H, M, D = 2, 24, 16
    sets = []
    for b, row in enumerate(_segment_rows(g, H, D)[:batch]):
        n = sum(k.shape[1] for k, _ in row)
        bias = torch.randn(H, n, generator=g, device=DEVICE).abs().log1p() if b != 1 else None
        valid = torch.rand(H, n, generator=g, device=DEVICE) > 0.1 if b != 2 else None
        sets.append(KeySet(tuple(k for k, _ in row), tuple(v for _, v in row), bias, valid, need_mass=b != 1,
                           mass_skip=(5, 40) if b == 0 else None, mass_query_stride=2 if b == 0 else 1))
    q = torch.randn(batch, H, M, D, generator=g, device=DEVICE)
    monkeypatch.setattr(key_sets, "USE_FUSED", False)
    ref_out, ref_masses = attend_key_sets(q, sets)
    monkeypatch.setattr(key_sets, "USE_FUSED", True)
    monkeypatch.setattr(key_sets, "_FUSED_OFF_CUDA", True)
    monkeypatch.setattr(key_sets, "USE_SEGMENTED", True)
    assert key_sets._segmented(q)
    out, masses = attend_key_sets(q, sets)
    assert (out - ref_out).abs().max().item() <= 2e-5
    for mass, ref, s in zip(masses, ref_masses, sets):
        assert (mass is None) == (ref is None) == (not s.need_mass)
        if mass is not None:
            assert mass.shape == ref.shape == (H, s.num_keys)
            assert ((mass - ref).abs().max() / M).item() <= 2e-5
