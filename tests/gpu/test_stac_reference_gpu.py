"""The ``stac`` policy on CUDA (the pool's insert through its kernel, kernels/pool_kernels.py)
against the recorded run of the reference rules that tests/unit/test_stac_reference.py checks on
CPU: the same kept sets, pooled / buffered / carried counts, pivots, retrieved tokens and outputs
at every step."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
import test_stac_reference as reference  # noqa: E402


def test_stac_policy_on_cuda_matches_the_reference_rules_at_every_step(monkeypatch):
    from stac_backend.kernels import pool_kernels

    if not pool_kernels.ENABLED or not pool_kernels.HAVE_TRITON:
        pytest.skip("the pool kernels are off (STAC_POOL_KERNELS=0 or no OpenAI Triton)")
    # float32 convolutions and matmuls as on CPU (TF32 would move the kept sets' close calls)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    recording = torch.load(reference.RECORDING, weights_only=True)
    reference.check_against_recording(recording, monkeypatch, "cuda")
