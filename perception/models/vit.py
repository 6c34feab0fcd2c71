"""Vision Transformer: patch tokens, a class token, a learned 2D position embedding, pre-norm blocks.

Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, https://arxiv.org/abs/2010.11929.

The position embedding is learned for the training grid (`image_size / patch_size` tokens per side). At any
other resolution it is resampled by 2D bicubic interpolation with the class slot kept apart, as the paper
does for fine-tuning at higher resolution; this is the "help" that claim 2 of the study is about.
Attention runs through `F.scaled_dot_product_attention`; `fused_attention=False` selects the explicit
reference (perception.layers.attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from perception.layers.attention import TransformerBlock
from perception.layers.patch_embed import PatchEmbed
from perception.layers.pos_embed import resample_position_embedding
from perception.models.registry import check


@dataclass(frozen=True)
class ViTConfig:
    num_classes: int = 8
    in_channels: int = 4  # depth + 3 normal channels
    patch_size: int = 8
    image_size: int = 32  # the training resolution; the position grid is learned for it
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    fused_attention: bool = True

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

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side


# Named sizes. tiny: the CPU default. small: ViT-Ti / DeiT-Ti (dim 192, depth 12, 3 heads). base: DeiT-S.
SIZES: dict[str, dict] = {
    "tiny": {"dim": 64, "depth": 4, "heads": 4},
    "small": {"dim": 192, "depth": 12, "heads": 3},
    "base": {"dim": 384, "depth": 12, "heads": 6},
}


class ViT(nn.Module):
    """Input float32[B, C, H, W] (H, W multiples of patch_size), output logits [B, num_classes]."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config.in_channels, config.dim, config.patch_size)
        gh, gw = config.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + gh * gw, config.dim))
        self.blocks = nn.ModuleList(
            TransformerBlock(config.dim, config.heads, config.mlp_ratio, config.fused_attention)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1, 1 + gh*gw, dim) for a token grid: the learned one, bicubic-resampled if the grid differs."""
        return resample_position_embedding(self.pos_embed, self.config.grid_size, grid, num_prefix=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens, grid = self.patch_embed(x)  # (B, T, dim), T = gh * gw
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)  # (B, 1, dim)
        x = torch.cat([cls, tokens], dim=1) + self.position_embedding(grid)  # (B, 1 + T, dim)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features[:, 0])  # the class token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
