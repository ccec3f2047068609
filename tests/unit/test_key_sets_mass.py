"""Per-key mass of several streams in one attention call equals the naive formula (the column sum
of softmax probabilities over the step's queries, per head) for every key a stream reads, and is 0
for the keys it says it does not read (``KeySet.mass_skip``)."""

from __future__ import annotations

import torch

from stac_backend.cache.key_sets import KeySet, attend_key_sets


def naive(q: torch.Tensor, s: KeySet) -> tuple[torch.Tensor, torch.Tensor]:
    """q [H, M, D] against one key set, in float64: output [H, M, D] and mass [H, Nk]."""
    q, k, v = q.double(), s.k.double(), s.v.double()
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if s.bias is not None:
        logits = logits + s.bias.double()[:, None, :]
    if s.valid is not None:
        logits = logits.masked_fill(~s.valid[:, None, :], float("-inf"))
    p = logits.softmax(dim=-1)
    return p @ v, p.sum(dim=1)


def test_mass_of_read_keys_is_the_naive_sum_and_skipped_keys_get_zero():
    g = torch.Generator().manual_seed(0)
    H, M, D = 2, 6, 8
    q = torch.randn(3, H, M, D, generator=g)
    sets = []
    for n, extra in ((20, (5, 9)), (13, None), (17, (0, 4))):
        k, v = torch.randn(H, n, D, generator=g), torch.randn(H, n, D, generator=g)
        bias = torch.zeros(H, n)
        valid = torch.ones(H, n, dtype=torch.bool)
        if extra:
            bias[:, extra[0]:extra[1]] = torch.rand(H, extra[1] - extra[0], generator=g) + 0.5
            valid[0, extra[0]] = False
        sets.append(KeySet(k, v, bias, valid, need_mass=True, mass_skip=extra))
    out, masses = attend_key_sets(q, sets)
    for b, s in enumerate(sets):
        ref_out, ref_mass = naive(q[b], s)
        torch.testing.assert_close(out[b].double(), ref_out, rtol=1e-5, atol=1e-5)
        read = torch.ones(s.k.shape[1], dtype=torch.bool)
        if s.mass_skip:
            read[s.mass_skip[0]:s.mass_skip[1]] = False
        torch.testing.assert_close(masses[b][:, read].double(), ref_mass[:, read], rtol=1e-5, atol=1e-5)
        assert torch.equal(masses[b][:, ~read], torch.zeros_like(masses[b][:, ~read]))


def test_one_stream_with_skipped_keys():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 5, 8, generator=g)
    k, v = torch.randn(2, 11, 8, generator=g), torch.randn(2, 11, 8, generator=g)
    bias = torch.zeros(2, 11)
    bias[:, 3:6] = 1.0
    s = KeySet(k, v, bias, None, need_mass=True, mass_skip=(3, 6))
    out, masses = attend_key_sets(q, [s])
    ref_out, ref_mass = naive(q[0], s)
    torch.testing.assert_close(out[0].double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masses[0][:, [0, 1, 2, 6, 7, 8, 9, 10]].double(), ref_mass[:, [0, 1, 2, 6, 7, 8, 9, 10]])
    assert torch.equal(masses[0][:, 3:6], torch.zeros(2, 3))


def test_segmented_key_sets_equal_joined_ones_exactly():
    """A key set handed over as segments (views of a store around retrieved keys) gives the same
    output and mass, bit for bit, as the same keys joined into one tensor, alone and batched."""
    g = torch.Generator().manual_seed(2)
    H, M, D = 2, 5, 8
    q = torch.randn(2, H, M, D, generator=g)

    def key_set(n_old, n_extra, n_new, segmented):
        parts_k = [torch.randn(H, n, D, generator=g) for n in (n_old, n_extra, n_new)]
        parts_v = [torch.randn(H, n, D, generator=g) for n in (n_old, n_extra, n_new)]
        n = n_old + n_extra + n_new
        bias = torch.zeros(H, n)
        bias[:, n_old:n_old + n_extra] = 0.7
        k = tuple(parts_k) if segmented else torch.cat(parts_k, dim=1)
        v = tuple(parts_v) if segmented else torch.cat(parts_v, dim=1)
        return KeySet(k, v, bias, None, need_mass=True, mass_skip=(n_old, n_old + n_extra))

    for sizes in ([(6, 3, 4), (9, 2, 4)], [(6, 3, 4)]):
        outs = []
        for segmented in (True, False):
            g.manual_seed(7)
            sets = [key_set(*s, segmented) for s in sizes]
            outs.append(attend_key_sets(q[: len(sets)], sets))
        (out_a, mass_a), (out_b, mass_b) = outs
        assert torch.equal(out_a, out_b)
        assert all(torch.equal(a, b) for a, b in zip(mass_a, mass_b))


def test_a_batch_sums_mass_over_every_nth_query_with_the_smallest_stride_of_its_streams():
    """Streams asking for strides 4 and 2 in one call both get the stride-2 estimate: the naive sum
    over query rows 0, 2, 4, ... scaled by M / rows used."""
    g = torch.Generator().manual_seed(5)
    H, M, D = 2, 9, 8
    q = torch.randn(2, H, M, D, generator=g)
    sets = [KeySet(torch.randn(H, n, D, generator=g), torch.randn(H, n, D, generator=g), need_mass=True,
                   mass_query_stride=stride) for n, stride in ((12, 4), (7, 2))]
    out, masses = attend_key_sets(q, sets)
    rows = torch.arange(0, M, 2)
    for b, s in enumerate(sets):
        ref_out, _ = naive(q[b], s)
        _, ref_mass = naive(q[b][:, rows], s)
        torch.testing.assert_close(out[b].double(), ref_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(masses[b].double(), ref_mass * (M / len(rows)), rtol=1e-5, atol=1e-5)
