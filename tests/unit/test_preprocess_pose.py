"""Image preprocessing modes and pose-encoding conversions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from stac_backend.model.pose import (
    extri_intri_to_pose_encoding,
    matrix_to_quaternion,
    pose_encoding_to_extri_intri,
    quaternion_to_matrix,
)
from stac_backend.model.preprocess import load_and_preprocess_images, preprocess_image, target_size


def test_crop_mode_gives_518x392_for_4_3_images():
    img = Image.fromarray(np.full((480, 640, 3), 128, np.uint8))
    out = preprocess_image(img, "crop")
    assert out.shape == (3, 392, 518)
    assert target_size(640, 480, "crop") == (518, 392)


def test_crop_mode_centre_crops_tall_images():
    img = Image.fromarray(np.zeros((1000, 500, 3), np.uint8))
    assert preprocess_image(img, "crop").shape == (3, 518, 518)


def test_pad_mode_pads_with_white_to_square():
    img = Image.fromarray(np.zeros((300, 600, 3), np.uint8))
    out = preprocess_image(img, "pad")
    assert out.shape == (3, 518, 518)
    assert out[:, 0, :].min() == 1.0 and out[:, 259, 259].max() == 0.0  # padding white, content black


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((28, 28, 4), np.uint8)  # fully transparent
    path = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    out = load_and_preprocess_images([path], "crop", target=28)
    assert torch.allclose(out, torch.ones_like(out))


def test_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        target_size(10, 10, "stretch")


def test_quaternion_round_trip():
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(100, 4, generator=g), dim=-1)
    q = q * torch.where(q[:, 3:] < 0, -1.0, 1.0)
    R = quaternion_to_matrix(q)
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(3).expand(100, 3, 3), atol=1e-5)
    assert torch.allclose(matrix_to_quaternion(R), q, atol=1e-5)


def test_pose_encoding_round_trip_and_intrinsics():
    enc = torch.tensor([[0.1, -0.2, 0.3, 0.0, 0.0, math.sin(0.25), math.cos(0.25), 1.0, 1.2]])
    extr, intr = pose_encoding_to_extri_intri(enc, (392, 518))
    assert intr[0, 0, 2] == 259 and intr[0, 1, 2] == 196
    assert torch.isclose(intr[0, 1, 1], torch.tensor(196 / math.tan(0.5)))
    back = extri_intri_to_pose_encoding(extr, intr, (392, 518))
    assert torch.allclose(back, enc, atol=1e-5)


def test_zero_field_of_view_stays_finite():
    enc = torch.zeros(1, 9)
    enc[0, 6] = 1.0
    _, intr = pose_encoding_to_extri_intri(enc, (56, 84))
    assert torch.isfinite(intr).all()
