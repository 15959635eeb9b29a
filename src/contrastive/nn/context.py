"""A masked context network over a grid of latents: the context at row r sees rows 0..r only.

CPC on images (van den Oord et al. 2018, Sec. 3.3) summarises the patch latents above and on a row with an
autoregressive model and predicts the rows below from it; CPC v2 (Henaff et al. 2019, Appendix A.2) uses a
PixelCNN-style stack of residual blocks for it. Each block here mixes a row along itself (a 1x3 conv, zero
padded left and right) and then each position with the one above it (a 2x1 conv, zero padded above only), so
information flows down the grid and never up: after L blocks the context at row r depends on rows r-L..r.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RowCausalBlock(nn.Module):
    """1x1 conv to ``width``, ReLU, 1x3 conv along the row, ReLU, 2x1 conv over the row above and this one,
    ReLU, 1x1 conv back to ``dim``; added to the input, then ReLU. [B, dim, R, C] -> [B, dim, R, C]."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.down = nn.Conv2d(dim, width, 1)
        self.along_row = nn.Conv2d(width, width, (1, 3))
        self.from_above = nn.Conv2d(width, width, (2, 1))
        self.up = nn.Conv2d(width, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.down(x))
        h = F.relu(self.along_row(F.pad(h, (1, 1, 0, 0))))  # pad columns on both sides
        h = F.relu(self.from_above(F.pad(h, (0, 0, 1, 0))))  # pad one row above: output row r sees r-1, r
        return F.relu(x + self.up(h))


class RowCausalContext(nn.Module):
    """``blocks`` :class:`RowCausalBlock` in sequence: latents [B, dim, R, C] -> contexts [B, dim, R, C], where
    context row r is a function of latent rows <= r only."""

    def __init__(self, dim: int, width: int, blocks: int):
        super().__init__()
        self.blocks = nn.Sequential(*(RowCausalBlock(dim, width) for _ in range(blocks)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)
