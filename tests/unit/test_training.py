"""The training losses (stac_backend.training.train): known answers, and a two-step run that resumes."""

from __future__ import annotations

import json

import torch

import pytest
from safetensors.torch import load_file

from stac_backend.data import HELD_OUT_SEED, SPLIT_COUNT, VALIDATION_SEED, split_overlapping
from stac_backend.model import build_model
from stac_backend.training.train import (TRAJECTORIES, bounded_frame_mask, camera_loss, compute_losses, confidence_l1,
                                         loop_rows, main, pool_seed0, render_pool, revisit_window, sample_batch,
                                         scene_scale)


def test_scene_scale_is_the_mean_valid_point_distance():
    points = torch.zeros(2, 1, 2, 2, 3)
    points[0, 0, 0, 0] = torch.tensor([3.0, 4.0, 0.0])  # distance 5
    points[0, 0, 1, 1] = torch.tensor([0.0, 0.0, 1.0])  # distance 1
    points[1] = 2.0  # every point at distance 2*sqrt(3)
    valid = torch.zeros(2, 1, 2, 2, dtype=torch.bool)
    valid[0, 0, 0, 0] = valid[0, 0, 1, 1] = True
    valid[1] = True
    assert torch.allclose(scene_scale(points, valid), torch.tensor([3.0, 2 * 3 ** 0.5]))


def test_confidence_optimum_is_alpha_over_the_scale_relative_error():
    """d/dc (c * e/s - alpha * log c) = 0  ->  c = alpha * s / e: the same confidence for the same
    relative error in a small and a large scene."""
    alpha = 0.2
    target = torch.zeros(1, 1, 1, 1)
    valid = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    for scale, err in ((1.0, 0.02), (10.0, 0.2)):
        conf = torch.linspace(1.0, 30.0, 2901)
        losses = torch.stack([confidence_l1(target + err, c.view(1, 1, 1, 1), target, valid, torch.tensor([scale]), alpha)
                              for c in conf])
        best = conf[losses.argmin()]
        assert abs(float(best) - alpha * scale / err) < 0.02


