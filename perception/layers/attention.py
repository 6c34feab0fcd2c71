"""Multi-head self-attention and the pre-norm transformer block.

The fast path is `F.scaled_dot_product_attention` (a fused kernel on CPU and GPU); `explicit_attention` is
the slow reference that materialises the (T, T) attention matrix. `Attention(fused=False)` uses the
reference, and a test checks that both agree. `rope`, (cos, sin) from perception.layers.rope.AxialRoPE,
rotates q and k before either path; None leaves them as they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from perception.layers.rope import apply_rope

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (T, hs/2)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs)) v for q, k, v of shape (B, nh, T, hs); the reference for the fused kernel."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, nh, T, T)
    return scores.softmax(dim=-1) @ v  # (B, nh, T, hs)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, fused: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fused = fused

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, C // self.heads)  # (B, T, 3, nh, hs)
        if rope is not None:  # q and k rotated in one call, in the layout the Linear left them
            cos, sin = (t[:, None, None] for t in rope)  # each (T, 1, 1, hs/2)
            qk = apply_rope(qkv[:, :, :2], cos, sin)  # (B, T, 2, nh, hs)
            q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, T, hs) each
            v = qkv[:, :, 2].transpose(1, 2)  # (B, nh, T, hs)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, T, hs) each
        attend = F.scaled_dot_product_attention if self.fused else explicit_attention
        y = attend(q, k, v)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). Input and output (B, T, dim)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, fused: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, fused)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


def set_fused_attention(module: nn.Module, fused: bool) -> None:
    """Switch every Attention inside `module` between the fused kernel and the explicit reference."""
    for m in module.modules():
        if isinstance(m, Attention):
            m.fused = fused
