"""Shared fixtures: a tiny random model whose camera head predicts a plausible field of view, and
the loader of scripts that are not package modules (benchmarks, deploy tools)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from stac_backend.model import build_model

# Tiny models gain nothing from intra-op threads, and oversubscribed threads slow them 10x+.
torch.set_num_threads(1)


def make_tiny_model(seed: int = 0, **config_changes):
    """The tiny preset with LayerScale 1 (not 0.01), so attention across frames visibly matters and
    equivalence tests are not vacuous."""
    from stac_backend.model import config_with, get_preset

    changes = {"init_values": 1.0, "camera_init_values": 1.0, **config_changes}
    config = config_with(get_preset("tiny"), **changes)
    model = build_model(config, seed=seed)
    with torch.no_grad():
        # Random weights put the field of view near 0 (focal length near infinity); bias it to ~1 rad.
        model.camera_head.pose_branch.fc2.bias[7:].fill_(1.0)
    return model


def load_script(path, name: str):
    """The Python file at ``path`` imported as module ``name`` (benchmarks/*.py, deploy/*.py), with
    its folder on ``sys.path`` while it loads so that it can import its siblings."""
    path = Path(path)
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(path.parent))


@pytest.fixture(scope="session")
def tiny_model():
    return make_tiny_model()


@pytest.fixture(scope="module")
def cuda_tiny_model():
    """The tiny preset on the GPU with layer scales at 1, so that every block changes the tokens."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from stac_backend.model import config_with, get_preset

    config = config_with(get_preset("tiny"), init_values=1.0, camera_init_values=1.0)
    return build_model(config, device="cuda", seed=0)


@pytest.fixture(scope="session")
def frames12():
    generator = torch.Generator().manual_seed(1)
    return torch.rand(12, 3, 56, 84, generator=generator)


# Every test is marked by the folder it lives in, so `pytest -m unit`, `-m integration` (a real
# tritonserver, nginx or perf_analyzer is started) and `-m gpu` (CUDA kernels and graphs) select a tier.
_TIER_BY_FOLDER = {"unit": "unit", "integration": "integration", "gpu": "gpu"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        folder = item.path.parent.name
        tier = _TIER_BY_FOLDER.get(folder)
        if tier is not None:
            item.add_marker(getattr(pytest.mark, tier))
