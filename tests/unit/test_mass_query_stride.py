"""Scoring keys from every N-th query (``CacheConfig.mass_query_stride``) in a real stream: the
step's outputs do not change, each head's scores keep their total (every counted query spreads a
probability of 1 over the keys, and the sum is scaled back to all queries) while the individual
scores become estimates, and the cache stays within its bound."""

from __future__ import annotations

import pytest
import torch

from stac_backend.cache import CacheConfig
from stac_backend.engine import Stream
from stac_backend.model import OUTPUT_NAMES

SMALL = dict(chunk=2, window=2, hh=1, retrieval_start_frame=4, voxel_size=0.05, conf_threshold=0.0, buffer_size=2,
             max_pivots=2)


@pytest.mark.parametrize("policy", ["heavy_hitter", "stac"])
def test_strided_scores_keep_their_total_and_the_first_outputs(tiny_model, policy):
    frames = torch.rand(10, 3, 56, 84, generator=torch.Generator().manual_seed(6))
    streams = {s: Stream(tiny_model, cache=CacheConfig(policy=policy, mass_query_stride=s, **SMALL)) for s in (1, 3)}
    first = {s: stream.push(frames[:2]) for s, stream in streams.items()}
    for name in OUTPUT_NAMES:
        assert torch.equal(first[1][name], first[3][name]), name
    exact, strided = streams[1].cache.layers, streams[3].cache.layers
    assert sorted(exact) == sorted(strided)
    for layer in exact:
        a, b = exact[layer].score, strided[layer].score
        tokens = float(a.shape[1])  # nothing pruned yet: each head's scores add up to its token count
        torch.testing.assert_close(a.sum(dim=1), torch.full_like(a[:, 0], tokens), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(b.sum(dim=1), torch.full_like(b[:, 0], tokens), rtol=1e-4, atol=1e-3)
        assert not torch.allclose(a, b), layer
    for i in range(2, 10, 2):
        stream = streams[3]
        out = stream.push(frames[i : i + 2])
        assert all(torch.isfinite(out[n]).all() for n in OUTPUT_NAMES if out[n].is_floating_point())
        assert stream.memory_bytes() <= stream.memory_bound()
