"""The ``stac`` command line.

    stac demo                          local Triton + the small model: stream a generated scene end to end
    stac serve                         run Triton with the stac model (Ctrl-C stops it)
    stac stream SOURCE --out DIR       reconstruct a folder of images, a video or `synthetic:N`
                                       (in-process, or through a server with --server HOST:PORT)
    stac synth --out DIR               write a synthetic scene with ground truth
    stac info                          presets, parameter counts, cache bytes per frame
    stac eval DATASET --out DIR        score every cache policy on a dataset with ground truth
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None,
                   help="model preset (tiny, small, vggt-1b); default: the checkpoint's own config, and with no "
                        "checkpoint the embedded trained small model")
    p.add_argument("--checkpoint", type=Path, default=None, help="weights (.pt/.pth/.safetensors)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")


def _add_serving_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", default="stac", help="cache policy: full, window, sink_window, heavy_hitter, stac")
    p.add_argument("--max-streams", type=int, default=16)
    p.add_argument("--max-cache-bytes", type=int, default=None)
    p.add_argument("--idle-ttl", type=float, default=120.0, help="seconds before an idle stream is freed")
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


def resolve_model_args(args: argparse.Namespace) -> None:
    """No --checkpoint and no --preset: the embedded trained model. A preset alone: random weights."""
    from .assets import EMBEDDED_CHECKPOINT

    if args.checkpoint is None and args.preset is None:
        if EMBEDDED_CHECKPOINT.is_file():
            args.checkpoint = EMBEDDED_CHECKPOINT
        else:
            args.preset = "tiny"
    if args.checkpoint is None:
        print(f"note: no --checkpoint given, using random weights for preset {args.preset!r}", file=sys.stderr)


def load_model_from_args(args: argparse.Namespace):
    from .model import build_model

    resolve_model_args(args)
    return build_model(args.preset, checkpoint=args.checkpoint, device=args.device, dtype=DTYPES[args.dtype])


def cmd_stream(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .results import ReconstructionWriter
    from .sources import chunks, open_source

    if args.server:
        target = args.size or 112
        step, describe = _remote_stepper(args)
    else:
        model = load_model_from_args(args)
        target = args.size or model.config.img_size
        step, describe = _local_stepper(model, args)
    source = open_source(args.source, mode=args.mode, target=target, max_frames=args.max_frames)
    print(f"streaming {source.description} {describe}, chunks of {args.chunk_size}", file=sys.stderr)
    writer = ReconstructionWriter(args.out, conf_threshold=args.conf_threshold, save_frames=not args.no_frames)
    started = time.perf_counter()
    frames_done, cache_bytes = 0, 0
    with tqdm(total=source.length, unit="frame", disable=args.quiet) as bar:
        for chunk, is_last in _with_last(chunks(source, args.chunk_size)):
            out = step(chunk, frames_done == 0, is_last)
            cache_bytes = int(out.pop("cache_bytes", 0))
            for i, index in enumerate(np.asarray(out["frame_index"]).tolist()):
                writer.add(index, {k: v[i] for k, v in out.items() if k != "frame_index"}, chunk[i])
            frames_done += len(chunk)
            bar.update(len(chunk))
            bar.set_postfix(cache=f"{cache_bytes / 2**20:.1f}MiB")
    elapsed = time.perf_counter() - started
    summary = writer.finish()
    summary.update(seconds=round(elapsed, 3), frames_per_second=round(frames_done / max(elapsed, 1e-9), 2),
                   cache_bytes=cache_bytes, server=args.server or None)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


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

    stream = Stream(model, cache=CacheConfig(policy=args.policy, chunk=args.chunk_size))

    def step(chunk, first, last):
        out = stream.push(chunk)
        out["cache_bytes"] = stream.memory_bytes()
        return out

    return step, f"in-process ({model.config.patch_embed} model, {args.policy} cache)"


def _remote_stepper(args):
    from .client import StacClient

    client = StacClient(args.server, model=args.model_name)
    stream_id = args.stream_id or (int(time.time() * 1000) % (2**31 - 1)) + 1

    def step(chunk, first, last):
        return client.send_chunk(stream_id, chunk, start=first, end=last)

    return step, f"through Triton at {args.server} (stream id {stream_id})"


def serve_settings_from_args(args: argparse.Namespace):
    from .serving.repository import ServeSettings

    resolve_model_args(args)
    device = args.device
    return ServeSettings(
        preset=args.preset or "",
        dtype=args.dtype,
        device="auto" if device.startswith("cuda") else "cpu",
        instance_kind="KIND_GPU" if device.startswith("cuda") else "KIND_CPU",
        cache_config={"policy": args.policy},
        max_streams=args.max_streams,
        max_cache_bytes=args.max_cache_bytes,
        idle_ttl_s=args.idle_ttl,
        triton_idle_us=int(args.idle_ttl * 1e6),
        output_dtype=args.output_dtype,
        output_device=args.output_device,
        decoupled=args.decoupled,
    )


def start_local_server(args: argparse.Namespace, workdir: Path, ports=(0, 0, 0)):
    from .serving.repository import local_server

    server = local_server(
        serve_settings_from_args(args), workdir, args.checkpoint,
        http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2], host=args.host,
        log_callback=None if args.quiet else (lambda line: print(line, file=sys.stderr)), die_with_parent=True,
    )
    return server.start_and_wait()


def cmd_serve(args: argparse.Namespace) -> int:
    import signal

    workdir = Path(args.workdir)
    server = start_local_server(args, workdir, (args.http_port, args.grpc_port, args.metrics_port))
    print(f"stac model ready in {server.startup_seconds:.1f} s: {json.dumps(server.urls)} (Ctrl-C stops)", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while server.is_running() and not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Local Triton with the small model; a generated scene streamed through it over gRPC."""
    workdir = Path(args.out) / "server"
    server = start_local_server(args, workdir)
    try:
        print(f"server ready in {server.startup_seconds:.1f} s at {server.grpc_url}", file=sys.stderr)
        args.server, args.size, args.source = server.grpc_url, None, f"synthetic:{args.frames}"
        args.mode, args.max_frames, args.no_frames, args.stream_id = "crop", None, False, 1
        args.conf_threshold = args.conf_threshold
        return cmd_stream(args)
    finally:
        server.stop()


