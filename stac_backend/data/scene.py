"""Procedural indoor scenes: a box-shaped room with textured boxes and spheres inside.

World frame of a scene (``world_frame == "scene"``): metres, z up, the floor is the plane z = 0 and
the room spans ``x in [-half_x, half_x]``, ``y in [-half_y, half_y]``, ``z in [0, height]``.

Layout rules keep every trajectory in ``stac_backend.data.trajectory`` collision-free. With
``a = min(half_x, half_y)``: "centre" objects stay within a distance ``CENTRE_LIMIT * a`` of the
z axis; "wall" objects stay beyond ``WALL_BAND`` times the half extent along their wall's axis;
cameras keep ``|x| <= CAMERA_MAX * half_x``, ``|y| <= CAMERA_MAX * half_y`` and a distance of at
least ``CAMERA_MIN_RADIUS * a`` from the z axis, at heights between 1.2 m and 1.8 m.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from .textures import CHECKER, NOISE, STRIPES

__all__ = [
    "Scene",
    "make_scene",
    "ROOM_FACE_NAMES",
    "CAMERA_MAX",
    "CAMERA_MIN_RADIUS",
    "CENTRE_LIMIT",
    "WALL_BAND",
]

# Object ids 0..5 are the room faces in this order; boxes follow, then spheres.
ROOM_FACE_NAMES = ("wall_-x", "wall_+x", "wall_-y", "wall_+y", "floor", "ceiling")
# Fractions of the half extents (see module docstring); trajectories import these.
CAMERA_MAX = 0.65
CAMERA_MIN_RADIUS = 0.45
CENTRE_LIMIT = 0.38
WALL_BAND = 0.76


@dataclass
class Scene:
    """Geometry, materials and light of one procedural room (all tensors on one device).

    Materials are stored per object id (room faces, then boxes, then spheres) so the renderer can
    gather them with one index.
    """

    room_min: torch.Tensor  # [3]
    room_max: torch.Tensor  # [3]
    box_center: torch.Tensor  # [B, 3]
    box_half: torch.Tensor  # [B, 3] half sizes along the box's local axes
    box_rotation: torch.Tensor  # [B, 3, 3] local-to-world rotation (yaw about z)
    sphere_center: torch.Tensor  # [K, 3]
    sphere_radius: torch.Tensor  # [K]
    tex_kind: torch.Tensor  # [O] int64, O = 6 + B + K
    tex_color_a: torch.Tensor  # [O, 3]
    tex_color_b: torch.Tensor  # [O, 3]
    tex_scale: torch.Tensor  # [O] metres
    tex_offset: torch.Tensor  # [O, 3]
    tex_direction: torch.Tensor  # [O, 3] unit vectors (stripes)
    tex_seed: torch.Tensor  # [O] int64
    light_position: torch.Tensor  # [3]
    seed: int = 0
    info: dict = field(default_factory=dict)

    @property
    def num_boxes(self) -> int:
        return int(self.box_center.shape[0])

    @property
    def num_spheres(self) -> int:
        return int(self.sphere_center.shape[0])

    @property
    def num_objects(self) -> int:
        return 6 + self.num_boxes + self.num_spheres

    @property
    def device(self) -> torch.device:
        return self.room_min.device

    def to(self, device: torch.device | str) -> "Scene":
        """Copy of the scene with every tensor on ``device``."""
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            values[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return Scene(**values)

    def describe(self) -> dict:
        """JSON-serialisable description (for sequence metadata)."""
        kinds = {CHECKER: "checker", STRIPES: "stripes", NOISE: "noise"}
        return {
            "seed": self.seed,
            "room_min": self.room_min.tolist(),
            "room_max": self.room_max.tolist(),
            "boxes": [
                {"center": c, "half_size": h, "yaw_deg": y}
                for c, h, y in zip(self.box_center.tolist(), self.box_half.tolist(), self.info.get("box_yaw_deg", []))
            ],
            "spheres": [
                {"center": c, "radius": r} for c, r in zip(self.sphere_center.tolist(), self.sphere_radius.tolist())
            ],
            "textures": [kinds[int(k)] for k in self.tex_kind.tolist()],
            "light_position": self.light_position.tolist(),
        }


def _random_color(rng: np.random.Generator) -> tuple[float, float, float]:
    """A saturated-ish colour with a random hue, so neighbouring surfaces differ clearly."""
    hue = rng.uniform(0.0, 1.0)
    sat = rng.uniform(0.35, 0.9)
    val = rng.uniform(0.45, 1.0)
    return colorsys.hsv_to_rgb(hue, sat, val)


def _random_material(rng: np.random.Generator, kinds: tuple[int, ...] = (CHECKER, STRIPES, NOISE)) -> dict:
    kind = int(rng.choice(kinds))
    color_a = np.array(_random_color(rng))
    # Second colour: a different hue and a clearly different brightness, for strong texture contrast.
    color_b = np.array(_random_color(rng)) * rng.uniform(0.35, 0.7)
    scale = {CHECKER: rng.uniform(0.12, 0.4), STRIPES: rng.uniform(0.08, 0.3), NOISE: rng.uniform(0.2, 0.6)}[kind]
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction) + 1e-12
    return {
        "kind": kind,
        "color_a": color_a,
        "color_b": color_b,
        "scale": scale,
        # Offsets in (0.1, 0.9) cells keep checker/stripe edges off planes at round coordinates.
        "offset": rng.uniform(0.1, 0.9, size=3),
        "direction": direction,
        "seed": int(rng.integers(0, 1 << 20)),
    }


def _yaw_matrix(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def make_scene(
    seed: int = 0,
    *,
    num_center_boxes: int | None = None,
    num_wall_boxes: int | None = None,
    num_spheres: int | None = None,
    device: torch.device | str = "cpu",
) -> Scene:
    """Build a deterministic random room from ``seed``.

    Counts left as ``None`` are drawn from the seed (2-3 centre boxes, 3-5 wall boxes, 2-4 spheres).
    All randomness comes from one ``numpy.random.Generator`` so the scene is identical on any device.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    rng = np.random.default_rng(seed)
    half_x, half_y = rng.uniform(2.5, 3.5, size=2)
    height = rng.uniform(2.6, 3.2)
    n_center = int(rng.integers(2, 4)) if num_center_boxes is None else num_center_boxes
    n_wall = int(rng.integers(3, 6)) if num_wall_boxes is None else num_wall_boxes
    n_sphere = int(rng.integers(2, 5)) if num_spheres is None else num_spheres
    if min(n_center, n_wall, n_sphere) < 0:
        raise ValueError("object counts must be non-negative")

    centre_radius = CENTRE_LIMIT * min(half_x, half_y)
    centers, halves, yaws = [], [], []

    # Centre cluster: boxes on the floor whose footprint circle stays inside centre_radius.
    for _ in range(n_center):
        hx, hy = rng.uniform(0.15, 0.4, size=2)
        reach = math.hypot(hx, hy)
        max_offset = max(centre_radius - reach, 0.0)
        r, a = rng.uniform(0.0, max_offset), rng.uniform(0.0, 2 * math.pi)
        hz = rng.uniform(0.2, 0.6)
        centers.append([r * math.cos(a), r * math.sin(a), hz])
        halves.append([hx, hy, hz])
        yaws.append(rng.uniform(0.0, math.pi / 2))

    # Wall objects: axis-aligned boxes standing against a random wall, outside the camera ring.
    for _ in range(n_wall):
        wall = int(rng.integers(0, 4))  # 0: -x, 1: +x, 2: -y, 3: +y
        normal_axis, along_axis = (0, 1) if wall < 2 else (1, 0)
        sign = -1.0 if wall % 2 == 0 else 1.0
        half = np.array([half_x, half_y])
        gap = rng.uniform(0.0, 0.05)  # a few centimetres off the wall, or touching it
        # Inner face at half - gap - 2 * depth_half must stay beyond WALL_BAND * half.
        depth_half = rng.uniform(0.1, ((1.0 - WALL_BAND) * half[normal_axis] - gap) / 2.0)
        along_half = rng.uniform(0.2, 0.6)
        hz = rng.uniform(0.3, 1.0)
        center = [0.0, 0.0, hz]
        center[normal_axis] = sign * (half[normal_axis] - gap - depth_half)
        center[along_axis] = rng.uniform(-half[along_axis] + along_half, half[along_axis] - along_half)
        hxy = [0.0, 0.0]
        hxy[normal_axis], hxy[along_axis] = depth_half, along_half
        centers.append(center)
        halves.append([hxy[0], hxy[1], hz])
        yaws.append(0.0)

    # Spheres: in the centre cluster, resting on the floor, on a box, or floating.
    sphere_centers, sphere_radii = [], []
    for _ in range(n_sphere):
        radius = rng.uniform(0.12, 0.35)
        max_offset = max(centre_radius - radius, 0.0)
        r, a = rng.uniform(0.0, max_offset), rng.uniform(0.0, 2 * math.pi)
        z = radius if rng.uniform() < 0.5 else rng.uniform(radius + 0.3, 1.8)
        sphere_centers.append([r * math.cos(a), r * math.sin(a), z])
        sphere_radii.append(radius)

    # Materials: room faces first (6), then boxes, then spheres.
    materials = [_random_material(rng) for _ in range(6 + len(centers) + n_sphere)]
    light = [rng.uniform(-0.3, 0.3) * half_x, rng.uniform(-0.3, 0.3) * half_y, height - 0.25]

    def tensor(values, shape=(-1,)):
        # float64 -> float32 in one step; reshape also gives empty lists their [0, 3] shape.
        return torch.tensor(np.asarray(values, dtype=np.float64).reshape(shape), dtype=torch.float32)

    scene = Scene(
        room_min=tensor([-half_x, -half_y, 0.0]),
        room_max=tensor([half_x, half_y, height]),
        box_center=tensor(centers, (-1, 3)),
        box_half=tensor(halves, (-1, 3)),
        box_rotation=tensor([_yaw_matrix(y) for y in yaws], (-1, 3, 3)),
        sphere_center=tensor(sphere_centers, (-1, 3)),
        sphere_radius=tensor(sphere_radii),
        tex_kind=torch.tensor([m["kind"] for m in materials], dtype=torch.int64),
        tex_color_a=tensor([m["color_a"] for m in materials], (-1, 3)),
        tex_color_b=tensor([m["color_b"] for m in materials], (-1, 3)),
        tex_scale=tensor([m["scale"] for m in materials]),
        tex_offset=tensor([m["offset"] for m in materials], (-1, 3)),
        tex_direction=tensor([m["direction"] for m in materials], (-1, 3)),
        tex_seed=torch.tensor([m["seed"] for m in materials], dtype=torch.int64),
        light_position=tensor(light),
        seed=seed,
        info={"box_yaw_deg": [math.degrees(y) for y in yaws]},
    )
    return scene.to(device)
