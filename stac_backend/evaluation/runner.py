"""Streaming a sequence through the model under each cache policy, and scoring what comes out.

``stream_sequence`` pushes the frames chunk by chunk through a ``Stream`` (exactly as a served
camera stream runs) and keeps the outputs the metrics need, plus the stream's peak and bound of
cache memory. ``evaluate`` does that for every sequence and policy and returns one JSON-ready dict.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Mapping, Optional

import torch

from ..cache import POLICIES, CacheConfig
from ..engine import Stream
from .scoring import MetricSettings, score_prediction
from .sequence import EvalSequence

__all__ = ["policy_configs", "stream_sequence", "evaluate", "summarize", "KEPT_OUTPUTS"]

KEPT_OUTPUTS = ("depth", "world_points", "world_points_conf", "extrinsics", "intrinsics")


def policy_configs(names: Optional[list[str]] = None, chunk: int = 4,
                   overrides: Optional[Mapping[str, dict]] = None) -> dict[str, CacheConfig]:
    """``CacheConfig`` per policy name: the reference settings, ``window`` with 8 frames (the
    sliding-window baseline of the STAC paper), and ``overrides`` per policy (e.g. a confidence bar)."""
    names = list(names or POLICIES)
    unknown = sorted(set(names) - set(POLICIES)) + sorted(set(overrides or {}) - set(POLICIES))
    if unknown:
        raise ValueError(f"unknown cache policies {unknown}; choose from {POLICIES}")
    defaults = {"window": {"window": 8}}
    return {name: CacheConfig(policy=name, chunk=chunk, **(defaults.get(name, {}) | dict((overrides or {}).get(name, {}))))
            for name in names}


def stream_sequence(model, images: torch.Tensor, config: CacheConfig,
                    prepare: Optional[Callable[[Stream], None]] = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Stream ``images`` ``[S, 3, H, W]`` under ``config``; outputs on the CPU in float32, and stats.
    ``prepare`` gets the new stream before its first frame (ablations use it to alter its cache)."""
    stream = Stream(model, cache=config)
    if prepare is not None:
        prepare(stream)
    device = next(model.parameters()).device
    kept: dict[str, list[torch.Tensor]] = {k: [] for k in KEPT_OUTPUTS}
    peak = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, images.shape[0], stream.chunk_size):
            out = stream.push(images[start : start + stream.chunk_size].to(device))
            for key in KEPT_OUTPUTS:
                kept[key].append(out[key].float().cpu())
            peak = max(peak, stream.memory_bytes())
    seconds = time.perf_counter() - started
    pred = {k: torch.cat(v) for k, v in kept.items()}
    if pred["depth"].ndim == 4:
        pred["depth"] = pred["depth"][..., 0]
    stats = {k: v for k, v in stream.cache.stats().items() if isinstance(v, (int, float))}
    info = {"peak_cache_bytes": int(peak), "cache_bytes_bound": stream.memory_bound(),
            "evicted_tokens": stream.evicted_tokens(), "seconds": seconds,
            "frames_per_second": images.shape[0] / max(seconds, 1e-9), "cache_stats": stats}
    return pred, info


def _confidence_percentiles(conf: torch.Tensor, valid: Optional[torch.Tensor]) -> dict[str, float]:
    values = conf[valid] if valid is not None else conf.reshape(-1)
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return {}
    if values.numel() > 1_000_000:  # quantile() has an input size limit; a strided sample is plenty
        values = values[:: values.numel() // 1_000_000 + 1]
    return {str(q): float(values.quantile(q / 100)) for q in (10, 50, 90)}


def evaluate(
    model,
    sequences: list[EvalSequence],
    configs: Mapping[str, CacheConfig],
    settings: Optional[MetricSettings] = None,
    segments: Optional[Mapping[str, tuple[int, int]]] = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> dict:
    """Every sequence through every policy; ``{"sequences": [...], "summary": {...}}``."""
    settings = settings or MetricSettings()
    rows = []
    for seq in sequences:
        gt = seq.ground_truth()
        if not gt:
            log(f"{seq.name}: no ground truth (depth or poses); only memory and speed are reported")
        entry = {"name": seq.name, "frames": seq.num_frames, "frame_names": seq.frame_names[:3] + ["..."],
                 "metadata": seq.metadata, "policies": {}}
        for name, config in configs.items():
            pred, info = stream_sequence(model, seq.images, config)
            metrics = score_prediction(pred, gt, settings, segments) if gt else {"all": {}}
            info["point_conf_percentiles"] = _confidence_percentiles(pred["world_points_conf"], seq.valid)
            entry["policies"][name] = {"config": config.to_dict(), **info, "metrics": metrics}
            shown = " ".join(f"{k} {metrics['all'][k]:.3f}" for k in ("abs_rel", "acc_mean", "comp_mean", "ate_rmse")
                             if k in metrics["all"])
            log(f"{seq.name} {name}: {shown} cache {info['peak_cache_bytes'] / 2**20:.1f} MiB "
                f"{info['frames_per_second']:.1f} frames/s")
        rows.append(entry)
    return {"metric_settings": settings.to_dict(), "sequences": rows, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> dict:
    """Per policy and segment: the mean of every metric over sequences, the largest peak memory."""
    summary: dict[str, dict] = {}
    for entry in rows:
        for policy, result in entry["policies"].items():
            target = summary.setdefault(policy, {"peak_cache_bytes": 0, "cache_bytes_bound": result["cache_bytes_bound"],
                                                 "frames_per_second": [], "metrics": {}})
            target["peak_cache_bytes"] = max(target["peak_cache_bytes"], result["peak_cache_bytes"])
            target["frames_per_second"].append(result["frames_per_second"])
            for segment, values in result["metrics"].items():
                bucket = target["metrics"].setdefault(segment, {})
                for key, value in values.items():
                    bucket.setdefault(key, []).append(value)
    for target in summary.values():
        target["frames_per_second"] = sum(target["frames_per_second"]) / len(target["frames_per_second"])
        target["metrics"] = {seg: {k: sum(v) / len(v) for k, v in values.items()} for seg, values in target["metrics"].items()}
    return summary
