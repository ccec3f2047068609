"""2D rotary position embedding (RoPE) over the patch grid, and token positions.

The head dimension is split in half: the first half is rotated by the token's row (y), the second
by its column (x); each half uses the usual rotate-half form with frequencies base^(-2i/d).
There is no temporal position: a frame's keys do not depend on when the frame arrived, which is
why keys can be cached after RoPE and reused exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding2D(nn.Module):
    def __init__(self, frequency: float = 100.0):
        super().__init__()
        self.frequency = float(frequency)
        self._tables: dict[tuple, tuple[Tensor, Tensor]] = {}
        # The table length a positions tensor needs is read from the GPU (a host synchronisation).
        # The layers of a step share a few positions objects (frame and global attention), so the
        # length is read once per object; the objects are held so their identity cannot be reused.
        self._lengths: list[tuple[Tensor, int]] = []

    def _cos_sin(self, dim: int, length: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (dim, length, str(device), dtype)
        if key not in self._tables:
            inv_freq = 1.0 / (self.frequency ** (torch.arange(0, dim, 2, device=device).float() / dim))
            angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
            # Like the original, angles are cast to the working dtype before cos/sin.
            angles = torch.cat([angles, angles], dim=-1).to(dtype)
            self._tables[key] = (angles.cos(), angles.sin())
        return self._tables[key]

    def _table_length(self, positions: Tensor) -> int:
        for seen, length in self._lengths:
            if seen is positions:
                return length
        length = int(positions.max()) + 1
        self._lengths = [*self._lengths[-3:], (positions, length)]
        return length

    @staticmethod
    def _rotate_half(x: Tensor) -> Tensor:
        first, second = x.chunk(2, dim=-1)
        return torch.cat([-second, first], dim=-1)

    def _rotate(self, x: Tensor, pos: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        # pos: [B, N] -> tables [B, 1, N, dim] broadcast over heads
        c = cos[pos].unsqueeze(1)
        s = sin[pos].unsqueeze(1)
        return x * c + self._rotate_half(x) * s

    def tables(self, positions: Tensor, dim: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin [length, dim] covering every position in ``positions`` (what ``forward`` uses for
        each half of a head of 2 * dim)."""
        return self._cos_sin(dim, self._table_length(positions), device, dtype)

    def forward(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """tokens [B, heads, N, head_dim]; positions [B, N, 2] integer (y, x)."""
        half = tokens.shape[-1] // 2
        cos, sin = self.tables(positions, half, tokens.device, tokens.dtype)
        y_part, x_part = tokens.chunk(2, dim=-1)
        return torch.cat(
            [self._rotate(y_part, positions[..., 0], cos, sin), self._rotate(x_part, positions[..., 1], cos, sin)],
            dim=-1,
        )


def frame_token_positions(grid_h: int, grid_w: int, num_special: int, device: torch.device | str = "cpu") -> Tensor:
    """Positions [num_special + grid_h * grid_w, 2] of one frame's tokens.

    Special tokens (camera, registers) sit at (0, 0); patch (y, x) sits at (y + 1, x + 1), so no
    patch shares a position with the special tokens.
    """
    ys = torch.arange(grid_h, device=device)
    xs = torch.arange(grid_w, device=device)
    patches = torch.cartesian_prod(ys, xs) + 1
    special = torch.zeros(num_special, 2, dtype=patches.dtype, device=device)
    return torch.cat([special, patches], dim=0)
