"""Image preprocessing as VGGT does it: "crop" and "pad" modes to a 518-pixel target.

- crop: width -> target, height -> round(h * target / w / 14) * 14, then centre-crop the height to
  target if it is larger (518x392 for 4:3 landscape input).
- pad: the long side -> target, the short side a multiple of 14, then pad with white to a square.
Images with an alpha channel are composited onto white first. Resampling is bicubic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def target_size(width: int, height: int, mode: str = "crop", target: int = 518, patch_size: int = 14) -> tuple[int, int]:
    """(new_width, new_height) after resizing, before cropping/padding."""
    if mode not in ("crop", "pad"):
        raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")
    if width <= 0 or height <= 0:
        raise ValueError(f"image has no pixels: {width}x{height}")
    if mode == "pad" and height > width:
        new_h = target
        new_w = round(width * (target / height) / patch_size) * patch_size
    else:
        new_w = target
        new_h = round(height * (target / width) / patch_size) * patch_size
    # Extremely thin images would round to zero patches.
    return max(new_w, patch_size), max(new_h, patch_size)


def preprocess_image(image: Image.Image, mode: str = "crop", target: int = 518, patch_size: int = 14) -> Tensor:
    """One PIL image -> float tensor [3, H, W] in [0, 1]."""
    if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    image = image.convert("RGB")
    new_w, new_h = target_size(image.width, image.height, mode, target, patch_size)
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    if mode == "crop" and new_h > target:
        top = (new_h - target) // 2
        tensor = tensor[:, top : top + target]
    if mode == "pad":
        pad_h, pad_w = target - tensor.shape[1], target - tensor.shape[2]
        top, left = pad_h // 2, pad_w // 2
        tensor = F.pad(tensor, (left, pad_w - left, top, pad_h - top), value=1.0)
    return tensor


def stack_frames(frames: Sequence[Tensor]) -> Tensor:
    """Stack [3, H, W] frames, padding smaller ones with white (centred) to the largest size."""
    if not frames:
        raise ValueError("no frames to stack")
    max_h = max(f.shape[1] for f in frames)
    max_w = max(f.shape[2] for f in frames)
    padded = []
    for f in frames:
        ph, pw = max_h - f.shape[1], max_w - f.shape[2]
        padded.append(F.pad(f, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=1.0) if ph or pw else f)
    return torch.stack(padded)


def list_images(folder: Union[str, Path]) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"not a folder: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def load_and_preprocess_images(paths: Iterable[Union[str, Path]], mode: str = "crop", target: int = 518) -> Tensor:
    """Images [S, 3, H, W] in [0, 1] from image files."""
    frames = []
    for p in paths:
        with Image.open(p) as img:
            frames.append(preprocess_image(img, mode, target))
    return stack_frames(frames)
