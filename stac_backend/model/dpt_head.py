"""DPT dense-prediction head (depth or world points, each with a confidence).

Reads four intermediate aggregator layers, projects each to a feature map at its own scale,
fuses them coarse-to-fine with residual conv units, upsamples to the image size and applies the
output activation. Every frame is processed independently, so frames can go through in chunks.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _sincos(dim: int, pos: Tensor, omega_0: float = 100.0) -> Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / omega_0**omega
    angles = pos.reshape(-1).double()[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def uv_position_embedding(height: int, width: int, channels: int, aspect_ratio: float, device, dtype) -> Tensor:
    """Sinusoidal embedding [channels, height, width] of normalised view-plane coordinates.

    u spans +-aspect/diag and v +-1/diag (diag = sqrt(aspect^2 + 1)), sampled at pixel centres.
    """
    diag = (aspect_ratio**2 + 1.0) ** 0.5
    span_x, span_y = aspect_ratio / diag, 1.0 / diag
    u = torch.linspace(-span_x * (width - 1) / width, span_x * (width - 1) / width, width, device=device, dtype=dtype)
    v = torch.linspace(-span_y * (height - 1) / height, span_y * (height - 1) / height, height, device=device, dtype=dtype)
    uu, vv = torch.meshgrid(u, v, indexing="xy")  # [height, width] each
    emb = torch.cat([_sincos(channels // 2, uu), _sincos(channels // 2, vv)], dim=-1)
    return emb.view(height, width, channels).permute(2, 0, 1)


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        # The original applies an in-place ReLU to its input, so the skip connection carries relu(x).
        x = F.relu(x)
        return self.conv2(F.relu(self.conv1(x))) + x


class FeatureFusionBlock(nn.Module):
    def __init__(self, features: int, has_residual: bool = True):
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.has_residual = has_residual
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: Tensor, skip: Optional[Tensor] = None, size: Optional[Sequence[int]] = None) -> Tensor:
        if self.has_residual and skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            size = (x.shape[-2] * 2, x.shape[-1] * 2)
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTHead(nn.Module):
    def __init__(
        self,
        dim_in: int,
        patch_size: int = 14,
        output_dim: int = 4,
        activation: str = "inv_log",
        conf_activation: str = "expp1",
        features: int = 256,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23),
        pos_embed: bool = True,
        feature_only: bool = False,
        down_ratio: int = 1,
    ):
        super().__init__()
        if activation not in ("inv_log", "exp", "linear"):
            raise ValueError(f"unsupported DPT activation {activation!r}")
        if conf_activation not in ("expp1", "expp0", "sigmoid"):
            raise ValueError(f"unsupported confidence activation {conf_activation!r}")
        self.patch_size = patch_size
        self.activation = activation
        self.conf_activation = conf_activation
        self.intermediate_layer_idx = tuple(intermediate_layer_idx)
        self.use_pos_embed = pos_embed
        self.feature_only = feature_only
        self.down_ratio = down_ratio
        self._position_embeddings: dict[tuple, tuple[Tensor, ...]] = {}  # by (H, W, device, dtype); not state
        oc = list(out_channels)

        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList([nn.Conv2d(dim_in, c, 1) for c in oc])
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(oc[0], oc[0], kernel_size=4, stride=4),
                nn.ConvTranspose2d(oc[1], oc[1], kernel_size=2, stride=2),
                nn.Identity(),
                nn.Conv2d(oc[3], oc[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        self.scratch = nn.Module()
        for i, c in enumerate(oc, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(c, features, 3, padding=1, bias=False))
        self.scratch.refinenet1 = FeatureFusionBlock(features)
        self.scratch.refinenet2 = FeatureFusionBlock(features)
        self.scratch.refinenet3 = FeatureFusionBlock(features)
        self.scratch.refinenet4 = FeatureFusionBlock(features, has_residual=False)
        if feature_only:
            self.scratch.output_conv1 = nn.Conv2d(features, features, 3, padding=1)
        else:
            self.scratch.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
            self.scratch.output_conv2 = nn.Sequential(
                nn.Conv2d(features // 2, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, output_dim, 1)
            )

    def _output_hw(self, ph: int, pw: int) -> tuple[int, int]:
        """Size of the upsampled output map for a patch grid of ph x pw."""
        return int(ph * self.patch_size / self.down_ratio), int(pw * self.patch_size / self.down_ratio)

    def position_embeddings(self, image_hw: tuple[int, int], device, dtype: torch.dtype) -> tuple[Tensor, ...]:
        """What is added to each of the four projected maps and to the upsampled output for frames
        of ``image_hw``: 0.1 x their sinusoidal embeddings, in the maps' order. They depend on the
        frame size alone, so they are made once per (size, device, dtype) and kept: made per call,
        their float64 sine and cosine over every output pixel cost ~2% of a vggt-1b step's GPU time."""
        key = (int(image_hw[0]), int(image_hw[1]), str(device), dtype)
        found = self._position_embeddings.get(key)
        if found is None:
            H, W = key[:2]
            ph, pw = H // self.patch_size, W // self.patch_size
            sizes = [(p.out_channels, ph, pw) for p in self.projects]
            sizes.append((self.scratch.output_conv1.out_channels, *self._output_hw(ph, pw)))
            found = tuple(0.1 * uv_position_embedding(h, w, c, W / H, device, dtype).to(dtype) for c, h, w in sizes)
            self._position_embeddings[key] = found
        return found

    def forward(
        self, layers: Sequence[Optional[Tensor]], image_hw: tuple[int, int], patch_start_idx: int, frames_chunk_size: int = 8
    ) -> tuple[Tensor, Tensor] | Tensor:
        """layers: aggregator outputs [B, S, P, dim_in] (only the intermediate indices are read).

        Returns (prediction [B, S, H, W, output_dim - 1], confidence [B, S, H, W]), or the
        feature map [B, S, C, H', W'] when feature_only.
        """
        first = layers[self.intermediate_layer_idx[0]]
        B, S = first.shape[:2]
        # Frames are independent here: flatten streams x frames and go through in chunks, which
        # bounds memory (and keeps interpolation outputs under INT_MAX elements) for big batches.
        flat = [None if t is None else t.reshape(B * S, 1, *t.shape[2:]) for t in layers]
        chunk = max(1, frames_chunk_size or B * S)
        parts = [self._forward_frames(flat, image_hw, patch_start_idx, s, min(s + chunk, B * S)) for s in range(0, B * S, chunk)]
        if self.feature_only:
            return torch.cat(parts, dim=0).reshape(B, S, *parts[0].shape[2:])
        pred = torch.cat([p[0] for p in parts], dim=0)
        conf = torch.cat([p[1] for p in parts], dim=0)
        return pred.reshape(B, S, *pred.shape[2:]), conf.reshape(B, S, *conf.shape[2:])

    def _forward_frames(self, layers, image_hw, patch_start_idx, start, end, pos_embeds=None):
        """Frames start..end of the flattened layers. ``pos_embeds``: ``position_embeddings``'s
        result, given by a caller that made it outside a compiled graph (else looked up here)."""
        H, W = image_hw
        ph, pw = H // self.patch_size, W // self.patch_size
        maps = []
        for i, layer in enumerate(self.intermediate_layer_idx):
            x = layers[layer][start:end, :, patch_start_idx:]  # [frames, 1, P, C]
            B, S = x.shape[:2]
            x = self.norm(x.reshape(B * S, -1, x.shape[-1]))
            x = x.permute(0, 2, 1).reshape(B * S, x.shape[-1], ph, pw)
            x = self.projects[i](x)
            if self.use_pos_embed:
                if pos_embeds is None:
                    pos_embeds = self.position_embeddings((H, W), x.device, x.dtype)
                x = x + pos_embeds[i]
            maps.append(self.resize_layers[i](x))

        s = self.scratch
        l1, l2, l3, l4 = s.layer1_rn(maps[0]), s.layer2_rn(maps[1]), s.layer3_rn(maps[2]), s.layer4_rn(maps[3])
        out = s.refinenet4(l4, size=l3.shape[2:])
        out = s.refinenet3(out, l3, size=l2.shape[2:])
        out = s.refinenet2(out, l2, size=l1.shape[2:])
        out = s.refinenet1(out, l1)
        out = s.output_conv1(out)
        out = F.interpolate(out, size=self._output_hw(ph, pw), mode="bilinear", align_corners=True)
        if self.use_pos_embed:
            out = out + pos_embeds[-1]
        if self.feature_only:
            return out.reshape(B, S, *out.shape[1:])
        out = s.output_conv2(out)
        pred, conf = activate_dense(out, self.activation, self.conf_activation)
        return pred.reshape(B, S, *pred.shape[1:]), conf.reshape(B, S, *conf.shape[1:])


def activate_dense(out: Tensor, activation: str, conf_activation: str) -> tuple[Tensor, Tensor]:
    """Split [N, C, H, W] into prediction [N, H, W, C-1] and confidence [N, H, W] and activate."""
    fmap = out.permute(0, 2, 3, 1)
    value, conf = fmap[..., :-1], fmap[..., -1]
    if activation == "exp":
        value = torch.exp(value)
    elif activation == "inv_log":
        value = torch.sign(value) * torch.expm1(value.abs())
    if conf_activation == "expp1":
        conf = 1 + conf.exp()
    elif conf_activation == "expp0":
        conf = conf.exp()
    else:
        conf = torch.sigmoid(conf)
    return value, conf
