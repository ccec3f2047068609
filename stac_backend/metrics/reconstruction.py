"""3D reconstruction quality: accuracy, completeness and normal consistency.

Protocol (as in the 7-Scenes / NRGBD evaluations of Spann3R, CUT3R, StreamVGGT):

1. The predicted point map is aligned to the ground truth with Umeyama Sim(3) on corresponding
   valid pixels, then refined by rigid point-to-point ICP (inlier threshold 0.1 in GT units).
2. Accuracy: distance from every predicted point to its nearest GT point (mean and median).
   Completeness: distance from every GT point to its nearest predicted point (mean and median).
3. Normal consistency: ``|cos|`` between the normal of a point and the normal of its nearest
   neighbour, in both directions; reported as the average of the two directions' mean and median.

Differences from the reference scripts, on purpose: normals come from the pixel grid of the point
maps (finite-difference cross products) instead of a k-NN plane fit, and the query points of each
direction are subsampled to at most ``max_points`` (deterministically) to bound the work.
"""

from __future__ import annotations

import torch

from ._tensors import as_mask, as_tensor, median
from .alignment import Sim3, icp, umeyama
from .neighbors import nearest_neighbors, subsample_indices

__all__ = [
    "point_map_normals",
    "accuracy_completeness",
    "align_point_maps",
    "reconstruction_metrics",
    "ALIGN_MODES",
]

ALIGN_MODES = ("sim3_icp", "sim3", "icp", "none")
# One-sided differences replace central ones when the two sides differ this much in length: at a
# depth discontinuity the central difference would mix two surfaces and give a meaningless normal.
_DISCONTINUITY_RATIO = 2.0


def _shifted(x: torch.Tensor, offset: int, dim: int, fill) -> torch.Tensor:
    """``y[..., k, ...] = x[..., k + offset, ...]`` along ``dim``, ``fill`` where out of range."""
    y = torch.full_like(x, fill)
    n = x.shape[dim]
    if offset > 0:
        y.narrow(dim, 0, n - offset).copy_(x.narrow(dim, offset, n - offset))
    else:
        y.narrow(dim, -offset, n + offset).copy_(x.narrow(dim, 0, n + offset))
    return y


