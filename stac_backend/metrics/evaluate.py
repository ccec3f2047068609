"""One call to score a predicted sequence against ground truth with every metric that applies."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ._tensors import as_mask, as_tensor
from .depth import depth_metrics
from .pose import pose_metrics
from .reconstruction import reconstruction_metrics

__all__ = ["evaluate_sequence"]


def _field(source: Any, *names: str) -> Any:
    """First present, non-None field among ``names`` of a mapping or an object (e.g. a dataclass)."""
    for name in names:
        value = source.get(name) if isinstance(source, Mapping) else getattr(source, name, None)
        if value is not None:
            return value
    return None


def _drop_batch(value: torch.Tensor, ndim: int, name: str) -> torch.Tensor:
    """Accept VGGT-style outputs with a leading batch of one (``[1, S, ...]``)."""
    if value.ndim == ndim + 1:
        if value.shape[0] != 1:
            raise ValueError(f"{name}: only a batch of one sequence is supported, got shape {tuple(value.shape)}")
        value = value[0]
    if value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions (batch of one allowed), got {tuple(value.shape)}")
    return value


def evaluate_sequence(
    pred: Any,
    gt: Any,
    *,
    recon_align: str = "sim3_icp",
    icp_threshold: float = 0.1,
    icp_iterations: int = 30,
    icp_max_points: int | None = 10_000,
    icp_max_target_points: int | None = 100_000,
    max_points: int | None = 20_000,
    max_reference_points: int | None = None,
    depth_align: str = "median",
    max_depth: float | None = 70.0,
    pose_align: str = "sim3",
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Score one predicted sequence; returns a flat dict of floats.

    ``pred`` and ``gt`` are mappings or objects (a ``SyntheticSequence`` works as ``gt``) with any of:

    * ``world_points`` ``[S, H, W, 3]`` -> ``acc_*``, ``comp_*``, ``nc_*`` (after Sim(3) + ICP);
    * ``depth`` ``[S, H, W]`` (or ``[S, H, W, 1]``) -> ``abs_rel``, ``delta_1.25`` (median scale);
    * ``extrinsics`` ``[S, 3, 4]`` camera-from-world -> ``ate_rmse``, ``rpe_trans``, ``rpe_rot_deg``.

    A group is scored when both sides have its field. GT pixels are restricted by ``gt.valid``;
    ``pred.valid`` (or ``pred.mask``), e.g. a confidence threshold, restricts them further. A
    leading batch dimension of one (VGGT outputs) is dropped. Predictions may be in any world frame
    and scale (VGGT: camera 0's frame, arbitrary scale): every group aligns them to the GT first.
    ``device`` moves both sides there first (default: the prediction's device). The keyword
    arguments are those of ``reconstruction_metrics``, ``depth_metrics`` and ``pose_metrics``.
    """
    results: dict[str, float] = {}
    gt_points = _field(gt, "world_points")
    gt_depth = _field(gt, "depth")
    gt_valid = _field(gt, "valid")
    pred_valid = _field(pred, "valid", "mask")

    def prepare(value: Any, ndim: int, name: str) -> torch.Tensor:
        tensor = _drop_batch(as_tensor(value, name), ndim, name)
        return tensor.to(device) if device is not None else tensor

    def pixel_mask(shape: torch.Size, on: torch.device) -> torch.Tensor | None:
        mask = None
        for value, name in ((gt_valid, "gt.valid"), (pred_valid, "pred.valid")):
            if value is not None:
                m = as_mask(_drop_batch(torch.as_tensor(value), len(shape), name), name, shape, on)
                mask = m if mask is None else mask & m
        return mask

    pred_points = _field(pred, "world_points")
    if pred_points is not None and gt_points is not None:
        p = prepare(pred_points, 4, "pred.world_points")
        g = prepare(gt_points, 4, "gt.world_points").to(p.device)
        results.update(
            reconstruction_metrics(
                p, g, pixel_mask(p.shape[:-1], p.device), align=recon_align, icp_threshold=icp_threshold,
                icp_iterations=icp_iterations, icp_max_points=icp_max_points,
                icp_max_target_points=icp_max_target_points, max_points=max_points,
                max_reference_points=max_reference_points, seed=seed,
            )
        )

    pred_depth = _field(pred, "depth")
    if pred_depth is not None and gt_depth is not None:
        d = as_tensor(pred_depth, "pred.depth")
        if d.ndim >= 4 and d.shape[-1] == 1:  # VGGT depth maps carry a trailing channel
            d = d[..., 0]
        d = prepare(d, 3, "pred.depth")
        gd = prepare(gt_depth, 3, "gt.depth").to(d.device)
        results.update(depth_metrics(d, gd, pixel_mask(d.shape, d.device), align=depth_align, max_depth=max_depth))

    pred_extrinsics = _field(pred, "extrinsics")
    gt_extrinsics = _field(gt, "extrinsics")
    if pred_extrinsics is not None and gt_extrinsics is not None:
        e = prepare(pred_extrinsics, 3, "pred.extrinsics")
        ge = prepare(gt_extrinsics, 3, "gt.extrinsics").to(e.device)
        results.update(pose_metrics(e, ge, align=pose_align))

    if not results:
        raise ValueError("evaluate_sequence: pred and gt share none of world_points, depth, extrinsics")
    return results
