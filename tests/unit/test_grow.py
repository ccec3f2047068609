"""Growing a trained model deeper (stac_backend.training.grow): the grown model computes exactly what
the original does, offline and streaming, and training picks its size up from the file."""

from __future__ import annotations

import json

import pytest
import torch

from stac_backend.cache import CacheConfig
from stac_backend.engine import Stream
from stac_backend.model import build_model, save_checkpoint
from stac_backend.training.grow import grow_depth, grown_index
from stac_backend.training.grow import main as grow_main
from stac_backend.training.train import main as train_main

from conftest import make_tiny_model


@pytest.fixture(scope="module")
def tiny_and_grown():
    model = make_tiny_model(seed=3)
    return model, grow_depth(model, 3)


def test_grown_config_and_renumbered_head_layers(tiny_and_grown):
    model, grown = tiny_and_grown
    assert grown.config.depth == 3 * model.config.depth
    assert grown.config.dpt_intermediate_layer_idx == tuple(grown_index(i, 3) for i in model.config.dpt_intermediate_layer_idx)
    assert grown.config.dpt_intermediate_layer_idx == (2, 5, 8, 11)
    # the new blocks are identities: both LayerScale gammas zero; the original blocks keep theirs
    for index, block in enumerate(grown.aggregator.global_blocks):
        original = index % 3 == 2
        assert bool(block.ls1.gamma.abs().sum() > 0) == original
        assert bool(block.ls2.gamma.abs().sum() > 0) == original


def test_grown_model_equals_the_original_offline(tiny_and_grown):
    model, grown = tiny_and_grown
    images = torch.rand(1, 6, 3, 28, 42)
    with torch.no_grad():
        expected, got = model(images, chunk_size=2), grown(images, chunk_size=2)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


# stac with a bar of 0 and early retrieval, so evicted tokens reach the pool and come back.
POLICIES = ["full", "window", CacheConfig(policy="stac", conf_threshold=0.0, retrieval_start_frame=4, retrieval_every=1)]


@pytest.mark.parametrize("policy", POLICIES, ids=["full", "window", "stac"])
def test_grown_model_equals_the_original_streaming(tiny_and_grown, policy):
    """Chunk after chunk through a cache: the new global layers cache and score their keys too, and
    every policy keeps the same tokens for the original layers."""
    model, grown = tiny_and_grown
    frames = torch.rand(12, 3, 28, 42)
    expected_stream, got_stream = Stream(model, cache=policy, chunk_size=2), Stream(grown, cache=policy, chunk_size=2)
    with torch.no_grad():
        for chunk in frames.split(2):
            expected, got = expected_stream.push(chunk), got_stream.push(chunk)
            for name in expected:
                assert torch.equal(expected[name], got[name]), name
    if policy != "full":
        assert expected_stream.cache.stats()["evicted_tokens"] > 0
    if isinstance(policy, CacheConfig):
        assert expected_stream.cache.stats()["pooled_tokens"] > 0
        assert got_stream.cache.stats()["retrieved_per_head"] > 0


def test_growing_refuses_what_it_cannot_keep_exact():
    with pytest.raises(ValueError, match="factor must be >= 1"):
        grow_depth(make_tiny_model(), 0)
    with pytest.raises(ValueError, match="LayerScale"):
        grow_depth(make_tiny_model(init_values=0.0), 2)
    with pytest.raises(ValueError, match="aa_block_size 1"):
        grow_depth(make_tiny_model(depth=4, aa_block_size=2, dpt_intermediate_layer_idx=(0, 1, 2, 3)), 2)


def test_grow_cli_then_training_takes_the_size_from_the_file(tmp_path):
    torch.set_num_threads(1)
    original = tmp_path / "tiny.safetensors"
    save_checkpoint(build_model("tiny", seed=0), original)
    grown = tmp_path / "grown.safetensors"
    assert grow_main(["--checkpoint", str(original), "--factor", "2", "--out", str(grown)]) == 0
    assert build_model(checkpoint=grown).config.depth == 8
    run = tmp_path / "run"
    args = ["--device", "cpu", "--pool", "2", "--pool-frames", "6", "--batch", "1", "--frames", "4", "--height", "28",
            "--width", "42", "--max-steps", "1"]
    assert train_main(args + ["--resume", str(grown), "--out", str(run)]) == 0  # no --preset: the file's config
    assert build_model(checkpoint=run / "model.safetensors").config.depth == 8
    # resuming the run's last.pt (weights + optimizer) keeps the grown size too
    assert train_main(args[:-1] + ["2", "--resume", str(run / "last.pt"), "--out", str(tmp_path / "run2")]) == 0
    assert json.loads((tmp_path / "run2" / "state.json").read_text())["step"] == 2
    assert build_model(checkpoint=tmp_path / "run2" / "model.safetensors").config.depth == 8
