"""What a user of the command line meets: defaults in --help, one-line errors with hints, stac info,
the same uint8 frames in-process as served, and what the output folder records."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from stac_backend.cli import build_parser, main, one_line_error
from stac_backend.results import ReconstructionWriter


def subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in subparsers(sub))


def test_every_help_shows_the_defaults():
    parser = build_parser()
    seen = dict(subparsers(parser))
    assert {"serve", "stream", "demo", "view", "info", "fleet", "perf sweep"} <= set(seen)
    for name, sub in seen.items():
        assert sub.formatter_class is argparse.ArgumentDefaultsHelpFormatter, name
    text = seen["serve"].format_help()
    for expected in ("(default: 8001)", "(default: 8000)", "(default: 8002)", "(default: stac)", "(default: 16)"):
        assert expected in text, expected


def test_unreachable_server_is_one_line(tmp_path, capsys):
    code = main(["stream", "synthetic:4", "--out", str(tmp_path / "o"), "--server", "127.0.0.1:1", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "cannot reach a Triton server at 127.0.0.1:1" in err[0] and "stac serve" in err[0]


def test_user_errors_become_one_line_hints():
    from stac_backend.tools.triton_install import TritonServerError

    assert one_line_error(ModuleNotFoundError("No module named 'viser'", name="viser")) == \
        "missing package 'viser': pip install \"stac-backend[viewer]\""
    assert "stac-backend[client]" in one_line_error(ModuleNotFoundError("x", name="tritonclient.grpc"))
    clash = one_line_error(TritonServerError("cannot start tritonserver: grpc port 8001 already in use on 127.0.0.1"))
    assert "already in use" in clash and "--grpc-port" in clash and "\n" not in clash
    assert one_line_error(RuntimeError("a bug")) is None  # bugs keep their traceback


def test_info_names_the_default_model_and_the_tools(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "default model (no --preset, no --checkpoint)" in out
    assert "tritonserver:" in out and "perf_analyzer:" in out


def test_in_process_streams_feed_the_same_uint8_frames_as_served(tiny_model, frames12):
    """stac stream in-process quantises frames to uint8 first, as the client does for a server."""
    from stac_backend.cli import _local_stepper
    from stac_backend.engine import Stream
    from stac_backend.cache import CacheConfig
    from stac_backend.protocol import to_uint8_frames

    step, _ = _local_stepper(tiny_model, argparse.Namespace(policy="window", chunk_size=4))
    reference = Stream(tiny_model, cache=CacheConfig(policy="window", chunk=4))
    for i in range(0, 8, 4):
        out = step(frames12[i:i + 4], i == 0, False)
        expected = reference.push(torch.from_numpy(to_uint8_frames(frames12[i:i + 4])))
        assert torch.equal(out["depth"], expected["depth"])


def test_output_folder_records_images_source_and_seconds(tmp_path):
    rng = np.random.default_rng(0)
    writer = ReconstructionWriter(tmp_path, source="video cam.mp4", fps=25.0)
    for k in range(3):
        h, w = 14, 28
        outputs = {
            "depth": rng.random((h, w), dtype=np.float32), "depth_conf": rng.random((h, w), dtype=np.float32) + 1,
            "world_points": rng.random((h, w, 3), dtype=np.float32),
            "world_points_conf": np.ones((h, w), np.float32),  # flat: filtering by it would keep everything
            "extrinsics": np.eye(3, 4, dtype=np.float32), "intrinsics": np.eye(3, dtype=np.float32),
        }
        writer.add(k, outputs, rng.random((3, h, w), dtype=np.float32))
    summary = writer.finish()
    assert summary["points"] == 3 * (14 * 28 // 2)  # the top half by depth_conf, which varies
    with np.load(tmp_path / "frames" / "frame_00002.npz") as f:
        assert f["rgb"].shape == (14, 28, 3) and f["rgb"].dtype == np.uint8
        assert str(f["source"]) == "video cam.mp4" and int(f["frame"]) == 2
    tum = (tmp_path / "trajectory_tum.txt").read_text().splitlines()
    assert "seconds" in tum[0] and tum[3].split()[0] == "0.080000"
    assert json.loads((tmp_path / "trajectory.json").read_text())["fps"] == 25.0
    with pytest.raises(ValueError, match="conf_key"):
        ReconstructionWriter(tmp_path / "x", conf_key="nope")


def test_port_clash_is_one_line_with_a_hint(tmp_path, capsys):
    """The launcher checks its ports before starting anything: no tritonserver is started here."""
    import socket

    pytest.importorskip("pytriton")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--grpc-port", str(port), "--http-port", "0", "--metrics-port", "0",
                     "--workdir", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"grpc port {port} already in use" in err[0] and "--grpc-port" in err[0]
