"""Checkpoint layout, strict loading with a full report, and save/load round trips."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from stac_backend.engine import Stream
from stac_backend.model import (
    VGGT,
    CheckpointMismatchError,
    build_model,
    check_state_dict,
    count_parameters,
    get_preset,
    load_checkpoint,
    save_checkpoint,
)

KEYS_FILE = Path(__file__).resolve().parents[3] / "shared" / "data" / "vggt1b_keys.tsv"


def released_layout() -> dict[str, tuple]:
    if not KEYS_FILE.is_file():
        pytest.skip(f"reference key list not found at {KEYS_FILE}")
    layout = {}
    for line in KEYS_FILE.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape, _dtype = line.split("\t")
        layout[name] = tuple(ast.literal_eval(shape))
    return layout


@pytest.fixture(scope="module")
def meta_vggt1b():
    with torch.device("meta"):
        return VGGT(get_preset("vggt-1b"))


def test_vggt1b_preset_matches_released_checkpoint_layout(meta_vggt1b):
    layout = released_layout()
    ours = {k: tuple(v.shape) for k, v in meta_vggt1b.state_dict().items()}
    assert ours == layout
    assert count_parameters(meta_vggt1b) == 1_256_537_516


def test_mismatched_state_dict_names_every_problem(meta_vggt1b):
    state = dict(meta_vggt1b.state_dict())
    state["aggregator.camera_tokn"] = state.pop("aggregator.camera_token")  # renamed
    del state["depth_head.norm.weight"]  # missing
    state["point_head.norm.bias"] = torch.empty(7, device="meta")  # mis-shaped
    with pytest.raises(CheckpointMismatchError) as info:
        check_state_dict(meta_vggt1b, state, "test")
    message = str(info.value)
    for needle in ("aggregator.camera_token", "aggregator.camera_tokn", "depth_head.norm.weight", "point_head.norm.bias", "(7,)"):
        assert needle in message
    assert info.value.missing == ["aggregator.camera_token", "depth_head.norm.weight"]
    assert info.value.unexpected == ["aggregator.camera_tokn"]
    assert [m[0] for m in info.value.mis_shaped] == ["point_head.norm.bias"]


def _outputs(model, frames):
    stream = Stream(model, chunk_size=2)
    return [stream.push(frames[i : i + 2]) for i in range(0, len(frames), 2)]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_load_round_trip_is_bit_identical(tmp_path, tiny_model, frames12, suffix):
    path = tmp_path / f"tiny{suffix}"
    save_checkpoint(tiny_model, path)
    restored = build_model(checkpoint=path)  # config comes from the checkpoint
    assert restored.config == tiny_model.config
    for a, b in zip(_outputs(tiny_model, frames12[:4]), _outputs(restored, frames12[:4])):
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_loads_plain_and_nested_state_dicts(tmp_path, tiny_model):
    plain, nested = tmp_path / "plain.pth", tmp_path / "nested.pt"
    torch.save(tiny_model.state_dict(), plain)
    torch.save({"model": tiny_model.state_dict(), "epoch": 3}, nested)
    for path in (plain, nested):
        other = build_model(tiny_model.config, seed=123)
        load_checkpoint(other, path)
        for (k, a), b in zip(tiny_model.state_dict().items(), other.state_dict().values()):
            assert torch.equal(a, b), k


def test_refuses_pickled_code(tmp_path, tiny_model):
    path = tmp_path / "evil.pt"
    torch.save({"model": tiny_model.state_dict(), "payload": Path("/")}, path)  # arbitrary object
    with pytest.raises(ValueError, match="weights-only"):
        load_checkpoint(tiny_model, path)


def test_missing_file_and_wrong_model(tmp_path, tiny_model):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tiny_model, tmp_path / "nope.pt")
    path = tmp_path / "tiny.pt"
    save_checkpoint(tiny_model, path)
    with torch.device("meta"):
        big = VGGT(get_preset("vggt-1b"))
    with pytest.raises(CheckpointMismatchError, match="wrong shape"):
        load_checkpoint(big, path)
