"""Looking at a reconstruction: a live 3D view (viser, in the browser), a still snapshot and a
depth/confidence video of a stream's output folder (docs/viewer.md).

    stac view out/demo                        # browse it at http://127.0.0.1:8080
    stac view out/demo --snapshot view.png --video depth.mp4 --no-serve
    stac stream synthetic:64 --out out/s --view   # live while the stream runs

Imported only by ``stac view`` / ``--view``: nothing else depends on it. ``scene`` and ``snapshot``
need numpy and pillow; ``video`` PyAV; ``live`` viser (``pip install "stac-backend[viewer]"``).
"""

from __future__ import annotations

from .scene import Scene, load_scene


def view_folder(folder, host: str = "127.0.0.1", port: int = 8080, serve: bool = True, save=None, video=None,
                snapshot=None) -> int:
    """What ``stac view`` does: write the still and the video if asked, then serve the 3D view
    until Ctrl-C (``serve``) and/or save it as a viser recording (``save``)."""
    import sys

    scene = load_scene(folder)
    print(f"{folder}: {len(scene.cameras)} frames, {len(scene.points)} points", file=sys.stderr)
    if snapshot is not None:
        from .snapshot import render_snapshot

        print(f"snapshot: {render_snapshot(scene, snapshot)}", file=sys.stderr)
    if video is not None:
        from .video import write_depth_video

        print(f"video: {write_depth_video(scene, video)}", file=sys.stderr)
    if serve or save is not None:
        from .live import LiveViewer

        viewer = LiveViewer(host=host, port=port)
        viewer.show_scene(scene)
        if save is not None:
            print(f"recording: {viewer.save(save)}", file=sys.stderr)
        if serve:
            viewer.serve_forever()
        viewer.stop()
    return 0


__all__ = ["Scene", "load_scene", "view_folder"]
