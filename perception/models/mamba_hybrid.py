"""A Mamba-hybrid image classifier: multi-direction Mamba blocks (Vim, VMamba), then a few attention blocks.

Read top to bottom: the multi-direction Mamba mixer, the block around it, the config and sizes, the model.
Shapes: B batch, L tokens, dim model width, d_inner = expand * dim, n = d_state, r = dt_rank,
k = scan directions (2: an order and its reverse; 4: cross-scan).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from perception.layers.attention import TransformerBlock
from perception.layers.patch_embed import PatchEmbed
from perception.models.registry import check
from perception.ops.causal_conv import causal_conv1d_silu
from perception.ops.scan import BACKEND_NAMES, selective_scan
from perception.ops.serialization import (
    SCAN_ORDERS,
    deserialize_mean,
    num_directions,
    scan_directions,
    serialize,
)


class MultiScanMamba(nn.Module):
    """Mamba mixer over k scan directions of the token grid: (B, L, dim) tokens in row-major order and
    paths LongTensor[k, L] (perception.ops.serialization.scan_directions) -> (B, L, dim).

    k = 2, paths [order, reversed order]: Vim's bidirectional mixer ("bimamba v2"). k = 4, paths
    [row-major, column-major, and both reversed]: VMamba's cross-scan (SS2D). in_proj splits each token
    into x and a gate z. Each direction has its own depthwise causal conv1d, x_proj (-> dt, B, C),
    dt_proj, A and D, as in Vim and VMamba, and reads the tokens in its own order. The k directions are
    stacked along the channel axis (direction j in channels [j*d_inner, (j+1)*d_inner)) and run as ONE
    grouped selective scan (B and C have a group per direction), which divides the scan's per-step
    overhead by k. Each direction's outputs go back to their grid positions and are averaged (Vim's
    `if_devide_out`), then gated by silu(z) and projected back to dim. The gate is applied once after
    the average: z is the same token in every direction, so this equals Vim's gating inside each scan.
    """

    def __init__(
        self,
        dim: int,
        d_state: int,
        d_conv: int,
        expand: int,
        scan_backend: str = "auto",
        directions: int = 2,
    ):
        super().__init__()
        self.d_inner = d_inner = expand * dim
        self.d_state = d_state
        self.dt_rank = dt_rank = math.ceil(dim / 16)  # Mamba's dt_rank="auto"
        self.num_directions = k = directions
        self.scan_backend = scan_backend
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        # Depthwise over k*d_inner channels = separate kernels per direction; padding d_conv-1 then
        # keeping the first L outputs makes it causal (along each direction's own sequence).
        self.conv1d = nn.Conv1d(k * d_inner, k * d_inner, d_conv, groups=k * d_inner, padding=d_conv - 1)
        # Per-direction projections, stacked on a leading direction axis k.
        self.x_proj = nn.Parameter(torch.empty(k, dt_rank + 2 * d_state, d_inner))  # (k, r+2n, d_inner)
        self.dt_proj = nn.Parameter(torch.empty(k, d_inner, dt_rank))  # (k, d_inner, r)
        self.dt_bias = nn.Parameter(torch.empty(k * d_inner))  # softplus^-1 of the initial step size
        self.A_log = nn.Parameter(torch.empty(k * d_inner, d_state))  # A = -exp(A_log) < 0: a stable scan
        self.D = nn.Parameter(torch.empty(k * d_inner))
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4) -> None:
        """Mamba's init: S4D-real A = -(1..n), D = 1, and dt log-uniform in [dt_min, dt_max]."""
        channels = self.num_directions * self.d_inner
        nn.init.uniform_(self.x_proj, -(self.d_inner**-0.5), self.d_inner**-0.5)  # as nn.Linear's init
        nn.init.uniform_(self.dt_proj, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
        log_dt = torch.rand(channels) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = log_dt.exp().clamp(min=dt_floor)  # (k*d_inner,)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1, so softplus(dt_bias) = dt
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32)  # (n,): the same for every channel
        self.A_log.copy_(torch.log(A).expand_as(self.A_log))
        self.D.fill_(1.0)

    def forward(self, x: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        k, d, n, r = self.num_directions, self.d_inner, self.d_state, self.dt_rank
        if paths.shape != (k, L):
            raise ValueError(f"paths must be [k={k}, L={L}] scan directions; got {tuple(paths.shape)}")
        x, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # each (B, d_inner, L), row-major
        x = serialize(x, paths)  # (B, k*d_inner, L): direction j's channels, in direction j's order
        x = causal_conv1d_silu(x, self.conv1d.weight, self.conv1d.bias)  # (B, k*d_inner, L)
        # Batched matmuls over (B, k) in the layout the scan reads: einsum permuted x to put L beside
        # d, a transposing copy forward and backward.
        x_dbl = torch.matmul(self.x_proj, x.view(B, k, d, L))  # (k, r+2n, d) @ (B, k, d, L): (B, k, r+2n, L)
        dt, Bs, Cs = x_dbl.split([r, n, n], dim=2)  # (B, k, r, L), (B, k, n, L), (B, k, n, L)
        # (k, d, r) @ (B, k, r, L): (B, k, d, L), viewed (B, k*d_inner, L)
        delta = torch.matmul(self.dt_proj, dt).view(B, k * d, L)
        y = selective_scan(
            x, delta, -torch.exp(self.A_log), Bs, Cs, self.D,
            delta_bias=self.dt_bias, delta_softplus=True, backend=self.scan_backend,
        )  # (B, k*d_inner, L)  # fmt: skip
        y = deserialize_mean(y, paths)  # (B, d_inner, L): each direction back at its tokens, averaged
        y = y * F.silu(z)  # (B, d_inner, L)
        return self.out_proj(y.transpose(1, 2))  # (B, L, dim)


class MambaBlock(nn.Module):
    """Pre-norm residual around the mixer, x + mixer(norm(x), paths); (B, L, dim). No MLP, as in Vim."""

    def __init__(
        self,
        dim: int,
        d_state: int,
        d_conv: int,
        expand: int,
        scan_backend: str = "auto",
        directions: int = 2,
    ):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mixer = MultiScanMamba(dim, d_state, d_conv, expand, scan_backend, directions)

    def forward(self, x: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x), paths)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class MambaHybridConfig:
    """MambaHybrid's hyperparameters; __post_init__ rejects any bad value with a one-line ModelConfigError."""

    num_classes: int = 8
    in_channels: int = 4
    patch_size: int = 8
    dim: int = 64  # model width
    depth: int = 4  # blocks in all: depth - attn_layers Mamba blocks, then attn_layers attention blocks
    attn_layers: int = 1  # 0 = pure Mamba
    heads: int = 2  # attention heads; validated even when attn_layers = 0
    # How the patch grid becomes sequences (perception.ops.serialization): rowmajor, snake, hilbert or
    # random, each scanned forward and backward; or cross, scanned row- and column-major, both ways.
    scan_order: str = "rowmajor"
    d_state: int = 16  # N, SSM state size per channel
    d_conv: int = 4  # causal conv1d kernel width
    expand: int = 2  # d_inner = expand * dim
    mlp_ratio: float = 4.0  # of the attention blocks
    scan_backend: str = "auto"  # selective scan implementation (perception.ops.scan.SCAN_BACKENDS)

    def __post_init__(self) -> None:
        for key in ("num_classes", "in_channels", "patch_size", "dim", "depth", "heads", "d_state", "d_conv"):
            check(_is_int(getattr(self, key)) and getattr(self, key) >= 1, self, key, "an integer >= 1")
        check(_is_int(self.expand) and self.expand >= 1, self, "expand", "an integer >= 1")
        at_ok = _is_int(self.attn_layers) and 0 <= self.attn_layers <= self.depth
        check(at_ok, self, "attn_layers", f"an integer from 0 to depth = {self.depth}")
        check(self.dim % self.heads == 0, self, "heads", f"a divisor of dim = {self.dim}")
        check(self.scan_order in SCAN_ORDERS, self, "scan_order", f"one of {', '.join(SCAN_ORDERS)}")
        mlp_ok = isinstance(self.mlp_ratio, (int, float)) and not isinstance(self.mlp_ratio, bool)
        check(mlp_ok and self.mlp_ratio > 0, self, "mlp_ratio", "a number > 0")
        check(self.scan_backend in BACKEND_NAMES, self, "scan_backend", f"one of {', '.join(BACKEND_NAMES)}")


