"""Additive 2D position embeddings of a token grid, and carrying a learned one to another grid.

- `resample_position_embedding` (ViT "learned"): the ViT paper's fine-tuning recipe; the grid part is
  reshaped to its 2D layout and resized by bicubic interpolation, so the table stretches over the canvas.
- `extend_position_embedding` ("learned_fixed"): no resampling; each trained entry stays at its own grid
  position and positions the training grid lacks get the nearest trained entry.
- `sincos_position_embedding` ("sincos"): MAE's fixed 2D sin-cos table, computed for any grid.
Prefix slots (the class token's) are kept apart: passed through unchanged, or zeros for sin-cos.
Tables are (1, num_prefix + gh*gw, dim), the grid part row-major.
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


def extend_position_embedding(
    pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], num_prefix: int = 1
) -> torch.Tensor:
    """(1, num_prefix + gh*gw, dim) -> (1, num_prefix + gh'*gw', dim) without resampling ("learned_fixed").

    The token at grid position (i, j) gets the trained entry (i, j) wherever the training grid has one
    (a smaller grid is the top-left crop). Positions outside the training grid get the nearest trained
    entry (edge replication, clamping i and j to the trained range). Replication rather than zeros: every
    token then carries a vector the model was trained on, so the test isolates "this position was never
    trained" from "this embedding is out of distribution"; a zero vector was never seen in training.
    Returns the same tensor when the grid is unchanged.
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    dim = grid.shape[-1]
    grid = grid.reshape(old_grid[0], old_grid[1], dim)  # (gh, gw, dim)
    rows = torch.arange(new_grid[0], device=grid.device).clamp(max=old_grid[0] - 1)  # (gh',) nearest row
    cols = torch.arange(new_grid[1], device=grid.device).clamp(max=old_grid[1] - 1)  # (gw',)
    grid = grid[rows][:, cols].reshape(1, new_grid[0] * new_grid[1], dim)  # (1, gh'*gw', dim)
    return torch.cat([prefix, grid], dim=1)


def sincos_position_embedding(
    grid: tuple[int, int],
    dim: int,
    num_prefix: int = 1,
    temperature: float = 10000.0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Fixed 2D sin-cos embedding (MAE; He et al. 2022, https://arxiv.org/abs/2111.06377), (1, num_prefix +
    gh*gw, dim) float32 on `device`, for any grid; prefix slots get zeros, as in MAE.

    A token's position is its integer (row, col) in the patch grid, so a larger grid continues the same
    positions. The first dim/2 channels encode the row, the last dim/2 the column, each as
    [sin(p * w_0..w_{m-1}), cos(p * w_0..w_{m-1})] with m = dim/4 and w_i = temperature^(-i/m).
    """
    if dim % 4:
        raise ValueError(f"a 2D sin-cos embedding needs dim divisible by 4; got {dim}")
    m = dim // 4
    omega = temperature ** -(torch.arange(m, dtype=torch.float32, device=device) / m)  # (m,)
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float32, device=device),
        torch.arange(grid[1], dtype=torch.float32, device=device),
        indexing="ij",
    )  # each (gh, gw)
    parts = []
    for p in (rows.flatten(), cols.flatten()):  # (gh*gw,) each
        angle = p[:, None] * omega[None]  # (gh*gw, m)
        parts += [angle.sin(), angle.cos()]
    table = torch.cat(parts, dim=1)  # (gh*gw, dim)
    table = torch.cat([table.new_zeros(num_prefix, dim), table])  # (num_prefix + gh*gw, dim)
    return table.unsqueeze(0)  # (1, num_prefix + gh*gw, dim)
