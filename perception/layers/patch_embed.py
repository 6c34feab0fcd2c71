"""Patch embedding: a strided convolution, one token per non-overlapping patch."""

from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """float32[B, C, H, W] -> tokens (B, H/p * W/p, dim) in row-major order, and the grid size (H/p, W/p)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        B, C, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        x = self.proj(x)  # (B, dim, H/p, W/p)
        grid = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), grid  # (B, H/p * W/p, dim)
