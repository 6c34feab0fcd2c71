"""Resampling a learned 2D position embedding to another token grid (the ViT paper's fine-tuning recipe).

The grid part is reshaped to its 2D layout and resized by bicubic interpolation; prefix slots (the class
token's) are kept apart and passed through unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resample_position_embedding(
    pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], num_prefix: int = 1
) -> torch.Tensor:
    """(1, num_prefix + gh*gw, dim) -> (1, num_prefix + gh'*gw', dim).

    Returns the same tensor when the grid is unchanged.
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # (1, dim, gh, gw)
    # Interpolate in float32: bicubic on bf16/fp16 grids is not supported everywhere and loses precision.
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False).to(pos_embed.dtype)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)  # (1, gh'*gw', dim)
    return torch.cat([prefix, grid], dim=1)