def test_two_steps_then_resume(tmp_path):
    torch.set_num_threads(1)
    args = ["--preset", "tiny", "--device", "cpu", "--pool", "2", "--pool-frames", "6", "--batch", "1", "--frames", "4",
            "--height", "28", "--width", "42", "--max-steps", "2", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    assert json.loads((tmp_path / "run" / "state.json").read_text())["step"] == 2
    assert main(args[:-2] + ["--max-steps", "3", "--resume", str(tmp_path / "run" / "last.pt"), "--out", str(tmp_path / "run2")]) == 0
    assert json.loads((tmp_path / "run2" / "state.json").read_text())["step"] == 3


def test_a_revisit_window_goes_more_than_once_around_the_lap_between_its_first_frames():
    import random

    total = 300  # one closed lap: frame 299 is frame 0, so 299 distinct frames
    window = revisit_window(total, 256, random.Random(3))
    assert len(window) == 256 and all(0 <= i < total - 1 for i in window)
    stride = (window[1] - window[0]) % (total - 1)
    assert stride == 2  # the smallest covering 1.25 laps
    assert stride * 255 >= 1.25 * (total - 1)
    first_lap = set(window[: (total - 1) // 2 + 1])
    revisits = window[(total - 1) // 2 + 1:]
    # an odd lap at stride 2: the second time round falls between the first lap's frames
    assert revisits and not first_lap & set(revisits)
    with pytest.raises(ValueError, match="revisit window"):
        revisit_window(2, 8, random.Random(0))


def test_revisit_windows_come_from_the_pools_loops_and_plain_windows_never_wrap():
    import random

    n, total = 6, 40
    rows = torch.arange(n).view(n, 1).expand(n, total)
    pool = {"images": torch.zeros(n, total, 1), "row": rows, "frame": torch.arange(total).expand(n, total)}
    assert [TRAJECTORIES[i % 3] for i in loop_rows(n)] == ["loop", "loop"]
    batch = sample_batch(pool, 64, 16, random.Random(0), max_stride=1, revisit_fraction=1.0)
    assert set(batch["row"][:, 0].tolist()) <= set(loop_rows(n))
    assert all(len(set(r.tolist())) == 16 and max(r.tolist()) < total - 1 for r in batch["frame"])
    plain = sample_batch(pool, 64, 16, random.Random(0), max_stride=1)
    assert all(r.tolist() == list(range(r[0], r[0] + 16)) for r in plain["frame"])


def test_training_with_revisit_windows_runs_and_refuses_a_bad_share(tmp_path):
    torch.set_num_threads(1)
    args = ["--preset", "tiny", "--device", "cpu", "--pool", "3", "--pool-frames", "7", "--batch", "2", "--frames", "4",
            "--height", "28", "--width", "42", "--max-steps", "1", "--out", str(tmp_path / "run")]
    assert main(args + ["--revisit-fraction", "1.0"]) == 0
    with pytest.raises(SystemExit):
        main(args + ["--revisit-fraction", "1.5"])


def test_weight_average_saved_and_resumed(tmp_path):
    torch.set_num_threads(1)
    args = ["--preset", "tiny", "--device", "cpu", "--pool", "2", "--pool-frames", "6", "--batch", "1", "--frames", "4",
            "--height", "28", "--width", "42", "--max-steps", "2", "--ema", "0.5", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    run = tmp_path / "run"
    state = torch.load(run / "last.pt", weights_only=True)
    weights, averaged = load_file(run / "model.safetensors"), load_file(run / "model_ema.safetensors")
    assert set(weights) == set(averaged)
    name = "aggregator.camera_token"
    # the file holds the average the state holds, and it differs from the last step's weights
    assert torch.equal(averaged[name], state["ema"][name]) and not torch.equal(averaged[name], weights[name])
    assert torch.equal(weights[name], state["model"][name])  # the model's own weights came back after saving
    assert main(args[:-4] + ["--max-steps", "3", "--ema", "0.5", "--resume", str(run / "last.pt"),
                             "--out", str(tmp_path / "run2")]) == 0
    resumed = torch.load(tmp_path / "run2" / "last.pt", weights_only=True)
    step3 = resumed["model"][name]
    # one more step of the average, from the resumed one: avg3 = (avg2 + w3) / 2
    torch.testing.assert_close(resumed["ema"][name], (state["ema"][name] + step3) / 2)
    with pytest.raises(SystemExit):
        main(args[:-4] + ["--ema", "1.0", "--out", str(tmp_path / "bad")])


def test_training_pools_never_render_held_out_or_validation_scenes():
    assert pool_seed0(11, 0, 128) == 1_100_000  # runs with --seed 11 drew 1,100,000 on: past the held-out range
    assert pool_seed0(3, 5000, 384) == 300_384  # a fresh pool every 5,000 steps
    assert pool_seed0(15, 0, 96) == 1_500_000  # the seeds the embedded checkpoint's latest runs used
    for seed, step, pool in ((10, 0, 2), (9, 5000 * 260, 384)):  # starts inside / runs into the held-out range
        with pytest.raises(ValueError, match="held-out scenes"):
            pool_seed0(seed, step, pool)
    with pytest.raises(ValueError, match="validation scenes"):
        pool_seed0(20, 0, 96)
    assert HELD_OUT_SEED + SPLIT_COUNT <= 1_100_000 and VALIDATION_SEED == 2_000_000
    assert [split_overlapping(s, 1) for s in (999_999, 1_000_000, 1_009_999, 1_010_000, 2_000_003)] == [
        None, "held-out", "held-out", None, "validation"]


def test_the_bounded_mask_holds_the_chunk_frame_0_the_window_and_the_nearest_older_frames():
    # cameras on a line out and back: frame i at x = min(i, 24 - i), so frame 24 - j is where frame j was
    S, chunk, window, retrieval = 24, 4, 4, 2
    x = torch.tensor([float(min(i, 24 - i)) for i in range(S)])
    centres = torch.stack([x, torch.zeros(S), torch.zeros(S)], dim=-1)[None]
    mask = bounded_frame_mask(centres, chunk, window, retrieval)[0]
    causal = (torch.arange(S) // chunk)[:, None] >= (torch.arange(S) // chunk)[None, :]
    assert not (mask & ~causal).any()  # never a later chunk
    seen = lambda frame: set(torch.nonzero(mask[frame]).flatten().tolist())  # noqa: E731
    assert seen(0) == {0, 1, 2, 3} and seen(5) == {0, 1, 2, 3, 4, 5, 6, 7}
    # frames 20-23 sit at x = 4..1, mean 2.5: the nearest frames older than the window (16-19) are 2 and 3
    assert seen(21) == {0, 2, 3, 16, 17, 18, 19, 20, 21, 22, 23}
    assert all(len(seen(f)) <= chunk + 1 + window + retrieval for f in range(S))
    # with a window as long as the stream it is the causal mask
    assert torch.equal(bounded_frame_mask(centres, chunk, S, retrieval)[0], causal)


def test_a_frame_mask_of_the_chunks_is_the_chunked_forward():
    from stac_backend.model import build_model

    torch.manual_seed(0)
    model = build_model("tiny", seed=0).eval()
    images = torch.rand(1, 6, 3, 28, 42)
    chunk = (torch.arange(6) // 2)
    with torch.no_grad():
        chunked = model(images, chunk_size=2)
        masked = model(images, chunk_size=2, frame_mask=chunk[:, None] >= chunk[None, :])
        batched = model(images, chunk_size=2, frame_mask=(chunk[:, None] >= chunk[None, :])[None])
        limited = model(images, chunk_size=2, frame_mask=torch.eye(6, dtype=torch.bool))
    for key in ("pose_enc", "depth", "world_points"):
        assert torch.equal(chunked[key], masked[key]) and torch.equal(chunked[key], batched[key])
    assert not torch.allclose(chunked["depth"][:, 2:], limited["depth"][:, 2:])
    with pytest.raises(ValueError, match="frame_mask"):
        model(images, chunk_size=2, frame_mask=torch.ones(5, 5, dtype=torch.bool))


def test_training_under_the_bounded_mask_runs_and_refuses_a_bad_share(tmp_path):
    torch.set_num_threads(1)
    args = ["--preset", "tiny", "--device", "cpu", "--pool", "2", "--pool-frames", "12", "--batch", "2", "--frames", "12",
            "--chunk", "2", "--height", "28", "--width", "42", "--max-steps", "1", "--bounded-window", "2",
            "--out", str(tmp_path / "run")]
    assert main(args + ["--bounded-fraction", "1.0"]) == 0
    with pytest.raises(SystemExit):
        main(args + ["--bounded-fraction", "-0.1"])


def _pose(translation, quaternion=(0.0, 0.0, 0.0, 1.0), fov=(1.0, 0.8)):
    return torch.tensor([*translation, *quaternion, *fov]).view(1, 1, 9)


def test_huber_camera_loss_known_answer():
    """Huber (delta 0.1) per translation and fov component, L1 on the quaternion up to its sign."""
    target = _pose((0.0, 0.0, 0.0))
    pred = _pose((1.0, 0.05, 0.0), quaternion=(0.0, 0.0, 0.0, -1.0), fov=(1.0, 0.6))
    # translation: 1 m past delta (linear part) plus 0.05 m inside it; quaternion: -q is q; fov: 0.2 past delta, weight 0.5
    expected = (0.1 * (1.0 - 0.05) + 0.5 * 0.05 ** 2) + 0.0 + 0.5 * (0.1 * (0.2 - 0.05))
    assert torch.allclose(camera_loss(pred, target), torch.tensor(expected))


def test_relative_camera_loss_is_scale_free_and_keeps_its_gradient_for_large_errors():
    target = _pose((0.5, -0.2, 1.0))
    pred = _pose((1.5, -0.2, 1.0), fov=(1.1, 0.8))
    small = camera_loss(pred, target, torch.tensor([2.0]), "relative")
    scaled = lambda pose, k: torch.cat([pose[..., :3] * k, pose[..., 3:]], dim=-1)  # noqa: E731
    large = camera_loss(scaled(pred, 10.0), scaled(target, 10.0), torch.tensor([20.0]), "relative")
    assert torch.allclose(small, large)
    assert torch.allclose(small, torch.tensor(1.0 / 2.0 + 0.5 * 0.1))
    # a 1 m translation error: d loss / d t is 1 / scale, not Huber's 0.1 cap
    pred.requires_grad_(True)
    camera_loss(pred, target, torch.tensor([2.0]), "relative").backward()
    assert torch.allclose(pred.grad[0, 0, 0], torch.tensor(0.5))
    with pytest.raises(ValueError, match="scene scale"):
        camera_loss(pred, target, None, "relative")
    with pytest.raises(ValueError, match="unknown camera loss"):
        camera_loss(pred, target, torch.tensor([2.0]), "l2")


def test_the_camera_weight_scales_the_camera_term_of_the_total_only():
    torch.manual_seed(0)
    model = build_model("tiny", device="cpu", seed=0, cuda_graphs=False, compile=False, fp8=False).eval()
    batch = {k: v[:1] for k, v in render_pool(1, 4, 28, 42, "cpu", seed0=0).items()}
    with torch.no_grad():
        one = compute_losses(model, batch, 2, camera=("relative", 1.0))
        five = compute_losses(model, batch, 2, camera=("relative", 5.0))
    assert torch.equal(one["camera"], five["camera"]) and float(one["camera"]) > 0
    assert torch.allclose(five["total"] - one["total"], 4.0 * one["camera"])


def test_training_with_the_relative_camera_loss_runs_and_refuses_a_bad_weight(tmp_path):
    torch.set_num_threads(1)
    args = ["--preset", "tiny", "--device", "cpu", "--pool", "2", "--pool-frames", "6", "--batch", "1", "--frames", "4",
            "--height", "28", "--width", "42", "--max-steps", "1", "--camera-loss", "relative", "--out", str(tmp_path / "run")]
    assert main(args + ["--camera-weight", "5"]) == 0
    for bad in (["--camera-weight", "0"], ["--camera-loss", "l2"]):
        with pytest.raises(SystemExit):
            main(args + bad)