def cmd_info(args: argparse.Namespace) -> int:
    from .engine import full_cache_bytes_per_frame
    from .model import PRESETS, VGGT, count_parameters

    for name, config in PRESETS.items():
        with torch.device("meta"):
            params = count_parameters(VGGT(config))
        side = config.img_size
        h = int(round(side * 3 / 4 / config.patch_size) * config.patch_size)
        per_frame = full_cache_bytes_per_frame(config, h, side, torch.bfloat16)
        print(f"{name:8s} {params:>14,d} parameters; full cache at {side}x{h} bf16: {per_frame / 2**20:.2f} MiB/frame")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stac", description="Streaming 3D reconstruction with STAC cache compression")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="local Triton + small model; stream a generated scene through it")
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=4)
    p.add_argument("--conf-threshold", type=float, default=None)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--model-name", default="stac")
    _add_model_args(p)
    _add_serving_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="run Triton with the stac model until Ctrl-C")
    p.add_argument("--workdir", type=Path, default=Path("out/serve"), help="where the model repository and log go")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--quiet", action="store_true")
    _add_model_args(p)
    _add_serving_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("stream", help="reconstruct a folder of images, a video or a synthetic scene")
    p.add_argument("source", help="folder of images, video file, or synthetic[:FRAMES]")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--chunk-size", type=int, default=4)
    p.add_argument("--mode", choices=("crop", "pad"), default="crop")
    p.add_argument("--size", type=int, default=None, help="target width in pixels (default: the model's img_size)")
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--conf-threshold", type=float, default=None, help="keep points whose confidence exceeds this "
                   "(default: the top half of each frame by confidence)")
    p.add_argument("--no-frames", action="store_true", help="skip the per-frame npz files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--policy", default="stac", help="cache policy (in-process runs)")
    p.add_argument("--server", default=None, help="HOST:PORT of a Triton gRPC endpoint (default: in-process)")
    p.add_argument("--model-name", default="stac")
    p.add_argument("--stream-id", type=int, default=None, help="sequence id (default: time-based)")
    _add_model_args(p)
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser("info", help="presets, parameter counts and cache sizes")
    p.set_defaults(func=cmd_info)

    try:
        from .data.cli import register as register_synth
    except ImportError:  # the synthetic-data package is optional at import time
        register_synth = None
    if register_synth is not None:
        register_synth(sub)
    from .serving.fleet import register as register_fleet  # stac fleet: N concurrent streams (load test)
    from .serving.perf import register as register_perf  # stac perf: perf_analyzer install/input-data/sweep

    register_fleet(sub)
    register_perf(sub)
    from .evaluation.cli import add_parser as add_eval_parser  # stac eval: quality on datasets with ground truth

    add_eval_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"stac: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
