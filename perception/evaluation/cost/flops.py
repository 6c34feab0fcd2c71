"""FLOPs (counted, context only: torch's counter plus the selective scan's own 9*B*L*D*N) and the
attention-matrix entries an explicit implementation would hold."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from perception.layers.attention import Attention
from perception.models.mamba_hybrid import MultiScanMamba
from perception.ops.scan import selective_scan

# -------------------------------------------------------------------------------- counts: FLOPs, entries


def scan_flops(model: nn.Module, tokens: int, batch: int) -> int:
    """FLOPs of every selective scan `model` runs on `batch` images of `tokens` tokens: 9*B*L*D*N each.

    Per step and channel a scan computes exp(dt*A), dt*B*x, h = dA*h + dBx and C.h over N states: about
    9 FLOPs per (b, l, d, n). Each Mamba mixer runs one scan per direction (two for Vim's bidirectional
    orders, four for the cross-scan), each over d_inner channels; the code stacks them into one grouped
    scan of D = directions * d_inner channels, the same count.
    0 for a model without Mamba blocks.
    """
    total = 0
    for m in model.modules():
        if isinstance(m, MultiScanMamba):
            total += 9 * batch * tokens * (m.num_directions * m.d_inner) * m.d_state
    return total


def _prefix_tokens(model: nn.Module) -> int:
    """Tokens attention sees besides the patches: ViT's class token (cls_token is (1, n, dim)), else 0."""
    cls = getattr(model, "cls_token", None)
    return int(cls.shape[1]) if isinstance(cls, torch.Tensor) else 0


def attention_entries(model: nn.Module, tokens: int) -> int:
    """Attention-matrix entries per image an explicit implementation materialises: sum of heads * S^2.

    S = tokens plus the class token where the model has one (ViT; MambaHybrid has none). 0 for pure Mamba.
    """
    seq = tokens + _prefix_tokens(model)
    return sum(m.heads * seq * seq for m in model.modules() if isinstance(m, Attention))


# FlopCounterMode (torch 2.13) has formulas for the CUDA SDPA kernels only; CPU dispatches
# F.scaled_dot_product_attention to this op, whose FLOPs it would silently drop: the quadratic term.
def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CUSTOM_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FlopCounterMode's total for one forward of `model` on `x` (CPU attention included)."""
    counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS)
    with torch.inference_mode(), counter:
        model(x)
    return int(counter.get_total_flops())


@functools.lru_cache(maxsize=64)
def _scan_flops_seen(backend: str, device: str, dtype: str, b: int, d: int, L: int, n: int, g: int) -> int:
    """FLOPs FlopCounterMode attributes to one selective scan of this shape, as `backend` runs it on
    `device`: chunked's output contraction (a bmm, 2*b*d*L*n); nothing for ref (elementwise ops only) or
    the native kernel (one opaque C call).

    Measured by running that scan on zeros of that shape, device and dtype, so the backend takes the path
    it takes in the model. (It once ran on meta tensors, where `native` hands over to `chunked`: the count
    then subtracted chunked's bmm, which the native path never adds: flops_total came out 1-3% low at dim
    192, depth 4.)
    """
    dev, dt = torch.device(device), getattr(torch, dtype)
    u = torch.zeros(b, d, L, device=dev, dtype=dt)
    A = -torch.ones(d, n, device=dev, dtype=dt)
    BC = torch.zeros(b, g, n, L, device=dev, dtype=dt)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        selective_scan(u, u, A, BC, BC, delta_softplus=True, backend=backend)
    return int(counter.get_total_flops())


def _counted_scan_flops(model: nn.Module, tokens: int, batch: int) -> int:
    """What the counter already saw of `scan_flops`, so flops_total does not count it twice."""
    total = 0
    for m in model.modules():
        if isinstance(m, MultiScanMamba):
            dtype = str(m.A_log.dtype).removeprefix("torch.")
            # One grouped scan: num_directions * d_inner channels, a B/C group per direction.
            shape = (batch, m.num_directions * m.d_inner, tokens, m.d_state, m.num_directions)
            total += _scan_flops_seen(m.scan_backend, str(m.A_log.device), dtype, *shape)
    return total


def model_flops(model: nn.Module, x: torch.Tensor, tokens: int) -> tuple[int, int, int]:
    """(counted, scan, total) FLOPs of one forward: the counter's total, our scan count, and
    counted - (what the counter saw of the scans) + scan."""
    counted = count_flops(model, x)
    scans = scan_flops(model, tokens, x.shape[0])
    seen = _counted_scan_flops(model, tokens, x.shape[0]) if scans else 0
    return counted, scans, counted - seen + scans