SIZES: dict[str, dict] = {
    "tiny": {"dim": 64, "depth": 4, "attn_layers": 1, "heads": 2},  # the CPU default
    "small": {"dim": 192, "depth": 24, "attn_layers": 4, "heads": 3},  # Vim-Ti's width and depth
    "base": {"dim": 384, "depth": 24, "attn_layers": 4, "heads": 6},  # Vim-S's width and depth
}


@lru_cache(maxsize=64)
def _paths_on(scan_order: str, height: int, width: int, device: torch.device) -> torch.Tensor:
    """scan_directions on `device`, copied there once per grid: a copy from host memory in every forward
    would wait for the GPU each time and could not be captured in a CUDA graph. Read-only; made outside
    inference mode, so a grid first seen by an evaluation can still be trained on."""
    with torch.inference_mode(False):
        return scan_directions(scan_order, height, width).to(device)


class MambaHybrid(nn.Module):
    """Vision Mamba (Vim; Zhu et al. 2024, https://arxiv.org/abs/2401.09417) with MambaVision's layout.

    Patches -> tokens -> (depth - attn_layers) Mamba blocks, each scanning the tokens along the
    directions of `config.scan_order` (an order and its reverse, or cross-scan's four; recomputed for
    each grid) -> attn_layers TransformerBlocks for global context (last, as MambaVision, Hatamizadeh &
    Kautz 2024, https://arxiv.org/abs/2407.08083, places them) -> LayerNorm -> mean over tokens -> linear.
    No class token and no learned position embedding (position reaches the model only through the
    scan's order and the conv1d), and mean pooling ignores order, so the model runs at any resolution
    the patch size divides without resampling anything. The only 2D operation is the patch embedding
    (a conv with kernel = stride = patch size: per patch); with attn_layers = 0 it is pure Mamba.
    Input float32[B, in_channels, H, W]; output logits [B, num_classes].
    """

    def __init__(self, config: MambaHybridConfig):
        super().__init__()
        self.config = c = config
        self.patch_embed = PatchEmbed(c.in_channels, c.dim, c.patch_size)
        self.num_mamba = n_mamba = c.depth - c.attn_layers
        k = num_directions(c.scan_order)
        mamba = [MambaBlock(c.dim, c.d_state, c.d_conv, c.expand, c.scan_backend, k) for _ in range(n_mamba)]
        attn = [TransformerBlock(c.dim, c.heads, c.mlp_ratio) for _ in range(c.attn_layers)]
        self.blocks = nn.ModuleList([*mamba, *attn])
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.num_classes)
        with torch.no_grad():  # Mamba/Vim's prenorm rescale, so the residual stream does not grow with depth
            for block in mamba:
                block.mixer.out_proj.weight /= math.sqrt(c.depth)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """float32[B, C, H, W] -> normalised tokens (B, H/p * W/p, dim), back in row-major grid order."""
        x, (h, w) = self.patch_embed(x)  # (B, h*w, dim), row-major
        paths = _paths_on(self.config.scan_order, h, w, x.device)  # (k, h*w) position -> token
        for block in self.blocks[: self.num_mamba]:
            x = block(x, paths)  # (B, h*w, dim), row-major
        for block in self.blocks[self.num_mamba :]:
            x = block(x)  # (B, h*w, dim)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, L, dim) -> logits (B, num_classes): mean-pool, then the linear head."""
        return self.head(x.mean(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
