"""Streaming 3D reconstruction with a causal VGGT-family transformer and STAC cache compression."""

__version__ = "0.1.0"
