"""Video depth quality: Abs Rel and delta < 1.25 after median scale alignment.

Protocol (as in the Sintel / Bonn / KITTI video-depth evaluations of MonST3R, CUT3R, StreamVGGT):
GT pixels count when valid, finite and inside ``(min_depth, max_depth)`` (cap 70 m); the
prediction is scaled by ``median(gt) / median(pred)`` over those pixels (per sequence by default,
optionally per frame); the scaled prediction is clipped to ``[1e-5, max_depth]``; then

* ``abs_rel = mean(|pred - gt| / gt)``
* ``delta_1.25 = mean(max(pred / gt, gt / pred) < 1.25)``
"""

from __future__ import annotations

import torch

from ._tensors import as_mask, as_tensor, median

__all__ = ["median_scale", "depth_metrics", "DEPTH_ALIGN_MODES"]

DEPTH_ALIGN_MODES = ("median", "median_per_frame", "none")
_CLIP_MIN = 1e-5  # keeps ratios finite for non-positive predictions


def median_scale(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``median(gt[mask]) / median(pred[mask])``; raises if the masked prediction median is <= 0."""
    if not bool(mask.any()):
        raise ValueError("median_scale: no valid pixels")
    pred_median = median(pred[mask].to(torch.float64))
    if float(pred_median) <= 0:
        raise ValueError(f"median_scale: median predicted depth is {float(pred_median)}, must be positive")
    return median(gt[mask].to(torch.float64)) / pred_median


def depth_metrics(
    pred: torch.Tensor,
    gt: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    align: str = "median",
    max_depth: float | None = 70.0,
    min_depth: float = 1e-3,
) -> dict[str, float]:
    """Abs Rel and delta < 1.25 of predicted depth ``[S, H, W]`` against GT ``[S, H, W]``.

    Args:
        pred, gt: z-depth maps (a trailing singleton channel, as VGGT outputs, is accepted).
        valid: optional ``[S, H, W]`` GT validity; invalid pixels are ignored.
        align: "median" (one scale per sequence), "median_per_frame" or "none".
        max_depth: GT cap in metres (pixels at or beyond it are ignored; predictions are clipped
            to it). ``None`` disables the cap.
        min_depth: GT pixels at or below this are ignored.

    Returns ``abs_rel``, ``delta_1.25``, ``depth_scale`` (the sequence scale, or the mean of the
    per-frame scales) and ``num_pixels``.
    """
    if align not in DEPTH_ALIGN_MODES:
        raise ValueError(f"align must be one of {DEPTH_ALIGN_MODES}, got {align!r}")
    pred = as_tensor(pred, "pred")
    gt = as_tensor(gt, "gt").to(pred.device)
    if pred.ndim == 4 and pred.shape[-1] == 1:
        pred = pred[..., 0]
    if gt.ndim == 4 and gt.shape[-1] == 1:
        gt = gt[..., 0]
    if pred.ndim == 2 and gt.ndim == 2:  # a single frame
        pred, gt = pred[None], gt[None]
        valid = None if valid is None else torch.as_tensor(valid)[None]
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"pred and gt must both be [S, H, W], got {tuple(pred.shape)} and {tuple(gt.shape)}")
    pred64, gt64 = pred.to(torch.float64), gt.to(torch.float64)
    mask = torch.isfinite(gt64) & torch.isfinite(pred64) & (gt64 > min_depth)
    if max_depth is not None:
        mask &= gt64 < max_depth
    if valid is not None:
        mask &= as_mask(valid, "valid", gt.shape, pred.device)
    if not bool(mask.any()):
        raise ValueError("depth_metrics: no valid pixels to evaluate")

    if align == "median":
        scale = median_scale(pred64, gt64, mask)
        aligned = pred64 * scale
        scale_report = float(scale)
    elif align == "median_per_frame":
        scales = torch.ones(pred.shape[0], dtype=torch.float64, device=pred.device)
        for frame in range(pred.shape[0]):
            if bool(mask[frame].any()):  # frames without valid pixels contribute nothing anyway
                scales[frame] = median_scale(pred64[frame], gt64[frame], mask[frame])
        aligned = pred64 * scales[:, None, None]
        scale_report = float(scales.mean())
    else:
        aligned = pred64
        scale_report = 1.0
    aligned = aligned.clamp(min=_CLIP_MIN, max=max_depth if max_depth is not None else None)

    p, g = aligned[mask], gt64[mask]
    ratio = torch.maximum(p / g, g / p)
    return {
        "abs_rel": float(((p - g).abs() / g).mean()),
        "delta_1.25": float((ratio < 1.25).double().mean()),
        "depth_scale": scale_report,
        "num_pixels": float(mask.sum()),
    }
