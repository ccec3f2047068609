"""The ``stac`` command line.

    stac demo                          local Triton + the small model: stream a generated scene end to end
    stac serve                         run Triton with the stac model (Ctrl-C stops it)
    stac stream SOURCE --out DIR       reconstruct a folder of images, a video or `synthetic:N`
                                       (in-process, or through a server with --server HOST:PORT)
    stac synth --out DIR               write a synthetic scene with ground truth
    stac view DIR                      show a finished output folder (point cloud, cameras, depth)
    stac info                          presets, parameter counts, cache bytes per frame, tools found
    stac eval DATASET --out DIR        score every cache policy on a dataset with ground truth
    stac export onnx|tensorrt|repository   export the step graph and build TensorRT engines

Every failure a user can cause (a port in use, an unreachable server, a missing package, a bad
source) ends in one line on stderr with a hint, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .model_args import add_model_args, load_model_from_args, resolve_model_args
from .results import POINT_SOURCES  # numpy only
from .serving.settings import DEFAULT_IDLE_TTL_S, DEFAULT_MAX_STREAMS  # torch-free

def _add_serving_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", default="stac", help="cache policy: full, window, sink_window, heavy_hitter, stac")
    p.add_argument("--max-streams", type=int, default=DEFAULT_MAX_STREAMS, help="live streams per model instance")
    p.add_argument("--max-cache-bytes", type=int, default=None, help="cap on the sum of live streams' memory bounds")
    p.add_argument("--idle-ttl", type=float, default=DEFAULT_IDLE_TTL_S,
                   help="seconds of client silence before a stream is freed")
    p.add_argument("--host", default="127.0.0.1", help="address the server binds to")
    p.add_argument("--output-dtype", choices=("float32", "float16"), default="float32",
                   help="wire dtype of the dense outputs (depth, points and their confidences); float16 halves "
                        "their bytes, relative error <= 2^-11 (poses stay float32)")
    p.add_argument("--output-device", choices=("cpu", "gpu"), default="cpu",
                   help="gpu (GPU device only): hand the float outputs to Triton as CUDA tensors (CUDA IPC), "
                        "skipping a host copy and the Python backend's shared memory")
    p.add_argument("--decoupled", action="store_true",
                   help="send responses from a thread of the model while the next batch computes (Triton's "
                        "decoupled transaction policy); clients must use gRPC streaming (StacClient and "
                        "'stac fleet' do; perf_analyzer needs --streaming)")


def model_image_size(args: argparse.Namespace) -> int:
    """The frame width the model of ``args`` was trained at (its config's img_size), published to
    clients in the model config; 0 when it cannot be read cheaply."""
    from .model import PRESETS

    if args.preset:
        return PRESETS[args.preset].img_size if args.preset in PRESETS else 0
    if args.checkpoint is None or Path(args.checkpoint).suffix != ".safetensors":
        return 0
    try:  # the header only: a vggt-1b checkpoint is 5 GB
        from safetensors import safe_open

        from .model.checkpoint import CONFIG_METADATA_KEY

        with safe_open(str(args.checkpoint), framework="numpy") as f:
            recorded = (f.metadata() or {}).get(CONFIG_METADATA_KEY)
        return int(json.loads(recorded)["img_size"]) if recorded else 0
    except (ImportError, OSError, ValueError, KeyError):
        return 0


def cmd_stream(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .results import ReconstructionWriter
    from .sources import chunks, open_source

    if args.server:
        step, describe, spec = _remote_stepper(args)
        if not (args.size or spec.size):
            raise ValueError(f"the server at {args.server} does not publish its frame size (model-config "
                             "parameter IMAGE_SIZE): give --size")
        target, mode = args.size or spec.size, args.mode or spec.preprocess
    else:
        model = load_model_from_args(args)
        target, mode = args.size or model.config.img_size, args.mode or "crop"
        step, describe = _local_stepper(model, args)
    source = open_source(args.source, mode=mode, target=target, max_frames=args.max_frames)
    print(f"streaming {source.description} {describe}, chunks of {args.chunk_size}", file=sys.stderr)
    writer = ReconstructionWriter(args.out, conf_threshold=args.conf_threshold, save_frames=not args.no_frames,
                                  conf_key=args.conf_key, source=source.description,
                                  fps=getattr(source, "fps", None), points_from=args.points_from)
    live = _live_viewer(args)
    started = time.perf_counter()
    frames_done, cache_bytes = 0, 0
    with tqdm(total=source.length, unit="frame", disable=args.quiet) as bar:
        for chunk, is_last in _with_last(chunks(source, args.chunk_size)):
            out = step(chunk, frames_done == 0, is_last)
            cache_bytes = int(np.asarray(out.pop("cache_bytes", 0)).reshape(-1)[0])
            for i, index in enumerate(np.asarray(out["frame_index"]).tolist()):
                frame_out = {k: v[i] for k, v in out.items() if k != "frame_index"}
                writer.add(index, frame_out, chunk[i])
                if live is not None:
                    live.add_frame(index, frame_out, chunk[i])
            frames_done += len(chunk)
            bar.update(len(chunk))
            bar.set_postfix(cache=f"{cache_bytes / 2**20:.1f}MiB")
    elapsed = time.perf_counter() - started
    summary = writer.finish()
    summary.update(seconds=round(elapsed, 3), frames_per_second=round(frames_done / max(elapsed, 1e-9), 2),
                   cache_bytes=cache_bytes, server=args.server or None)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    if live is not None:
        live.finish()
    return 0


def _live_viewer(args: argparse.Namespace):
    """--view: the viewer, fed frame by frame while the stream runs (imported only then)."""
    if not getattr(args, "view", False):
        return None
    from .viewer.live import LiveViewer

    viewer = LiveViewer(host=args.view_host, port=args.view_port, conf_key=getattr(args, "conf_key", "depth_conf"),
                        points_from=getattr(args, "points_from", "depth"))
    print(f"viewer at {viewer.url}", file=sys.stderr)
    return viewer


def _with_last(items):
    """(item, is_last) pairs, with one item of lookahead."""
    iterator = iter(items)
    try:
        previous = next(iterator)
    except StopIteration:
        return
    for item in iterator:
        yield previous, False
        previous = item
    yield previous, True


def _local_stepper(model, args):
    from .cache import CacheConfig
    from .engine import Stream

    import torch

    from .protocol import to_uint8_frames

    stream = Stream(model, cache=CacheConfig(policy=args.policy, chunk=args.chunk_size))

    def step(chunk, first, last):
        # uint8, as a served stream receives its frames: both paths see the same pixels
        out = stream.push(torch.from_numpy(to_uint8_frames(chunk)))
        out["cache_bytes"] = stream.memory_bytes()
        return out

    return step, f"in-process ({model.config.patch_embed} model, {args.policy} cache)"


def _remote_stepper(args):
    from .client import StacClient, new_stream_id

    client = StacClient(args.server, model=args.model_name)
    spec = client.frame_spec()  # also: an unreachable server fails here, in one line
    stream_id = args.stream_id or new_stream_id()  # random: another client cannot guess it

    def step(chunk, first, last):
        return client.send_chunk(stream_id, chunk, start=first, end=last)

    return step, f"through Triton at {args.server} (stream id {stream_id})", spec


def serve_settings_from_args(args: argparse.Namespace):
    from .serving.settings import ServeSettings

    resolve_model_args(args)
    return ServeSettings.on_device(
        args.device,
        preset=args.preset or "",
        dtype=args.dtype,
        cache_config={"policy": args.policy},
        max_streams=args.max_streams,
        max_cache_bytes=args.max_cache_bytes,
        idle_ttl_s=args.idle_ttl,
        output_dtype=args.output_dtype,
        output_device=args.output_device,
        decoupled=args.decoupled,
        image_size=model_image_size(args),
    )


def _start_server(args: argparse.Namespace, workdir: Path, ports=(0, 0, 0)):
    from .serving.repository import local_server

    return local_server(
        serve_settings_from_args(args), workdir, args.checkpoint,
        http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2], host=args.host,
        log_callback=None if args.quiet else (lambda line: print(line, file=sys.stderr)), die_with_parent=True,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C / SIGTERM (exit 0) or until tritonserver dies (exit 1, so that a supervisor
    restarts it); either way the server's shared memory is removed."""
    import signal

    workdir = Path(args.workdir)
    server = _start_server(args, workdir, (args.http_port, args.grpc_port, args.metrics_port))
    print(f"stac model ready in {server.startup_seconds:.1f} s: {json.dumps(server.urls)} (Ctrl-C stops)", flush=True)
    if not args.quiet:
        print(f"admin key for the restricted protocols (shared memory, repository, logging, trace, statistics): "
              f"header {json.dumps(server.admin_headers('http'))}", file=sys.stderr)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while server.is_running() and not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        stop.append(1)
    finally:
        died = not stop and not server.is_running()
        code = server.stop()
    if died:
        print(f"stac: error: tritonserver exited with code {code}; last lines:\n" + "\n".join(server.log_tail(20)),
              file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Local Triton with the small model; a generated scene streamed through it over gRPC."""
    workdir = Path(args.out) / "server"
    server = _start_server(args, workdir)
    try:
        print(f"server ready in {server.startup_seconds:.1f} s at {server.grpc_url}", file=sys.stderr)
        args.server, args.size, args.source = server.grpc_url, None, f"synthetic:{args.frames}"
        args.mode, args.max_frames, args.no_frames, args.stream_id = None, None, False, None
        return cmd_stream(args)
    finally:
        server.stop()


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .assets import EMBEDDED_CHECKPOINT
    from .engine import full_cache_bytes_per_frame
    from .model import PRESETS, VGGT, count_parameters

    for name, config in PRESETS.items():
        with torch.device("meta"):
            params = count_parameters(VGGT(config))
        side = config.img_size
        h = int(round(side * 3 / 4 / config.patch_size) * config.patch_size)
        per_frame = full_cache_bytes_per_frame(config, h, side, torch.bfloat16)
        print(f"{name:8s} {params:>14,d} parameters; full cache at {side}x{h} bf16: {per_frame / 2**20:.2f} MiB/frame")
    if EMBEDDED_CHECKPOINT.is_file():
        print(f"default model (no --preset, no --checkpoint): the trained small preset, {EMBEDDED_CHECKPOINT}")
    else:
        print("default model (no --preset, no --checkpoint): tiny, random weights (the embedded checkpoint is missing)")
    for line in tool_report():
        print(line)
    return 0


def tool_report() -> list[str]:
    """Whether tritonserver (from nvidia-pytriton) and perf_analyzer were found, and how to get them."""
    lines = []
    try:
        from .tools.triton_install import find_triton_install

        install = find_triton_install()
        lines.append(f"tritonserver: {install.binary} (nvidia-pytriton {install.package_version})")
    except Exception as exc:  # noqa: BLE001 - not installed, or an unusable install: say which
        lines.append(f"tritonserver: not found ({str(exc).splitlines()[0]}); pip install \"stac-backend[serving]\"")
    try:
        from .loadgen.perf import find_perf_analyzer

        analyzer = find_perf_analyzer()
    except ImportError:
        analyzer = None
    lines.append(f"perf_analyzer: {analyzer.binary}" if analyzer else "perf_analyzer: not found; stac perf install")
    return lines


def cmd_view(args: argparse.Namespace) -> int:
    from .viewer import view_folder

    return view_folder(args.folder, host=args.view_host, port=args.view_port, serve=not args.no_serve, save=args.save,
                       video=args.video, snapshot=args.snapshot)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stac", description="Streaming 3D reconstruction with STAC cache compression")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="local Triton + small model; stream a generated scene through it")
    _add_view_args(p)
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=4)
    p.add_argument("--conf-threshold", type=float, default=None, help="absolute confidence bar for points.ply "
                   "(default: the top half of each frame)")
    p.add_argument("--conf-key", choices=("depth_conf", "world_points_conf"), default="depth_conf",
                   help="which confidence filters points.ply")
    p.add_argument("--points", choices=POINT_SOURCES, default="depth", dest="points_from",
                   help="points.ply and the viewer from depth + cameras (default) or the point head")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--model-name", default="stac")
    add_model_args(p)
    _add_serving_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="run Triton with the stac model until Ctrl-C")
    p.add_argument("--workdir", type=Path, default=Path("out/serve"), help="where the model repository and log go")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--quiet", action="store_true")
    add_model_args(p)
    _add_serving_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("stream", help="reconstruct a folder of images, a video or a synthetic scene")
    p.add_argument("source", help="folder of images, video file, or synthetic[:FRAMES]")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--chunk-size", type=int, default=4)
    p.add_argument("--mode", choices=("crop", "pad"), default=None,
                   help="VGGT preprocessing (default: the server's PREPROCESS, in-process crop)")
    p.add_argument("--size", type=int, default=None,
                   help="target width in pixels (default: the model's img_size; with --server the size it publishes)")
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--conf-threshold", type=float, default=None, help="keep points whose confidence exceeds this "
                   "(default: the top half of each frame by confidence)")
    p.add_argument("--conf-key", choices=("depth_conf", "world_points_conf"), default="depth_conf",
                   help="which confidence filters points.ply (depth_conf varies per pixel; world_points_conf "
                        "is nearly flat for the shipped model)")
    p.add_argument("--points", choices=POINT_SOURCES, default="depth", dest="points_from",
                   help="points.ply and the viewer from each frame's depth unprojected with its predicted camera "
                        "(default; the more accurate estimate) or from the point head's map")
    p.add_argument("--no-frames", action="store_true", help="skip the per-frame npz files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--policy", default="stac", help="cache policy (in-process runs)")
    p.add_argument("--server", default=None, help="HOST:PORT of a Triton gRPC endpoint (default: in-process)")
    p.add_argument("--model-name", default="stac")
    p.add_argument("--stream-id", type=int, default=None, help="sequence id (default: time-based)")
    add_model_args(p)
    _add_view_args(p)
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser("view", help="show an output folder: point cloud, cameras, trajectory, depth (viser, in a browser)")
    p.add_argument("folder", type=Path, help="an output folder of stac stream / stac demo")
    p.add_argument("--view-host", default="127.0.0.1", help="address the viewer's web server binds to")
    p.add_argument("--view-port", type=int, default=8080, help="its port (the next free one if taken)")
    p.add_argument("--save", type=Path, default=None, help="also write a viser recording (.viser) of the 3D view")
    p.add_argument("--no-serve", action="store_true", help="only write the files asked for (--snapshot/--video/--save)")
    p.add_argument("--video", type=Path, default=None, help="write a depth | confidence video (.mp4, PyAV)")
    p.add_argument("--snapshot", type=Path, default=None,
                   help="write a still image (.png) of the point cloud, cameras and a depth map (no GPU or browser needed)")
    p.set_defaults(func=cmd_view)

    p = sub.add_parser("info", help="presets, parameter counts, cache sizes, default model, tools found")
    p.set_defaults(func=cmd_info)

    try:
        from .data.cli import register as register_synth
    except ImportError:  # the synthetic-data package is optional at import time
        register_synth = None
    if register_synth is not None:
        register_synth(sub)
    from .loadgen.fleet import register as register_fleet  # stac fleet: N concurrent streams (load test)
    from .loadgen.perf import register as register_perf  # stac perf: perf_analyzer install/input-data/sweep

    register_fleet(sub)
    register_perf(sub)
    from .evaluation.cli import add_parser as add_eval_parser  # stac eval: quality on datasets with ground truth

    add_eval_parser(sub)
    from .export.command import add_parser as add_export, run as run_export  # stac export onnx|tensorrt|repository

    add_export(sub).set_defaults(func=run_export)
    _show_defaults(parser)
    return parser


def _add_view_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--view", action="store_true",
                   help="show the reconstruction live while it streams, in a browser (viser; docs/viewer.md)")
    p.add_argument("--view-host", default="127.0.0.1", help="--view: address the viewer's web server binds to")
    p.add_argument("--view-port", type=int, default=8080, help="--view: its port (the next free one if taken)")


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every --help shows each option's default (subcommands registered elsewhere too)."""
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    for action in parser._actions:
        if action.help is None and action.option_strings and action.default is not argparse.SUPPRESS:
            action.help = "(default: %(default)s)"  # the formatter shows defaults only beside a help text
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _show_defaults(sub)


# Packages a user may lack -> what installs them.
INSTALL_HINTS = {
    "tritonclient": 'pip install "stac-backend[client]"',
    "grpc": 'pip install "stac-backend[client]"',
    "torch": 'pip install "stac-backend[engine]" (the client alone needs no torch)',
    "safetensors": 'pip install "stac-backend[engine]"',
    "pytriton": 'pip install "stac-backend[serving]"',
    "av": 'pip install "stac-backend[video]"',
    "viser": 'pip install "stac-backend[viewer]"',
    "tqdm": 'pip install "stac-backend[engine]"',
    "PIL": 'pip install "stac-backend[engine]"',
}


def one_line_error(exc: BaseException) -> Optional[str]:
    """The one line a user sees for a failure they can fix (None: a bug, keep the traceback)."""
    from .client import StreamError

    if isinstance(exc, ModuleNotFoundError):
        root = (exc.name or "").split(".")[0]
        hint = INSTALL_HINTS.get(root, f"pip install {root}")
        return f"missing package {root!r}: {hint}"
    if isinstance(exc, (ValueError, FileNotFoundError, StreamError)):
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    try:
        from .tools.triton_install import TritonServerError
    except ImportError:
        TritonServerError = ()  # noqa: N806
    if TritonServerError and isinstance(exc, TritonServerError):
        text = str(exc).strip().splitlines()[0]
        if "already in use" in text:
            text += " (stop what holds the port, or pick others with --http-port/--grpc-port/--metrics-port)"
        return text
    if isinstance(exc, PermissionError):
        return f"{exc} (choose a folder you can write, e.g. --out/--workdir)"
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("stac: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a failure the user can fix is one line; a bug keeps its traceback
        line = one_line_error(exc)
        if line is None:
            raise
        print(f"stac: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
