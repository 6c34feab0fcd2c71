"""Mamba's causal depthwise convolution and its SiLU, `silu(conv1d(x)[..., :L])`, in one C kernel.

Each channel of x [B, C, L] is convolved with its own K taps over the current and the K - 1 previous tokens
(zeros before the first), plus a bias, then SiLU. `nn.Conv1d` with `groups=C` runs this through oneDNN,
whose depthwise backward took 5.7 ms of a 6.3 ms forward-and-backward per layer at a training step's shape
([32, 256, 64]) on one core, and whose forward took 8 ms per layer on the evaluation's [64, 256, 256]. The C
kernel (`causal_conv.c`) computes each row's K shifted products with the time axis innermost, so the loops
vectorise; its backward recomputes the pre-activation rather than storing it, and returns the taps' and
bias's gradients per row for torch to sum over the batch.

`causal_conv1d_silu_ref` is the `nn.Conv1d` reference beside it, and the path for anything the kernel does
not take: other dtypes, other devices, a machine without a C compiler. Both agree
(tests/test_causal_conv.py).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from perception.ops.native import FASTMATH, Kernel, pointer, run_parts

_i64, _ptr_t = ctypes.c_int64, ctypes.c_void_p
KERNEL = Kernel(
    Path(__file__).with_name("causal_conv.c"),
    {
        "conv_silu_fwd": [_i64, _i64, _i64, *[_ptr_t] * 4, _i64, _i64],
        "conv_silu_bwd": [_i64, _i64, _i64, *[_ptr_t] * 7, _i64, _i64],
    },
    "using nn.Conv1d",
    headers=(FASTMATH,),
)


def fused_available() -> bool:
    """Whether the kernel compiles and loads here (it needs a C compiler)."""
    return KERNEL.available()


class _CausalConvSiLU(torch.autograd.Function):
    """float32 CPU, contiguous: x [B, C, L], weight [C, K], bias [C] or None -> [B, C, L]."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        batch, channels, length = x.shape
        out = torch.empty_like(x)
        head = [ctypes.c_int64(channels), ctypes.c_int64(length), ctypes.c_int64(weight.shape[1])]
        arrays = [pointer(t) for t in (x, weight, bias, out)]
        run_parts(KERNEL.loaded().conv_silu_fwd, batch * channels, [*head, *arrays])
        ctx.save_for_backward(x, weight, bias)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor):
        x, weight, bias = ctx.saved_tensors
        batch, channels, length = x.shape
        taps = weight.shape[1]
        grad_out = grad_out.to(torch.float32).contiguous()
        grad_x = torch.empty_like(x)
        grad_w = x.new_empty(batch * channels, taps)  # per row: summed over the batch below
        grad_b = x.new_empty(batch * channels)
        head = [ctypes.c_int64(channels), ctypes.c_int64(length), ctypes.c_int64(taps)]
        arrays = [pointer(t) for t in (x, weight, bias, grad_out, grad_x, grad_w, grad_b)]
        run_parts(KERNEL.loaded().conv_silu_bwd, batch * channels, [*head, *arrays])
        grad_bias = None if bias is None else grad_b.view(batch, channels).sum(0)
        return grad_x, grad_w.view(batch, channels, taps).sum(0), grad_bias


def causal_conv1d_silu_ref(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The reference: `nn.Conv1d(C, C, K, groups=C, padding=K - 1)` keeping the first L outputs, then SiLU.
    x [B, C, L], weight [C, 1, K] (the module's), bias [C] or None."""
    length, taps = x.shape[-1], weight.shape[-1]
    return F.silu(F.conv1d(x, weight, bias, padding=taps - 1, groups=x.shape[1])[..., :length])


def causal_conv1d_silu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`causal_conv1d_silu_ref`'s result, [B, C, L]: the C kernel for float32 CPU tensors where it is
    available, the reference for anything else."""
    fast = (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and x.numel() > 0
        and KERNEL.library() is not None
    )
    if not fast:
        return causal_conv1d_silu_ref(x, weight, bias)
    taps = weight.reshape(weight.shape[0], -1)  # [C, 1, K] -> [C, K], a view
    return _CausalConvSiLU.apply(
        x.contiguous(), taps.contiguous(), None if bias is None else bias.contiguous()
    )
