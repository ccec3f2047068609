"""The in-place hot store (``CacheConfig.store="slots"``) on a GPU: batched stac streams give the
same outputs as the compact store through the GPU's attention kernels, including the steps where a
store is not yet full and its free slots are masked out of the attention."""

from __future__ import annotations

import pytest
import torch

from stac_backend.cache import CacheConfig
from stac_backend.engine.torch_runtime import TorchRuntime

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HW = (56, 84)
SETTINGS = dict(policy="stac", conf_threshold=0.0, retrieval_start_frame=4, retrieval_every=1, voxel_size=0.05)


@pytest.mark.parametrize("segmented", [False, True], ids=["padded keys", "segments in place"])
def test_slots_match_the_default_store_on_cuda(cuda_tiny_model, monkeypatch, segmented):
    """Both ways the fused attention can read the slot store's key set: copied into padded buffers
    (the default) or segment by segment where it lies (STAC_SEGMENTED_ATTENTION=1)."""
    from stac_backend.cache import key_sets

    monkeypatch.setattr(key_sets, "USE_SEGMENTED", segmented)
    generator = torch.Generator().manual_seed(7)
    frames = [torch.rand(23, 3, *HW, generator=generator) for _ in range(3)]
    runtimes = {store: TorchRuntime(cuda_tiny_model, CacheConfig(store=store, **SETTINGS)) for store in ("compact", "slots")}
    streams = {store: [rt.open_stream() for _ in frames] for store, rt in runtimes.items()}
    # Chunks of 4 with a short one: the first steps leave slots free (masked keys), later ones evict.
    bounds = [0, 4, 8, 11, 15, 19, 23]
    for lo, hi in zip(bounds, bounds[1:]):
        outs = {}
        for store, rt in runtimes.items():
            chunks = [f[lo:hi] for f in frames]
            outs[store] = rt.step(streams[store], [s.validate(c) for s, c in zip(streams[store], chunks)])
        for a, b in zip(outs["compact"], outs["slots"]):
            for name in a:
                torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-4, equal_nan=True, msg=f"{name}, frames {lo}-{hi}")
    for a, b in zip(streams["compact"], streams["slots"]):
        stats_a, stats_b = a.cache.stats(), b.cache.stats()
        assert stats_a["evicted_tokens"] == stats_b["evicted_tokens"] > 0
        assert stats_a["pooled_tokens"] == stats_b["pooled_tokens"] > 0
        assert b.memory_bytes() <= b.memory_bound()
