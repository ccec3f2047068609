"""Memory-bounded steps on a GPU: micro-batched steps equal one unsplit step, "auto" sizes its
micro-batches from a measured step peak, and a warm-up hands back every byte it allocated."""

from __future__ import annotations

import gc

import pytest
import torch

from stac_backend.cache import CacheConfig
from stac_backend.engine.torch_runtime import TorchRuntime

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STAC = CacheConfig(policy="stac", conf_threshold=0.0, retrieval_start_frame=4, retrieval_every=1)
HW = (56, 84)


def test_split_step_equals_unsplit_step_on_cuda(cuda_tiny_model):
    generator = torch.Generator().manual_seed(3)
    frames = [torch.rand(20, 3, *HW, generator=generator) for _ in range(5)]
    unsplit = TorchRuntime(cuda_tiny_model, STAC, max_batch_streams=None)
    split = TorchRuntime(cuda_tiny_model, STAC, max_batch_streams=2)
    a = [unsplit.open_stream() for _ in frames]
    b = [split.open_stream() for _ in frames]
    for step in range(5):
        chunks = [f[4 * step:4 * step + 4] for f in frames]
        outs_a = unsplit.step(a, [s.validate(c) for s, c in zip(a, chunks)])
        outs_b = split.step(b, [s.validate(c) for s, c in zip(b, chunks)])
        for oa, ob in zip(outs_a, outs_b):
            for name in oa:
                torch.testing.assert_close(oa[name], ob[name], rtol=1e-4, atol=1e-4, equal_nan=True)
    assert [s.memory_bytes() for s in a] == [s.memory_bytes() for s in b]


def test_auto_measures_and_warmup_returns_its_memory(cuda_tiny_model):
    runtime = TorchRuntime(cuda_tiny_model, CacheConfig(policy="stac"))
    stream = runtime.open_stream()  # first use of the kernels' workspaces, outside the measurement
    TorchRuntime(cuda_tiny_model, STAC, max_batch_streams=None).step([stream], [stream.validate(torch.rand(4, 3, *HW))])
    stream.reset()
    del stream
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    report = runtime.warmup(HW, batch_sizes=(1, 4))
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before < 1 << 20  # a leaked tiny stream would hold ~7 MB
    size = runtime.micro_batch_streams(HW)
    assert 1 <= size <= runtime.auto_max_batch_streams and report["micro_batch_streams"] == size
    assert runtime.step_memory_bytes(HW) == runtime.activation_bytes(HW, size) > 0