def _grid_difference(points: torch.Tensor, valid: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Derivative of a point map along one pixel axis, robust to borders and discontinuities."""
    # ``dim`` indexes the pixel axis in ``valid`` [..., H, W]; it is the same index in the points
    # [..., H, W, 3], whose extra xyz axis comes last.
    forward = _shifted(points, 1, dim, 0.0) - points
    backward = points - _shifted(points, -1, dim, 0.0)
    has_forward = _shifted(valid, 1, dim, False) & valid
    has_backward = _shifted(valid, -1, dim, False) & valid
    len_f, len_b = forward.norm(dim=-1), backward.norm(dim=-1)
    both = has_forward & has_backward
    smooth = (len_f <= _DISCONTINUITY_RATIO * len_b) & (len_b <= _DISCONTINUITY_RATIO * len_f)
    use_forward = has_forward & (~has_backward | (~smooth & (len_f < len_b)))
    use_backward = has_backward & (~has_forward | (~smooth & (len_b <= len_f)))
    central = 0.5 * (forward + backward)
    diff = torch.where((both & smooth).unsqueeze(-1), central, torch.zeros_like(central))
    diff = torch.where((use_forward & ~(both & smooth)).unsqueeze(-1), forward, diff)
    diff = torch.where((use_backward & ~(both & smooth)).unsqueeze(-1), backward, diff)
    return diff, has_forward | has_backward


def point_map_normals(points: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit normals of a point map ``[..., H, W, 3]`` from pixel-grid finite differences.

    The normal at a pixel is ``cross(dP/du, dP/dv)``, with central differences where both
    neighbours are valid and on the same surface, one-sided differences at borders, holes and depth
    discontinuities. Returns normals ``[..., H, W, 3]`` (zero where undefined) and their validity
    ``[..., H, W]``. The sign is arbitrary for a consumer, since metrics use ``|cos|``.
    """
    points = as_tensor(points, "points", trailing=(3,))
    if points.ndim < 3 or points.shape[-3] < 2 or points.shape[-2] < 2:
        raise ValueError(f"points must be [..., H, W, 3] with H, W >= 2, got {tuple(points.shape)}")
    if valid is None:
        valid = torch.isfinite(points).all(dim=-1)
    else:
        valid = as_mask(valid, "valid", points.shape[:-1], points.device) & torch.isfinite(points).all(dim=-1)
    clean = torch.where(valid.unsqueeze(-1), points, torch.zeros_like(points))
    du, has_u = _grid_difference(clean, valid, dim=valid.ndim - 1)
    dv, has_v = _grid_difference(clean, valid, dim=valid.ndim - 2)
    normal = torch.linalg.cross(du, dv, dim=-1)
    length = normal.norm(dim=-1)
    # Reject near-parallel tangents (degenerate geometry) relative to the tangent lengths.
    ok = valid & has_u & has_v & (length > 1e-12 * du.norm(dim=-1) * dv.norm(dim=-1)) & (length > 0)
    normal = torch.where(ok.unsqueeze(-1), normal / length.clamp_min(1e-30).unsqueeze(-1), torch.zeros_like(normal))
    return normal, ok


def _normal_consistency(normals_a: torch.Tensor, normals_b: torch.Tensor) -> tuple[float, float]:
    """Mean and median ``|cos|`` over pairs where both normals are defined (non-zero)."""
    defined = (normals_a.norm(dim=-1) > 0) & (normals_b.norm(dim=-1) > 0)
    if not bool(defined.any()):
        return float("nan"), float("nan")
    cos = (normals_a[defined] * normals_b[defined]).sum(-1).abs().clamp(max=1.0)
    return float(cos.mean()), float(median(cos))


def accuracy_completeness(
    pred: torch.Tensor,
    gt: torch.Tensor,
    *,
    pred_normals: torch.Tensor | None = None,
    gt_normals: torch.Tensor | None = None,
    max_points: int | None = 20_000,
    max_reference_points: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Accuracy / completeness (and normal consistency when normals are given) of two clouds.

    Accuracy queries predicted points against the GT cloud, completeness GT points against the
    predicted cloud. The *query* side is subsampled to ``max_points`` (deterministic): that keeps
    the estimate unbiased (each sampled query still finds its true nearest neighbour) while
    bounding the work. Subsampling the *reference* side too (``max_reference_points``) is faster
    but biased upwards by about the reference point spacing; leave it ``None`` for reported numbers.

    Args:
        pred, gt: ``[N, 3]`` and ``[M, 3]`` points (already aligned), same units.
        pred_normals, gt_normals: optional ``[N, 3]`` / ``[M, 3]`` unit normals; a zero vector
            marks a point without a normal (it is skipped in the normal consistency only).
        max_points: cap on the query points of each direction.
        max_reference_points: optional cap on the reference points of each direction.
        seed: seed of the subsampling.

    Returns keys ``acc_mean, acc_median, comp_mean, comp_median`` and, with normals,
    ``nc_mean, nc_median`` (average of both directions) plus per-direction
    ``nc_acc_mean, nc_acc_median, nc_comp_mean, nc_comp_median``.
    """
    pred = as_tensor(pred, "pred", trailing=(3,), ndim=2)
    gt = as_tensor(gt, "gt", trailing=(3,), ndim=2).to(pred.device)
    if pred.shape[0] == 0 or gt.shape[0] == 0:
        raise ValueError("accuracy_completeness needs non-empty clouds")
    if (pred_normals is None) != (gt_normals is None):
        raise ValueError("give both pred_normals and gt_normals, or neither")
    with_normals = pred_normals is not None and gt_normals is not None
    if with_normals:
        pred_normals = as_tensor(pred_normals, "pred_normals", trailing=(3,), ndim=2).to(pred.device)
        gt_normals = as_tensor(gt_normals, "gt_normals", trailing=(3,), ndim=2).to(pred.device)
        if pred_normals.shape != pred.shape or gt_normals.shape != gt.shape:
            raise ValueError("normals must have the same shapes as their points")

    def pick(points, normals, cap, salt):
        index = subsample_indices(points.shape[0], cap, seed=seed + salt, device=points.device)
        if index is None:
            return points, normals
        return points[index], (normals[index] if normals is not None else None)

    result: dict[str, float] = {}
    # (name, query cloud, reference cloud); the salt keeps the four subsets independent.
    for name, (qp, qn), (rp, rn) in (
        ("acc", pick(pred, pred_normals, max_points, 0), pick(gt, gt_normals, max_reference_points, 1)),
        ("comp", pick(gt, gt_normals, max_points, 2), pick(pred, pred_normals, max_reference_points, 3)),
    ):
        distances, nearest = nearest_neighbors(qp, rp)
        result[f"{name}_mean"] = float(distances.mean())
        result[f"{name}_median"] = float(median(distances))
        if with_normals:
            result[f"nc_{name}_mean"], result[f"nc_{name}_median"] = _normal_consistency(qn, rn[nearest])
    if with_normals:
        result["nc_mean"] = 0.5 * (result["nc_acc_mean"] + result["nc_comp_mean"])
        result["nc_median"] = 0.5 * (result["nc_acc_median"] + result["nc_comp_median"])
    return result


def align_point_maps(
    pred: torch.Tensor,
    gt: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    mode: str = "sim3_icp",
    icp_threshold: float = 0.1,
    icp_iterations: int = 30,
    icp_max_points: int | None = 10_000,
    icp_max_target_points: int | None = 100_000,
    seed: int = 0,
) -> tuple[Sim3, dict[str, float]]:
    """Transform taking predicted points onto the GT frame, from pixel-aligned point maps.

    ``pred`` and ``gt`` are ``[..., 3]`` with the same shape (e.g. ``[S, H, W, 3]``); ``valid``
    selects the pixels to use. ``mode``: "sim3_icp" (Umeyama Sim(3) on corresponding pixels, then
    rigid ICP), "sim3", "icp" (ICP from identity) or "none". Returns the transform and diagnostics
    (``align_scale``, and ``icp_inlier_fraction`` / ``icp_inlier_rmse`` when ICP ran).
    """
    if mode not in ALIGN_MODES:
        raise ValueError(f"mode must be one of {ALIGN_MODES}, got {mode!r}")
    pred = as_tensor(pred, "pred", trailing=(3,))
    gt = as_tensor(gt, "gt", trailing=(3,)).to(pred.device)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt point maps must have the same shape, got {tuple(pred.shape)} and {tuple(gt.shape)}")
    mask = torch.isfinite(pred).all(-1) & torch.isfinite(gt).all(-1)
    if valid is not None:
        mask &= as_mask(valid, "valid", pred.shape[:-1], pred.device)
    p, g = pred[mask], gt[mask]
    if p.shape[0] < 3:
        raise ValueError(f"alignment needs at least 3 valid points, got {p.shape[0]}")
    transform = Sim3.identity(pred.device, torch.float64)
    info: dict[str, float] = {}
    if mode in ("sim3", "sim3_icp"):
        transform = umeyama(p.to(torch.float64), g.to(torch.float64), with_scale=True)
    if mode in ("icp", "sim3_icp"):
        result = icp(
            p.to(torch.float64), g.to(torch.float64), init=transform, threshold=icp_threshold,
            iterations=icp_iterations, max_points=icp_max_points, max_target_points=icp_max_target_points, seed=seed,
        )
        transform = result.transform
        info.update(icp_inlier_fraction=result.inlier_fraction, icp_inlier_rmse=result.inlier_rmse)
    info["align_scale"] = float(transform.scale)
    return transform.to(dtype=pred.dtype), info


def reconstruction_metrics(
    pred_points: torch.Tensor,
    gt_points: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    align: str = "sim3_icp",
    icp_threshold: float = 0.1,
    icp_iterations: int = 30,
    icp_max_points: int | None = 10_000,
    icp_max_target_points: int | None = 100_000,
    max_points: int | None = 20_000,
    max_reference_points: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Accuracy, completeness and normal consistency of a predicted point map sequence.

    Args:
        pred_points, gt_points: ``[S, H, W, 3]`` (or ``[H, W, 3]``) pixel-aligned point maps; GT in
            metres in any world frame, the prediction in any frame and scale.
        valid: ``[S, H, W]`` pixels to evaluate (e.g. GT validity & prediction confidence).
        align: see ``align_point_maps``.
        icp_threshold, icp_iterations, icp_max_points, icp_max_target_points: ICP settings
            (threshold in GT units; source / target subsampling caps).
        max_points, max_reference_points: query / reference caps of ``accuracy_completeness``.
        seed: seed of every subsampling.

    Returns ``acc_mean, acc_median, comp_mean, comp_median, nc_mean, nc_median`` (+ per-direction
    NC and alignment diagnostics), distances in GT units.
    """
    pred_points = as_tensor(pred_points, "pred_points", trailing=(3,))
    gt_points = as_tensor(gt_points, "gt_points", trailing=(3,)).to(pred_points.device)
    if pred_points.shape != gt_points.shape or pred_points.ndim < 3:
        raise ValueError(
            f"point maps must be [..., H, W, 3] of equal shape, got {tuple(pred_points.shape)} and {tuple(gt_points.shape)}"
        )
    mask = torch.isfinite(pred_points).all(-1) & torch.isfinite(gt_points).all(-1)
    if valid is not None:
        mask &= as_mask(valid, "valid", pred_points.shape[:-1], pred_points.device)
    transform, info = align_point_maps(
        pred_points, gt_points, mask, mode=align, icp_threshold=icp_threshold,
        icp_iterations=icp_iterations, icp_max_points=icp_max_points, icp_max_target_points=icp_max_target_points,
        seed=seed,
    )
    aligned = transform.apply(torch.where(mask.unsqueeze(-1), pred_points, torch.zeros_like(pred_points)))
    pred_normals, _ = point_map_normals(aligned, mask)
    gt_normals, _ = point_map_normals(gt_points, mask)
    result = accuracy_completeness(
        aligned[mask], gt_points[mask], pred_normals=pred_normals[mask], gt_normals=gt_normals[mask],
        max_points=max_points, max_reference_points=max_reference_points, seed=seed,
    )
    result.update(info)
    result["num_points"] = float(mask.sum())
    return result
