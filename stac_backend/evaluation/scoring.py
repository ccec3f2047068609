"""Scoring one streamed prediction: the whole sequence and, optionally, segments of it.

The whole sequence is scored as ``stac_backend.metrics.evaluate_sequence`` scores it (accuracy /
completeness / normal consistency after Sim(3) + ICP, Abs Rel / delta < 1.25 after one median
scale, ATE / RPE after Sim(3)). A segment (e.g. the second lap of a loop, where the camera revisits
what it saw) is scored under the *whole* sequence's alignment: a segment mapped consistently with
what came before scores well, one that drifted away from it does not - which is what a memory of
earlier frames should change. Point metrics may use every ``point_frame_stride``-th frame only (the
alignment and nearest-neighbour searches dominate the cost on a CPU).

Points are scored two ways when the prediction has cameras: the point head's map (``acc_mean``,
...) and the predicted depth unprojected with the predicted cameras (``depth_points_acc_mean``,
..., each with its own alignment), the estimate VGGT reports as the more accurate of the two.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Optional

import torch

from ..data.camera import unproject_depth
from ..metrics import accuracy_completeness, align_point_maps, depth_metrics, median_scale, point_map_normals
from ..metrics.pose import align_trajectories, camera_centers, pose_metrics

__all__ = ["MetricSettings", "score_prediction"]


@dataclass
class MetricSettings:
    """Caps and iterations of the point metrics (defaults: those of ``evaluate_sequence``)."""

    icp_threshold: float = 0.1
    icp_iterations: int = 30
    icp_max_points: Optional[int] = 10_000
    icp_max_target_points: Optional[int] = 100_000
    max_points: Optional[int] = 20_000
    max_reference_points: Optional[int] = None
    max_depth: Optional[float] = 70.0
    point_frame_stride: int = 1
    seed: int = 0
    # also score the points unprojected from predicted depth and cameras (a second alignment)
    points_from_depth: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def _point_scores(aligned: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, s: MetricSettings) -> dict[str, float]:
    if not bool(mask.any()):
        return {}
    pred_normals, _ = point_map_normals(aligned, mask)
    gt_normals, _ = point_map_normals(gt, mask)
    scores = accuracy_completeness(aligned[mask], gt[mask], pred_normals=pred_normals[mask], gt_normals=gt_normals[mask],
                                   max_points=s.max_points, max_reference_points=s.max_reference_points, seed=s.seed)
    return {k: scores[k] for k in ("acc_mean", "acc_median", "comp_mean", "comp_median", "nc_mean", "nc_median")}


def _score_points(points: torch.Tensor, gt_points: torch.Tensor, valid: Optional[torch.Tensor], s: MetricSettings,
                  spans: Mapping[str, tuple[int, int]], results: dict, prefix: str) -> None:
    """Align ``points`` [S, H, W, 3] to the truth once (Sim(3) + ICP over the sampled frames) and
    add the point metrics of every span to ``results`` under ``prefix``."""
    step = max(1, s.point_frame_stride)
    p, g = points.float(), gt_points.float()
    mask = torch.isfinite(p).all(-1) & torch.isfinite(g).all(-1)
    if valid is not None:
        mask &= valid.bool()
    frames = torch.zeros(p.shape[0], dtype=torch.bool)
    frames[::step] = True
    mask &= frames[:, None, None]
    transform, info = align_point_maps(p, g, mask, mode="sim3_icp", icp_threshold=s.icp_threshold,
                                       icp_iterations=s.icp_iterations, icp_max_points=s.icp_max_points,
                                       icp_max_target_points=s.icp_max_target_points, seed=s.seed)
    aligned = transform.apply(torch.where(mask.unsqueeze(-1), p, torch.zeros_like(p)))
    results["all"].update({prefix + k: v for k, v in info.items()})
    for name, (start, stop) in spans.items():
        scores = _point_scores(aligned[start:stop], g[start:stop], mask[start:stop], s)
        results[name].update({prefix + k: v for k, v in scores.items()})


def score_prediction(
    pred: Mapping[str, torch.Tensor],
    gt: Mapping[str, torch.Tensor],
    settings: Optional[MetricSettings] = None,
    segments: Optional[Mapping[str, tuple[int, int]]] = None,
) -> dict:
    """``{"all": {...}, "<segment>": {...}}`` of flat metric dicts; segments are ``(start, stop)`` frames.

    ``pred`` has ``depth`` ``[S, H, W]``, ``world_points`` ``[S, H, W, 3]``, ``extrinsics`` ``[S, 3, 4]``
    and, for the points from depth, ``intrinsics`` ``[S, 3, 3]``; ``gt`` any of ``depth``, ``valid``,
    ``world_points``, ``extrinsics`` (groups without GT are skipped).
    """
    s = settings or MetricSettings()
    spans = {"all": (0, int(pred["depth"].shape[0]))} | dict(segments or {})
    results: dict[str, dict[str, float]] = {name: {} for name in spans}
    valid = gt.get("valid")

    if "world_points" in gt and "world_points" in pred:
        _score_points(pred["world_points"], gt["world_points"], valid, s, spans, results, prefix="")
    if "world_points" in gt and s.points_from_depth and all(k in pred for k in ("depth", "extrinsics", "intrinsics")):
        from_depth = unproject_depth(pred["depth"].float(), pred["extrinsics"].float(), pred["intrinsics"].float())
        _score_points(from_depth, gt["world_points"], valid, s, spans, results, prefix="depth_points_")

    if "depth" in gt and "depth" in pred:
        d, gd = pred["depth"].double(), gt["depth"].double()
        depth_mask = torch.isfinite(d) & (gd > 1e-3) & (valid.bool() if valid is not None else True)
        if s.max_depth is not None:
            depth_mask &= gd < s.max_depth
        scale = median_scale(d, gd, depth_mask)
        for name, (start, stop) in spans.items():
            if bool(depth_mask[start:stop].any()):
                m = depth_metrics(d[start:stop] * scale, gd[start:stop], depth_mask[start:stop], align="none",
                                  max_depth=s.max_depth)
                results[name].update({"abs_rel": m["abs_rel"], "delta_1.25": m["delta_1.25"]})
        results["all"]["depth_scale"] = float(scale)

    if "extrinsics" in gt and "extrinsics" in pred and pred["extrinsics"].shape[0] >= 3:
        e, ge = pred["extrinsics"].double(), gt["extrinsics"].double()
        results["all"].update(pose_metrics(e, ge))
        transform = align_trajectories(e, ge, "sim3")
        error = (transform.apply(camera_centers(e)) - camera_centers(ge)).norm(dim=-1)
        for name, (start, stop) in spans.items():
            if name != "all" and stop > start:
                results[name]["ate_rmse"] = float(error[start:stop].square().mean().sqrt())
    return results
