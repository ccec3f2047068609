"""Batched ray casting of a procedural ``Scene`` with pinhole cameras (torch, CPU or CUDA).

Rays are generated with un-normalised directions ``d = R^T K^-1 [u, v, 1]^T``, whose component along
the optical axis is exactly 1, so the ray parameter ``t`` of a hit *is* its z-depth. All primitives
are intersected analytically for every ray at once (room interior, oriented boxes, spheres); the
nearest hit wins. Work is split into chunks of rays to bound memory at high resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .scene import Scene
from .textures import fbm, texture_weight

__all__ = ["RenderOutput", "render_frames", "DEFAULT_CHUNK_RAYS"]

# About 2.6e5 rays per chunk: the box test holds a few [N, B, 3] float32 tensors, so peak memory
# stays in the low hundreds of MB while chunks are still large enough to keep the device busy.
DEFAULT_CHUNK_RAYS = 1 << 18
_EPS_T = 1e-4  # hits closer than this along the ray are ignored (self-intersection guard)
_AMBIENT = 0.3
_DETAIL_SCALE = 0.12  # metres; fine noise on every surface so flat colour regions still have texture


@dataclass
class RenderOutput:
    """Per-frame render results: RGB ``[S, 3, H, W]`` in [0, 1], z-depth ``[S, H, W]`` (metres),
    valid mask ``[S, H, W]``, world points ``[S, H, W, 3]`` and object ids ``[S, H, W]`` int16
    (0-5 room faces, then boxes, then spheres; -1 = invalid)."""

    images: torch.Tensor
    depth: torch.Tensor
    valid: torch.Tensor
    world_points: torch.Tensor
    object_ids: torch.Tensor


def _safe_reciprocal(x: torch.Tensor) -> torch.Tensor:
    # Replace exact zeros by a tiny signed value so slab tests give +-inf-like values, never NaN.
    tiny = torch.where(x >= 0, torch.full_like(x, 1e-12), torch.full_like(x, -1e-12))
    return 1.0 / torch.where(x.abs() < 1e-12, tiny, x)


def _intersect_room(origin: torch.Tensor, inv_dir: torch.Tensor, scene: Scene) -> torch.Tensor:
    """Exit distance of rays starting inside the axis-aligned room ``[N]``."""
    t_lo = (scene.room_min - origin) * inv_dir
    t_hi = (scene.room_max - origin) * inv_dir
    return torch.maximum(t_lo, t_hi).amin(dim=-1)


def _intersect_boxes(origin: torch.Tensor, direction: torch.Tensor, scene: Scene) -> torch.Tensor:
    """Entry distance to every oriented box ``[N, B]`` (inf where missed)."""
    # World -> box-local: x_local = R^T (x - c), written with row vectors as (x - c) @ R.
    rel = origin.unsqueeze(1) - scene.box_center.unsqueeze(0)  # [N, B, 3]
    o_local = torch.einsum("nbi,bij->nbj", rel, scene.box_rotation)
    d_local = torch.einsum("ni,bij->nbj", direction, scene.box_rotation)
    inv = _safe_reciprocal(d_local)
    t1 = (-scene.box_half - o_local) * inv
    t2 = (scene.box_half - o_local) * inv
    t_near = torch.minimum(t1, t2).amax(dim=-1)
    t_far = torch.maximum(t1, t2).amin(dim=-1)
    hit = (t_far >= t_near) & (t_near > _EPS_T)
    return torch.where(hit, t_near, torch.full_like(t_near, float("inf")))


def _intersect_spheres(origin: torch.Tensor, direction: torch.Tensor, scene: Scene) -> torch.Tensor:
    """Nearest positive distance to every sphere ``[N, K]`` (inf where missed)."""
    oc = origin.unsqueeze(1) - scene.sphere_center.unsqueeze(0)  # [N, K, 3]
    a = (direction * direction).sum(-1, keepdim=True)  # [N, 1]
    half_b = (oc * direction.unsqueeze(1)).sum(-1)
    c = (oc * oc).sum(-1) - scene.sphere_radius.square()
    disc = half_b.square() - a * c
    t = (-half_b - disc.clamp_min(0.0).sqrt()) / a
    hit = (disc > 0) & (t > _EPS_T)
    return torch.where(hit, t, torch.full_like(t, float("inf")))


def _shade_chunk(origin: torch.Tensor, direction: torch.Tensor, scene: Scene):
    """Trace one chunk of rays. Returns rgb [N, 3], depth [N], points [N, 3], ids [N]."""
    inv_dir = _safe_reciprocal(direction)
    t_room = _intersect_room(origin, inv_dir, scene)
    candidates = [t_room.unsqueeze(1)]
    if scene.num_boxes:
        candidates.append(_intersect_boxes(origin, direction, scene))
    if scene.num_spheres:
        candidates.append(_intersect_spheres(origin, direction, scene))
    t_all = torch.cat(candidates, dim=1)  # column 0 = room, then boxes, then spheres
    t_hit, column = t_all.min(dim=1)
    points = origin + t_hit.unsqueeze(-1) * direction

    n = origin.shape[0]
    normal = torch.zeros(n, 3, device=origin.device, dtype=origin.dtype)
    local = points.clone()  # texture coordinates: world for room faces, object frame otherwise
    object_id = torch.zeros(n, device=origin.device, dtype=torch.int64)

    # Room: the exit axis is the argmin of the per-axis exit distances; the normal points inward.
    is_room = column == 0
    if bool(is_room.any()):
        d = direction[is_room]
        t_exit = torch.maximum(
            (scene.room_min - origin[is_room]) * inv_dir[is_room], (scene.room_max - origin[is_room]) * inv_dir[is_room]
        )
        axis = t_exit.argmin(dim=-1)
        positive = d.gather(1, axis.unsqueeze(1)).squeeze(1) > 0
        room_normal = torch.zeros_like(d)
        room_normal.scatter_(1, axis.unsqueeze(1), torch.where(positive, -1.0, 1.0).to(d.dtype).unsqueeze(1))
        normal[is_room] = room_normal
        object_id[is_room] = 2 * axis + positive.to(torch.int64)

    # Boxes: the hit face is the local axis where |p_local| / half is largest (closest to 1).
    is_box = (column >= 1) & (column < 1 + scene.num_boxes)
    if bool(is_box.any()):
        box = column[is_box] - 1
        rotation = scene.box_rotation[box]
        p_local = ((points[is_box] - scene.box_center[box]).unsqueeze(-2) @ rotation).squeeze(-2)
        axis = (p_local.abs() / scene.box_half[box]).argmax(dim=-1)
        sign = torch.sign(p_local.gather(1, axis.unsqueeze(1)))
        n_local = torch.zeros_like(p_local)
        n_local.scatter_(1, axis.unsqueeze(1), sign)
        normal[is_box] = (rotation @ n_local.unsqueeze(-1)).squeeze(-1)
        local[is_box] = p_local
        object_id[is_box] = 6 + box

    is_sphere = column >= 1 + scene.num_boxes
    if bool(is_sphere.any()):
        sphere = column[is_sphere] - 1 - scene.num_boxes
        rel = points[is_sphere] - scene.sphere_center[sphere]
        normal[is_sphere] = rel / scene.sphere_radius[sphere].unsqueeze(-1)
        local[is_sphere] = rel
        object_id[is_sphere] = 6 + scene.num_boxes + sphere

    # Surface colour: two-colour procedural texture times fine detail noise (seeded per object).
    weight = texture_weight(
        scene.tex_kind[object_id],
        local,
        scene.tex_scale[object_id],
        scene.tex_offset[object_id],
        scene.tex_direction[object_id],
        scene.tex_seed[object_id],
    ).unsqueeze(-1)
    albedo = scene.tex_color_a[object_id] * (1.0 - weight) + scene.tex_color_b[object_id] * weight
    detail = fbm(local / _DETAIL_SCALE, scene.tex_seed[object_id] + 7, octaves=2)
    albedo = albedo * (0.75 + 0.5 * detail).unsqueeze(-1)

    # Lambertian shading with one point light; normals are flipped to face the viewer first.
    normal = normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    facing = torch.where((normal * direction).sum(-1, keepdim=True) > 0, -normal, normal)
    to_light = scene.light_position - points
    to_light = to_light / to_light.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    lambert = (facing * to_light).sum(-1, keepdim=True).clamp_min(0.0)
    rgb = (albedo * (_AMBIENT + (1.0 - _AMBIENT) * lambert)).clamp(0.0, 1.0)
    return rgb, t_hit, points, object_id


def render_frames(
    scene: Scene,
    extrinsics: torch.Tensor,
    intrinsics: torch.Tensor,
    height: int,
    width: int,
    *,
    chunk_rays: int = DEFAULT_CHUNK_RAYS,
    max_depth: float | None = None,
) -> RenderOutput:
    """Render ``S`` frames of ``scene`` seen by OpenCV cameras ``[S, 3, 4]`` / ``[S, 3, 3]``.

    Args:
        scene: the scene; it is moved to the device of ``extrinsics`` if needed.
        extrinsics: camera-from-world, ``[S, 3, 4]``.
        intrinsics: ``[S, 3, 3]`` pinhole intrinsics.
        height, width: image size in pixels.
        chunk_rays: rays traced per chunk (memory bound).
        max_depth: optional sensor range; pixels farther than this are marked invalid and get
            depth 0 and world point 0 (their colour is still rendered).
    """
    if extrinsics.ndim != 3 or extrinsics.shape[1:] != (3, 4):
        raise ValueError(f"extrinsics must be [S, 3, 4], got {tuple(extrinsics.shape)}")
    num_frames = extrinsics.shape[0]
    if intrinsics.shape != (num_frames, 3, 3):
        raise ValueError(f"intrinsics must be [{num_frames}, 3, 3], got {tuple(intrinsics.shape)}")
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if chunk_rays <= 0:
        raise ValueError(f"chunk_rays must be positive, got {chunk_rays}")
    device = extrinsics.device
    scene = scene.to(device) if scene.device != device else scene
    extrinsics = extrinsics.to(torch.float32)
    intrinsics = intrinsics.to(device=device, dtype=torch.float32)

    rotation = extrinsics[:, :3, :3]
    centers = -(rotation.transpose(1, 2) @ extrinsics[:, :3, 3:]).squeeze(-1)  # [S, 3]
    pixels = height * width
    total = num_frames * pixels
    rgb = torch.empty(total, 3, device=device)
    depth = torch.empty(total, device=device)
    points = torch.empty(total, 3, device=device)
    ids = torch.empty(total, device=device, dtype=torch.int64)
    for start in range(0, total, chunk_rays):
        stop = min(start + chunk_rays, total)
        # Rays are generated per chunk (never for the whole sequence) so memory stays bounded.
        index = torch.arange(start, stop, device=device)
        frame, pixel = index // pixels, index % pixels
        u = (pixel % width).to(torch.float32)
        v = (pixel // width).to(torch.float32)
        k = intrinsics[frame]
        # Camera-frame direction with z = 1, so the hit distance along it is the z-depth.
        dirs_cam = torch.stack([(u - k[:, 0, 2]) / k[:, 0, 0], (v - k[:, 1, 2]) / k[:, 1, 1], torch.ones_like(u)], -1)
        # World direction d = R^T d_cam, i.e. the row vector d_cam @ R.
        dirs_world = (dirs_cam.unsqueeze(1) @ rotation[frame]).squeeze(1)
        rgb[start:stop], depth[start:stop], points[start:stop], ids[start:stop] = _shade_chunk(
            centers[frame], dirs_world, scene
        )

    valid = torch.isfinite(depth) & (depth > 0)
    if max_depth is not None:
        valid &= depth <= max_depth
    depth = torch.where(valid, depth, torch.zeros_like(depth))
    points = torch.where(valid.unsqueeze(-1), points, torch.zeros_like(points))
    ids = torch.where(valid, ids, torch.full_like(ids, -1))
    shape = (num_frames, height, width)
    return RenderOutput(
        images=rgb.reshape(*shape, 3).permute(0, 3, 1, 2).contiguous(),
        depth=depth.reshape(shape),
        valid=valid.reshape(shape),
        world_points=points.reshape(*shape, 3),
        object_ids=ids.reshape(shape).to(torch.int16),
    )
