"""Triton entry point: the logic lives in stac_backend.serving.triton_model."""

from stac_backend.serving.triton_model import TritonPythonModel  # noqa: F401
