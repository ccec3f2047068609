"""Similarity alignment (Umeyama) and point-to-point ICP, as used before scoring reconstructions.

A ``Sim3`` maps points as ``x -> scale * rotation @ x + translation``. Solves run in float64 (the
SVD of a 3x3 matrix is cheap, and float32 would limit "exact" recovery to ~1e-6); the returned
transform has the dtype of the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._tensors import as_tensor
from .neighbors import nearest_neighbors, subsample

__all__ = ["Sim3", "umeyama", "icp", "IcpResult"]


@dataclass(frozen=True)
class Sim3:
    """Similarity transform ``x -> scale * rotation @ x + translation`` (rigid when scale == 1)."""

    scale: torch.Tensor  # [] scalar
    rotation: torch.Tensor  # [3, 3], det +1
    translation: torch.Tensor  # [3]

    @staticmethod
    def identity(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "Sim3":
        return Sim3(
            torch.ones((), device=device, dtype=dtype),
            torch.eye(3, device=device, dtype=dtype),
            torch.zeros(3, device=device, dtype=dtype),
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Sim3":
        return Sim3(
            self.scale.to(device=device, dtype=dtype),
            self.rotation.to(device=device, dtype=dtype),
            self.translation.to(device=device, dtype=dtype),
        )

    def apply(self, points: torch.Tensor) -> torch.Tensor:
        """Transform points ``[..., 3]``."""
        t = self.to(points.device, points.dtype)
        return t.scale * (points @ t.rotation.T) + t.translation

    def compose(self, inner: "Sim3") -> "Sim3":
        """``self o inner``: first ``inner``, then ``self``."""
        inner = inner.to(self.rotation.device, self.rotation.dtype)
        return Sim3(
            self.scale * inner.scale,
            self.rotation @ inner.rotation,
            self.scale * (self.rotation @ inner.translation) + self.translation,
        )

    def inverse(self) -> "Sim3":
        rotation_t = self.rotation.T
        return Sim3(1.0 / self.scale, rotation_t, -(rotation_t @ self.translation) / self.scale)

    def matrix(self) -> torch.Tensor:
        """4x4 homogeneous matrix."""
        m = torch.eye(4, device=self.rotation.device, dtype=self.rotation.dtype)
        m[:3, :3] = self.scale * self.rotation
        m[:3, 3] = self.translation
        return m


def umeyama(
    source: torch.Tensor, target: torch.Tensor, *, with_scale: bool = True, weights: torch.Tensor | None = None
) -> Sim3:
    """Least-squares ``Sim3`` (or rigid transform) mapping ``source`` ``[N, 3]`` onto ``target``.

    Minimises ``sum_i w_i |target_i - (s R source_i + t)|^2`` (Umeyama 1991), with a reflection
    guard so ``det R = +1``. Needs at least 3 points that are not all coincident; for collinear
    points the rotation about their line is not determined (any valid minimiser is returned).
    """
    source = as_tensor(source, "source", trailing=(3,), ndim=2)
    target = as_tensor(target, "target", trailing=(3,), ndim=2)
    if source.shape != target.shape:
        raise ValueError(f"source and target must have the same shape, got {tuple(source.shape)} and {tuple(target.shape)}")
    if source.shape[0] < 3:
        raise ValueError(f"umeyama needs at least 3 point pairs, got {source.shape[0]}")
    out_dtype = torch.promote_types(source.dtype, target.dtype)
    x = source.to(torch.float64)
    y = target.to(device=source.device, dtype=torch.float64)
    if weights is None:
        w = torch.full((x.shape[0],), 1.0 / x.shape[0], device=x.device, dtype=torch.float64)
    else:
        w = as_tensor(weights, "weights", ndim=1).to(device=x.device, dtype=torch.float64)
        if w.shape[0] != x.shape[0] or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError("weights must be [N], non-negative, with a positive sum")
        w = w / w.sum()
    mu_x = (w[:, None] * x).sum(0)
    mu_y = (w[:, None] * y).sum(0)
    xc, yc = x - mu_x, y - mu_y
    var_x = (w * (xc * xc).sum(-1)).sum()
    if float(var_x) <= 1e-24:
        raise ValueError("umeyama: source points are all coincident (zero variance)")
    covariance = (w[:, None] * yc).T @ xc  # [3, 3] = sum w (y - mu_y)(x - mu_x)^T
    u, d, vh = torch.linalg.svd(covariance)
    sign = torch.ones(3, device=x.device, dtype=torch.float64)
    if float(torch.det(u) * torch.det(vh)) < 0:
        sign[2] = -1.0  # flip the weakest axis instead of returning a reflection
    rotation = u @ torch.diag(sign) @ vh
    scale = (d * sign).sum() / var_x if with_scale else torch.ones((), device=x.device, dtype=torch.float64)
    translation = mu_y - scale * (rotation @ mu_x)
    return Sim3(scale, rotation, translation).to(dtype=out_dtype)


@dataclass(frozen=True)
class IcpResult:
    """Outcome of ``icp``: the full transform (initial Sim3 included) and fit statistics."""

    transform: Sim3
    inlier_fraction: float  # share of (subsampled) source points within the threshold at the end
    inlier_rmse: float  # RMS distance of those inliers
    iterations: int  # iterations actually run (stops early once the update is negligible)


def icp(
    source: torch.Tensor,
    target: torch.Tensor,
    *,
    init: Sim3 | None = None,
    threshold: float = 0.1,
    iterations: int = 30,
    max_points: int | None = 10_000,
    max_target_points: int | None = 100_000,
    seed: int = 0,
) -> IcpResult:
    """Point-to-point ICP refining ``init`` rigidly so that ``source`` ``[N, 3]`` fits ``target``.

    Each iteration pairs every (subsampled) source point with its nearest target point, keeps
    pairs closer than ``threshold`` (same units as the points; 0.1 m in the 7-Scenes / NRGBD
    protocol) and solves the rigid Umeyama update on them. The scale of ``init`` is kept: ICP only
    corrects the pose left after a Sim(3) alignment. Runs at most ``iterations`` times and stops
    early when an update moves points by less than 1e-9 (further iterations would change nothing).
    Source and target are subsampled (deterministically) to ``max_points`` / ``max_target_points``
    with one seed; for clouds of equal size the source sample is then a subset of the target sample
    (prefixes of one permutation), so pixel-aligned clouds keep their exact pairs.
    """
    source = as_tensor(source, "source", trailing=(3,), ndim=2)
    target = as_tensor(target, "target", trailing=(3,), ndim=2).to(source.device)
    if threshold <= 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    if iterations < 0:
        raise ValueError(f"iterations must be non-negative, got {iterations}")
    if source.shape[0] < 3 or target.shape[0] < 3:
        raise ValueError("icp needs at least 3 source and 3 target points")
    src, _ = subsample(source, max_points, seed=seed)
    dst, _ = subsample(target, max_target_points, seed=seed)
    current = (init or Sim3.identity(source.device, torch.float64)).to(source.device, torch.float64)
    src64, dst64 = src.to(torch.float64), dst.to(torch.float64)
    extent = float((src64.max(0).values - src64.min(0).values).norm()) * float(current.scale)
    done = 0
    for done in range(1, iterations + 1):
        moved = current.apply(src64)
        distances, index = nearest_neighbors(moved, dst64)
        inliers = distances < threshold
        if int(inliers.sum()) < 3:
            done -= 1
            break
        update = umeyama(moved[inliers], dst64[index[inliers]], with_scale=False)
        current = update.compose(current)
        # Largest displacement the update causes inside the cloud's extent.
        motion = (update.rotation - torch.eye(3, dtype=torch.float64, device=src.device)).norm() * extent
        if float(motion + update.translation.norm()) < 1e-9:
            break
    distances, _ = nearest_neighbors(current.apply(src64), dst64)
    inliers = distances < threshold
    fraction = float(inliers.double().mean())
    rmse = float(distances[inliers].square().mean().sqrt()) if bool(inliers.any()) else float("nan")
    return IcpResult(current.to(dtype=source.dtype), fraction, rmse, done)
