"""The max and the sum over each point's neighbours' feature rows: DGCNN's EdgeConv without its [B, N, k, C]
gather.

DGCNN's edge feature is `centre_i + neighbour_j` (the edge MLP's linear layer split in two), and its max over
the k neighbours is `centre_i + max_j neighbour_j` (float addition is monotonic, so this holds after
rounding too); BatchNorm's statistics need the sum over neighbours as well. Gathering `neighbour[sources]`
as [B, N, k, C] to reduce it, and scattering its gradient back, was most of a DGCNN step on CPU. The C kernel
(`neighbour_reduce.c`) reads each neighbour's row in place, and its backward sends the max's gradient to
the neighbours that reach it, shared among ties as `amax` shares it.

`neighbour_max_sum_ref` is the gather-then-reduce reference beside it, and the path for anything the
kernel does not take: float64, other devices, a machine without a C compiler. Both agree
(tests/test_neighbour_reduce.py).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from perception.ops.native import Kernel, pointer, run_parts

_i64, _ptr_t = ctypes.c_int64, ctypes.c_void_p
KERNEL = Kernel(
    Path(__file__).with_name("neighbour_reduce.c"),
    {
        "reduce_fwd": [_i64, _i64, *[_ptr_t] * 4, _i64, _i64],
        "reduce_bwd": [_i64, _i64, *[_ptr_t] * 6, _i64, _i64],
    },
    "using a gather",
)


def fused_available() -> bool:
    """Whether the kernel compiles and loads here (it needs a C compiler)."""
    return KERNEL.available()


class _NeighbourMaxSum(torch.autograd.Function):
    """float32 CPU: features [R, C], sources long[T, k] -> max and sum [T, C] over each target's rows."""

    @staticmethod
    def forward(ctx: Any, features: Tensor, sources: Tensor) -> tuple[Tensor, Tensor]:
        lib = KERNEL.loaded()
        features, sources = features.detach().contiguous(), sources.contiguous()
        if int(sources.min()) < 0 or int(sources.max()) >= features.shape[0]:  # the kernel does not check
            raise IndexError(f"sources must index the {features.shape[0]} rows of features")
        targets, k = sources.shape
        channels = features.shape[1]
        top, total = features.new_empty(targets, channels), features.new_empty(targets, channels)
        head = [ctypes.c_int64(channels), ctypes.c_int64(k)]
        run_parts(lib.reduce_fwd, targets, [*head, *map(pointer, (features, sources, top, total))])
        ctx.save_for_backward(features, sources, top)
        return top, total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_top: Tensor | None, grad_total: Tensor | None):
        lib = KERNEL.loaded()
        features, sources, top = ctx.saved_tensors
        targets, k = sources.shape
        grad = torch.zeros_like(features)
        grad_top = torch.zeros_like(top) if grad_top is None else grad_top.to(torch.float32).contiguous()
        grad_total = None if grad_total is None else grad_total.to(torch.float32).contiguous()
        head = [ctypes.c_int64(features.shape[1]), ctypes.c_int64(k)]
        arrays = [pointer(t) for t in (features, sources, top, grad_top, grad_total, grad)]
        # One thread: targets that share a neighbour add into its row.
        lib.reduce_bwd(*head, *arrays, 0, targets)
        return grad, None


class _GatheredMax(torch.autograd.Function):
    """[T, k, C] -> [T, C], the max over neighbours: `amax` forward (`max` with its indices took 10x as long
    on CPU), and a backward that sends each output's gradient to the neighbours that reach the max, shared
    among ties as `amax`'s own backward shares it (which took twice as long as this one)."""

    @staticmethod
    def forward(ctx: Any, gathered: Tensor) -> Tensor:
        top = gathered.amax(dim=1)  # [T, C]
        ctx.save_for_backward(gathered, top)
        return top

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        gathered, top = ctx.saved_tensors
        hits = (gathered == top[:, None, :]).to(grad.dtype)  # [T, k, C]; a bool sum would widen to int64
        return hits.mul_((grad / hits.sum(dim=1))[:, None, :])


def neighbour_max_sum_ref(features: Tensor, sources: Tensor) -> tuple[Tensor, Tensor]:
    """The reference: gather [T, k, C] = features[sources], then its max and sum over the k neighbours."""
    gathered = features[sources]  # [T, k, C]
    return _GatheredMax.apply(gathered), gathered.sum(dim=1)


def neighbour_max_sum(features: Tensor, sources: Tensor) -> tuple[Tensor, Tensor]:
    """max_j and sum_j of features[sources[t, j]], each [T, C], for features [R, C] and sources long[T, k]:
    the C kernel for float32 CPU tensors where it is available, the gather of `neighbour_max_sum_ref` for
    anything else."""
    fast = (
        features.device.type == "cpu"
        and features.dtype == torch.float32
        and sources.numel() > 0
        and KERNEL.library() is not None
    )
    if not fast:
        return neighbour_max_sum_ref(features, sources)
    return _NeighbourMaxSum.apply(features, sources)
