"""Vision Transformer: patch tokens, a class token, a 2D position encoding, pre-norm blocks.

Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, https://arxiv.org/abs/2010.11929.

`pos_embed` picks how position reaches the model (claim 2 of the study compares them), all at the same
width and depth:
- "learned" (default): a table learned for the training grid (`image_size / patch_size` tokens per side),
  added to the tokens; at any other resolution resampled by 2D bicubic interpolation with the class slot
  kept apart, as the paper does for fine-tuning at higher resolution (the table stretches to the canvas).
- "learned_fixed": the same table, never resampled: the token at grid position (i, j) gets trained entry
  (i, j); positions the training grid lacks get the nearest trained entry (edge replication).
- "sincos": MAE's fixed 2D sin-cos table, computed for any grid; no parameters.
- "rope": 2D axial RoPE (RoPE-ViT) rotating q and k in every attention layer; nothing added to tokens;
  the class token is not rotated.
- "none": no position information; the model sees the patches as a set.
For "learned_fixed", "sincos" and "rope" a token's position is its integer (row, col) in the patch grid,
so a larger canvas at the same pixel scale keeps every old position and adds new ones.
Attention runs through `F.scaled_dot_product_attention`; `fused_attention=False` selects the explicit
reference (perception.layers.attention).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from perception.layers.attention import TransformerBlock
from perception.layers.patch_embed import PatchEmbed
from perception.layers.pos_embed import (
    extend_position_embedding,
    resample_position_embedding,
    sincos_position_embedding,
)
from perception.layers.rope import AxialRoPE
from perception.models.registry import check

POS_EMBEDS = ("learned", "learned_fixed", "sincos", "rope", "none")
LEARNED = ("learned", "learned_fixed")  # the variants with a trained table (the `pos_embed` parameter)


@dataclass(frozen=True)
class ViTConfig:
    num_classes: int = 8
    in_channels: int = 4  # depth + 3 normal channels
    patch_size: int = 8
    image_size: int = 32  # the training resolution; the learned position table has its grid
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    fused_attention: bool = True
    pos_embed: str = "learned"  # one of POS_EMBEDS; see the module doc

    def __post_init__(self) -> None:
        for key in ("num_classes", "in_channels", "patch_size", "dim", "depth", "heads"):
            check(
                isinstance(getattr(self, key), int) and getattr(self, key) >= 1, self, key, "an integer >= 1"
            )
        check(self.num_classes >= 2, self, "num_classes", "an integer >= 2")
        tiles = isinstance(self.image_size, int) and self.image_size % self.patch_size == 0
        check(
            tiles and self.image_size >= self.patch_size,
            self,
            "image_size",
            f"a multiple of patch_size = {self.patch_size}",
        )
        check(self.dim % self.heads == 0, self, "dim", f"a multiple of heads = {self.heads}")
        check(self.mlp_ratio > 0, self, "mlp_ratio", "a number > 0")
        check(self.pos_embed in POS_EMBEDS, self, "pos_embed", f"one of {', '.join(POS_EMBEDS)}")
        if self.pos_embed == "sincos":
            check(
                self.dim % 4 == 0,
                self,
                "pos_embed",
                f"'sincos' only with dim divisible by 4 (dim = {self.dim})",
            )
        if self.pos_embed == "rope":
            hs = self.dim // self.heads
            check(hs % 4 == 0, self, "pos_embed", f"'rope' only with dim / heads divisible by 4 (it is {hs})")

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side


@lru_cache(maxsize=64)
def fixed_sincos_table(
    grid: tuple[int, int], dim: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The sin-cos table (1, 1 + gh*gw, dim), computed once per grid, device and dtype: at batch 1 the ops
    that build it took 0.1 of a sin-cos ViT's 1.2 ms. Read-only; made outside inference mode, so a grid first
    seen by an evaluation can still be trained on."""
    with torch.inference_mode(False), torch.no_grad():
        return sincos_position_embedding(grid, dim, num_prefix=1, device=device).to(dtype)


# Named sizes. tiny: the CPU default. small: ViT-Ti / DeiT-Ti (dim 192, depth 12, 3 heads). base: DeiT-S.
SIZES: dict[str, dict] = {
    "tiny": {"dim": 64, "depth": 4, "heads": 4},
    "small": {"dim": 192, "depth": 12, "heads": 3},
    "base": {"dim": 384, "depth": 12, "heads": 6},
}


class ViT(nn.Module):
    """Input float32[B, C, H, W] (H, W multiples of patch_size), output logits [B, num_classes].

    `pos_embed` is the learned table (1, 1 + gh*gw, dim) for "learned" and "learned_fixed", else None;
    `rope` is the AxialRoPE for "rope", else None.
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config.in_channels, config.dim, config.patch_size)
        gh, gw = config.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        learned = config.pos_embed in LEARNED
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + gh * gw, config.dim)) if learned else None
        self.rope = (
            AxialRoPE(config.dim // config.heads, num_prefix=1) if config.pos_embed == "rope" else None
        )
        self.blocks = nn.ModuleList(
            TransformerBlock(config.dim, config.heads, config.mlp_ratio, config.fused_attention)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """What is added to the tokens (1, 1 + gh*gw, dim) on a token grid, or None ("rope", "none").

        "learned": the table, bicubic-resampled if the grid differs; "learned_fixed": the table at its own
        positions, edge-replicated beyond them; "sincos": the fixed table for this grid.
        """
        kind, trained = self.config.pos_embed, self.config.grid_size
        table = typing.cast(torch.Tensor, self.pos_embed)  # the learned kinds always have one
        if kind == "learned":
            return resample_position_embedding(table, trained, grid, num_prefix=1)
        if kind == "learned_fixed":
            return extend_position_embedding(table, trained, grid, num_prefix=1)
        if kind == "sincos":
            return fixed_sincos_table(
                tuple(grid), self.config.dim, self.cls_token.device, self.cls_token.dtype
            )
        return None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens, grid = self.patch_embed(x)  # (B, T, dim), T = gh * gw
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)  # (B, 1, dim)
        x = torch.cat([cls, tokens], dim=1)  # (B, 1 + T, dim)
        pos = self.position_embedding(grid)  # (1, 1 + T, dim) or None
        if pos is not None:
            x = x + pos
        rope = self.rope(grid, x.device) if self.rope is not None else None  # (cos, sin), each (1 + T, hs/2)
        for block in self.blocks:
            x = block(x, rope)
        return self.norm(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features[:, 0])  # the class token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
