"""2D axial rotary position embedding (RoPE) applied to attention's queries and keys.

Heo et al., "Rotary Position Embedding for Vision Transformer", ECCV 2024, https://arxiv.org/abs/2403.13298
(the "RoPE-Axial" variant), after RoFormer (Su et al. 2021, https://arxiv.org/abs/2104.09864).

A head's hs channels are taken in adjacent pairs (2i, 2i+1), and each pair is rotated as a point in the
plane: the first hs/4 pairs (the first half of the head) by row * w_i, the last hs/4 pairs (the second
half) by col * w_i, with w_i = theta^(-i / (hs/4)), i < hs/4. A token's position (row, col) is its integer
position in the patch grid, so a larger grid continues the same positions. Rotating q at position p and k
at position p' gives <R(p) q, R(p') k> = <q, R(p' - p) k>: attention scores see only the offset p' - p.
Prefix tokens (the class token) get angle 0, i.e. are not rotated, as in RoPE-ViT.
theta = 100 is RoPE-ViT's value for 2D axial frequencies (an image axis has tens of positions, not
thousands as text does).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn


def axial_rope_angles(
    rows: torch.Tensor, cols: torch.Tensor, head_dim: int, theta: float = 100.0
) -> torch.Tensor:
    """Angles (N, head_dim/2) by which the channel pairs of the tokens at (rows[t], cols[t]) rotate.

    rows, cols: (N,) integer grid positions (any integers: offsets and positions beyond a grid work).
    """
    if head_dim % 4:
        raise ValueError(f"2D axial RoPE needs a head dim divisible by 4; got {head_dim}")
    m = head_dim // 4
    freqs = theta ** -(torch.arange(m, dtype=torch.float32, device=rows.device) / m)  # (m,)
    return torch.cat([rows.float()[:, None] * freqs, cols.float()[:, None] * freqs], dim=1)  # (N, 2m)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs of x (..., S, hs) by the angles whose cos and sin are (S, hs/2); or of any
    x (..., hs) by cos and sin that broadcast against (..., hs/2), as attention's (B, T, 2, nh, hs) q and k
    against (T, 1, 1, hs/2).

    Each pair (x0, x1) is read as the complex number x0 + i x1 and multiplied by cos + i sin: one
    elementwise product, read in place from attention's strided q and k. `apply_rope_ref`'s four products
    of strided halves and a stack cost a RoPE ViT 7 ms of its 37 ms training step on one CPU thread (this
    way, 2 ms of 32; benchmarks/epoch.py, `--before rope`). Both compute x0 cos - x1 sin and
    x0 sin + x1 cos (tests/test_vit.py). torch has no complex bfloat16: other dtypes (autocast's) take
    the reference.
    """
    if x.dtype not in (torch.float32, torch.float64):
        return apply_rope_ref(x, cos, sin)
    pairs = x.unflatten(-1, (-1, 2))  # (..., S, hs/2, 2)
    if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(s % 2 for s in pairs.stride()[:-1]):
        # a complex view needs each pair adjacent and aligned to a pair; clone, as contiguous() would keep
        # an odd offset
        pairs = pairs.clone(memory_format=torch.contiguous_format)
    rotated = torch.view_as_complex(pairs) * torch.complex(cos, sin)  # (..., S, hs/2), complex
    return torch.view_as_real(rotated).flatten(-2).type_as(x)  # (..., S, hs)


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` on the two halves of each pair as real tensors: the reference it is tested against."""
    pairs = x.unflatten(-1, (-1, 2))  # (..., S, hs/2, 2)
    x0, x1 = pairs.unbind(-1)  # each (..., S, hs/2)
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)  # (..., S, hs/2, 2)
    return rotated.flatten(-2).type_as(x)  # (..., S, hs)


class AxialRoPE(nn.Module):
    """The rotations for a token grid: forward(grid) -> (cos, sin), each (num_prefix + gh*gw, head_dim/2),
    prefix rows first (angle 0), then the grid row-major. No parameters: defined at any grid size."""

    def __init__(self, head_dim: int, num_prefix: int = 1, theta: float = 100.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2D axial RoPE needs a head dim divisible by 4; got {head_dim}")
        self.head_dim, self.num_prefix, self.theta = head_dim, num_prefix, theta

    def forward(
        self, grid: tuple[int, int], device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return axial_rope_table(tuple(grid), self.head_dim, self.num_prefix, self.theta, device)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, num_prefix={self.num_prefix}, theta={self.theta}"


@lru_cache(maxsize=64)
def axial_rope_table(
    grid: tuple[int, int], head_dim: int, num_prefix: int, theta: float, device: torch.device | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`AxialRoPE`'s (cos, sin), each (num_prefix + gh*gw, head_dim/2), computed once per grid and device:
    at batch 1 the dozen small ops that build them took 0.05 of a RoPE ViT's 1.3 ms. Read-only; made
    outside inference mode, so a grid first seen by an evaluation can still be trained on."""
    with torch.inference_mode(False), torch.no_grad():
        rows, cols = torch.meshgrid(
            torch.arange(grid[0], device=device), torch.arange(grid[1], device=device), indexing="ij"
        )  # each (gh, gw)
        angles = axial_rope_angles(rows.flatten(), cols.flatten(), head_dim, theta)  # (gh*gw, hs/2)
        angles = torch.cat([angles.new_zeros(num_prefix, angles.shape[1]), angles])  # (S, hs/2)
        return angles.cos(), angles.sin()
