"""The stac command line, in-process: a folder of images in, npz/PLY/trajectory out."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from stac_backend.assets import EMBEDDED_CHECKPOINT
from stac_backend.cli import main
from stac_backend.model import build_model
from stac_backend.results import read_ply_points


def test_stream_folder_writes_reconstruction(tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(frames / f"{i:03d}.png")
    out = tmp_path / "out"
    assert main(["stream", str(frames), "--out", str(out), "--preset", "tiny", "--chunk-size", "4", "--quiet",
                 "--policy", "heavy_hitter"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == 6 and summary["points"] > 0
    assert len(list((out / "frames").glob("frame_*.npz"))) == 6
    with np.load(out / "frames" / "frame_00005.npz") as f:
        assert f["depth"].shape == (84, 112) and f["extrinsics"].shape == (3, 4)
    assert read_ply_points(out / "points.ply").shape == (summary["points"], 3)
    assert len(json.loads((out / "trajectory.json").read_text())["frames"]) == 6
    assert len((out / "trajectory_tum.txt").read_text().splitlines()) == 7


def test_bad_source_is_a_clear_error(tmp_path, capsys):
    assert main(["stream", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--preset", "tiny", "--quiet"]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_embedded_checkpoint_is_the_small_trained_model():
    model = build_model(checkpoint=EMBEDDED_CHECKPOINT)
    assert model.config.embed_dim == 128 and model.config.depth == 6
    assert EMBEDDED_CHECKPOINT.stat().st_size <= 25_000_000


def test_stream_video_file(tmp_path):
    av = __import__("pytest").importorskip("av", reason="video input needs PyAV (pip install av)")
    path = tmp_path / "clip.mp4"
    rng = np.random.default_rng(1)
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=10)
        video.width, video.height, video.pix_fmt = 128, 96, "yuv420p"
        for _ in range(6):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8), format="rgb24")
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
    out = tmp_path / "out"
    assert main(["stream", str(path), "--out", str(out), "--preset", "tiny", "--quiet", "--no-frames"]) == 0
    assert json.loads((out / "summary.json").read_text())["frames"] == 6


def test_serve_output_dtype_option():
    from stac_backend.cli import build_parser, serve_settings_from_args
    from stac_backend.serving.repository import render_config

    base = ["serve", "--preset", "tiny", "--checkpoint", "x.safetensors", "--device", "cpu"]
    default = serve_settings_from_args(build_parser().parse_args(base))
    assert default.output_dtype == "float32" and "TYPE_FP16" not in render_config(default)
    fp16 = serve_settings_from_args(build_parser().parse_args(base + ["--output-dtype", "float16"]))
    assert fp16.output_dtype == "float16" and 'data_type: TYPE_FP16' in render_config(fp16)
    with pytest.raises(SystemExit):
        build_parser().parse_args(base + ["--output-dtype", "bfloat16"])
