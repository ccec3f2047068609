"""The live 3D view: viser (a web viewer served from this process; open the printed address).

A ``LiveViewer`` takes frames as the stream produces them (``add_frame``) or a whole finished
``Scene`` (``show_scene``): per frame its confident points coloured by the input pixels, its camera
as a frustum with the image on it, the trajectory through the camera centres, and in the side
panel the newest depth and confidence maps. ``save`` writes the scene as a ``.viser`` recording
(viser's offline player); nothing needs a GPU or a display.
"""

from __future__ import annotations

import sys
import time
from typing import Mapping, Optional

import numpy as np

from .scene import Camera, Scene, colorize


def _wxyz(R: np.ndarray) -> np.ndarray:
    from ..results import rotation_to_quaternion

    x, y, z, w = rotation_to_quaternion(R)
    return np.array([w, x, y, z])


def confident_points(outputs: Mapping[str, np.ndarray], image: Optional[np.ndarray], max_points: int,
                     conf_key: str = "depth_conf", seed: int = 0,
                     points_from: str = "depth") -> tuple[np.ndarray, np.ndarray]:
    """One frame's points [N, 3] and colours [N, 3] (uint8): the top half by ``conf_key``, at most
    ``max_points``, chosen as points.ply chooses them (``results.confident_indices``); ``points_from``
    as in ``results.frame_world_points`` (depth + cameras by default, or the point head)."""
    from ..results import confident_indices, frame_world_points

    pts = frame_world_points(outputs, points_from)
    if pts is None:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8)
    conf = np.asarray(outputs.get(conf_key, outputs.get("world_points_conf")), dtype=np.float32).reshape(-1)
    keep = confident_indices(pts, conf, max_points, seed)
    if image is None:
        return pts[keep], np.full((len(keep), 3), 160, np.uint8)
    rgb = _rgb(image)
    return pts[keep], rgb.reshape(-1, 3)[keep]


def _rgb(image) -> np.ndarray:
    """[H, W, 3] uint8 from [3, H, W] or [H, W, 3], uint8 or float in [0, 1] (numpy or torch)."""
    from ..protocol import to_uint8_frames

    array = to_uint8_frames(image)
    return array.transpose(1, 2, 0) if array.ndim == 3 and array.shape[0] == 3 else array


class LiveViewer:
    def __init__(self, host: str = "127.0.0.1", port: int = 8080, max_points_per_frame: int = 4000,
                 conf_key: str = "depth_conf", frustum_scale: Optional[float] = None, points_from: str = "depth"):
        try:
            import viser
        except ImportError:
            raise ValueError('the 3D viewer needs viser: pip install "stac-backend[viewer]"') from None
        self.server = viser.ViserServer(host=host, port=port, verbose=False)
        self.server.scene.set_up_direction("-y")  # OpenCV cameras: y points down
        self.max_points_per_frame = max_points_per_frame
        self.conf_key = conf_key
        self.points_from = points_from
        self.frustum_scale = frustum_scale
        self.centers: list[np.ndarray] = []
        self._depth_panel = None
        self._conf_panel = None

    @property
    def url(self) -> str:
        return f"http://{self.server.get_host()}:{self.server.get_port()}"

    def add_frame(self, index: int, outputs: Mapping[str, np.ndarray], image=None) -> None:
        """One streamed frame: its points, its camera, the trajectory so far, its depth maps."""
        outputs = {k: _as_numpy(v) for k, v in outputs.items()}
        points, colors = confident_points(outputs, image, self.max_points_per_frame, self.conf_key, seed=index,
                                          points_from=self.points_from)
        self.server.scene.add_point_cloud(f"/points/frame_{index:05d}", points, colors, point_size=0.004)
        depth = outputs.get("depth")
        h, w = depth.shape[-2:] if depth is not None else (0, 0)
        camera = Camera(index, outputs["extrinsics"].astype(float), outputs["intrinsics"].astype(float), w, h)
        if self.frustum_scale is None and len(points):  # a tenth of the first frame's spread
            self.frustum_scale = float(max(np.percentile(np.linalg.norm(points - points.mean(0), axis=1), 90), 1e-3)) / 5
        self._add_camera(camera, None if image is None else _rgb(image))
        if depth is not None:
            self._show_maps(depth, outputs.get("depth_conf"))

    def show_scene(self, scene: Scene) -> None:
        """A finished output folder: its merged point cloud, every camera, the newest depth maps."""
        self.server.scene.add_point_cloud("/points/all", scene.points, scene.colors, point_size=0.004)
        self.frustum_scale = self.frustum_scale or 0.05 * scene.extent
        for k, camera in enumerate(scene.cameras):
            image = None
            if k < len(scene.frame_files) and (k % max(1, len(scene.cameras) // 32) == 0):  # at most ~32 thumbnails
                image = scene.frame(k).get("rgb")
            self._add_camera(camera, image)
        if scene.frame_files:
            last = scene.frame(len(scene.frame_files) - 1)
            if "depth" in last:
                self._show_maps(last["depth"], last.get("depth_conf"))

    def save(self, path) -> str:
        """The scene as a ``.viser`` recording (viser's offline player shows it)."""
        from pathlib import Path

        serializer = self.server.get_scene_serializer()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(serializer.serialize())
        return str(path)

    def finish(self) -> None:
        """After a live stream: keep the view up until Ctrl-C."""
        self.serve_forever()
        self.stop()

    def serve_forever(self) -> None:
        print(f"viewer at {self.url} (Ctrl-C closes it)", file=sys.stderr, flush=True)
        try:
            while True:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass

    def stop(self) -> None:
        self.server.stop()

    # ------------------------------------------------------------------ internals
    def _add_camera(self, camera: Camera, image: Optional[np.ndarray]) -> None:
        K = camera.intrinsics
        h = camera.height or 2 * K[1, 2]
        w = camera.width or 2 * K[0, 2]
        pose = camera.cam_to_world
        thumb = None
        if image is not None:  # small: a frustum per frame adds up
            step = max(1, int(np.ceil(image.shape[1] / 96)))
            thumb = np.ascontiguousarray(image[::step, ::step])
        self.server.scene.add_camera_frustum(
            f"/cameras/frame_{camera.frame:05d}", fov=float(2 * np.arctan2(h / 2, K[1, 1])), aspect=float(w / max(h, 1)),
            scale=self.frustum_scale or 0.05, image=thumb, wxyz=_wxyz(pose[:3, :3]), position=pose[:3, 3],
            color=(120, 200, 255))
        self.centers.append(pose[:3, 3])
        if len(self.centers) > 1:
            segments = np.stack([np.asarray(self.centers[:-1]), np.asarray(self.centers[1:])], axis=1)
            self.server.scene.add_line_segments("/trajectory", segments.astype(np.float32), colors=(255, 80, 80),
                                                thickness=2.0, thickness_units="screen")

    def _show_maps(self, depth: np.ndarray, conf: Optional[np.ndarray]) -> None:
        depth_rgb = colorize(depth)
        if self._depth_panel is None:
            self._depth_panel = self.server.gui.add_image(depth_rgb, label="depth")
        else:
            self._depth_panel.image = depth_rgb
        if conf is not None:
            conf_rgb = colorize(conf)
            if self._conf_panel is None:
                self._conf_panel = self.server.gui.add_image(conf_rgb, label="depth confidence")
            else:
                self._conf_panel.image = conf_rgb


def _as_numpy(value) -> np.ndarray:
    from ..results import _numpy

    return _numpy(value)
