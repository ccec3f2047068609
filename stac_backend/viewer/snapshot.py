"""A still image of a reconstruction, drawn in software (numpy + pillow): no GPU, display or browser.

Left: the coloured point cloud seen from behind and above the first camera, with every camera's
frustum and the trajectory through their centres (a z-buffered splat of the same data the live
viewer shows). Right: the last frame's input image, depth and depth confidence.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .scene import Scene, colorize, frustum_segments


def _look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray) -> np.ndarray:
    """[3, 4] camera-from-world of a virtual OpenCV camera (z forward, y down) at ``eye``."""
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    x /= max(np.linalg.norm(x), 1e-9)
    y = np.cross(z, x)
    R = np.stack([x, y, z])
    return np.concatenate([R, (-R @ eye)[:, None]], 1)


def _project(points: np.ndarray, view: np.ndarray, focal: float, size: tuple[int, int]):
    cam = points @ view[:3, :3].T + view[:3, 3]
    z = cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = focal * cam[:, 0] / z + size[0] / 2
        v = focal * cam[:, 1] / z + size[1] / 2
    return u, v, z


def render_cloud(scene: Scene, size: tuple[int, int] = (960, 720)) -> Image.Image:
    W, H = size
    canvas = np.full((H, W, 3), 24, np.uint8)
    extent = scene.extent
    pts = scene.points
    target = np.median(pts, axis=0) if len(pts) else np.zeros(3)
    # Behind and above the first camera, looking at the cloud's median: the way the stream saw it.
    first = scene.cameras[0] if scene.cameras else None
    if first is not None:
        pose = first.cam_to_world
        back, down, right = pose[:3, 2], pose[:3, 1], pose[:3, 0]
        eye = pose[:3, 3] - back * 0.9 * extent - down * 0.6 * extent - right * 0.25 * extent
        up = -down
    else:
        eye, up = target + np.array([0, -extent, -extent]), np.array([0.0, -1.0, 0.0])
    view = _look_at(eye, target, up)
    focal = 0.9 * W
    if len(pts):
        u, v, z = _project(pts, view, focal, size)
        ok = (z > 1e-6) & (u >= 0) & (u < W - 1) & (v >= 0) & (v < H - 1)
        order = np.argsort(-z[ok])  # far first: near points overwrite them
        ui, vi = u[ok][order].astype(int), v[ok][order].astype(int)
        col = scene.colors[ok][order]
        for du in (0, 1):  # 2x2 splats fill the gaps between points
            for dv in (0, 1):
                canvas[vi + dv, ui + du] = col
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    scale = 0.08 * extent

    def line(a, b, fill, width=2):
        ua, va, za = _project(np.asarray([a, b]), view, focal, size)
        if (za > 1e-6).all():
            draw.line([(ua[0], va[0]), (ua[1], va[1])], fill=fill, width=width)

    centres = [c.center for c in scene.cameras]
    for a, b in zip(centres, centres[1:]):
        line(a, b, (255, 80, 80), 3)
    for k, cam in enumerate(scene.cameras):
        colour = (255, 210, 60) if k in (0, len(scene.cameras) - 1) else (120, 200, 255)
        for a, b in frustum_segments(cam, scale):
            line(a, b, colour, 1)
    draw.text((10, 8), f"{len(pts):,} points, {len(scene.cameras)} cameras (trajectory in red)", fill=(235, 235, 235))
    return image


def render_snapshot(scene: Scene, path, size: tuple[int, int] = (1440, 720)) -> Path:
    """Write the still (PNG) and return its path."""
    W, H = size
    cloud = render_cloud(scene, (H * 4 // 3, H))
    out = Image.new("RGB", (W, H), (16, 16, 16))
    out.paste(cloud, (0, 0))
    panel_w = W - cloud.width
    if scene.frame_files:
        frame = scene.frame(len(scene.frame_files) - 1)
        tiles = []
        if "rgb" in frame:
            tiles.append(("input", frame["rgb"]))
        if "depth" in frame:
            tiles.append(("depth", colorize(frame["depth"])))
        if "depth_conf" in frame:
            tiles.append(("depth confidence", colorize(frame["depth_conf"])))
        tile_h = H // max(len(tiles), 1)
        draw = ImageDraw.Draw(out)
        for k, (label, array) in enumerate(tiles):
            tile = Image.fromarray(np.ascontiguousarray(array))
            fit = min((panel_w - 8) / tile.width, (tile_h - 8) / tile.height)  # up or down: model images are small
            tile = tile.resize((max(1, int(tile.width * fit)), max(1, int(tile.height * fit))), Image.BILINEAR)
            x, y = cloud.width + 4 + (panel_w - 8 - tile.width) // 2, k * tile_h + 4
            out.paste(tile, (x, y))
            draw.text((x + 4, y + 2), label, fill=(255, 255, 255))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path
