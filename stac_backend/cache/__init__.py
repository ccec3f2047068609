"""Every per-stream cache: the global-attention policies and the camera trunk's cache.

``make_cache(config, geometry)`` builds the policy a ``CacheConfig`` names:
``full``, ``window``, ``sink_window``, ``heavy_hitter`` or ``stac``; ``CameraCache(config,
geometry)`` the camera trunk's cache, bounded by ``config.camera_window``.
"""

from __future__ import annotations

from .base import CacheGeometry, CachePolicy, StepInfo, geometry_of
from .camera import CameraCache, camera_bytes_bound, camera_bytes_per_frame
from .config import POLICIES, CacheConfig
from .full import FullCache
from .heavy_hitter import HeavyHitterCache
from .stac import StacCache
from .window import SinkWindowCache, WindowCache


def make_cache(config: CacheConfig, geometry: CacheGeometry) -> CachePolicy:
    if config.policy == "full":
        return FullCache(growth=config.full_growth)
    if config.policy == "window":
        return WindowCache(config, geometry)
    if config.policy == "sink_window":
        return SinkWindowCache(config, geometry)
    if config.policy == "heavy_hitter":
        return HeavyHitterCache(config, geometry)
    if config.policy == "stac":
        return StacCache(config, geometry)
    raise ValueError(f"unknown cache policy {config.policy!r}; choose one of {POLICIES}")


__all__ = [
    "CameraCache",
    "camera_bytes_bound",
    "camera_bytes_per_frame",
    "CacheConfig",
    "CacheGeometry",
    "geometry_of",
    "CachePolicy",
    "StepInfo",
    "POLICIES",
    "make_cache",
    "FullCache",
    "WindowCache",
    "SinkWindowCache",
    "HeavyHitterCache",
    "StacCache",
]
