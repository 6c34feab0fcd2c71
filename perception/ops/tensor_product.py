"""A fused CPU kernel for e3nn's "uvu" tensor product with a weight per edge: the e3nn model's largest cost.

`e3nn.o3.TensorProduct` computes each path as small batched matrix products over the edges ([E, 5, 5] by
[E, 5, 8]...), which on a CPU spends its time on memory and dispatch, not arithmetic: the e3nn model's middle
convolution has 736 nonzero products per edge, yet took 87 ms per training step (forward and backward, 16384
edges, one thread). Written out, a "uvu" path is a short list of terms

    out[e, o] += c * w[e, wr] * x1[e, a] * x2[e, b]

with c the path's Clebsch-Gordan coefficient times e3nn's normalisation, and u only shifting a, o and wr.
`UVUTerms` reads that list off an e3nn TensorProduct (by probing it with one-hot inputs in float64, so it
follows e3nn's own conventions and normalisation, whatever they are), and `tensor_product` runs it in C
(`tensor_product.c`) with the edges as SIMD lanes: 29 ms for the same step. Forward and backward are the
same terms; the backward gives x1's, x2's and the weights' gradients.

A convolution then sums each target's messages. `tensor_product_sum` does that inside the kernel where the
edges come grouped by target, k each (the kNN graphs' layout): each chunk's messages go straight into their
targets' rows, in edge order as `index_add_` adds them, so the [E, D_out] messages are never written, nor
their gradient, which the sum's backward would otherwise copy out to every edge (23 MB a step in the middle
convolution, on a 2-core VM 10 ms of a 110 ms step). The sum is the same, bit for bit, as the kernel's
messages summed by `perception.ops.graphs.sum_by_target_ref`.

The e3nn module stays the reference and the fallback: float64 inputs (the invariance measurement), other
devices, or a machine without a C compiler run `tp(x1, x2, weight)` itself. Both agree to float32 rounding
(tests/test_tensor_product.py).
"""

from __future__ import annotations

import copy
import ctypes
import math
from pathlib import Path

import torch
from e3nn import o3
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from perception.ops.graphs import grouped_neighbours, sum_by_target
from perception.ops.native import Kernel, pointer, run_parts

CHUNK = 64  # edges per chunk in the kernel (its CHUNK): each thread's range starts at a multiple of it
_i64, _ptr_t = ctypes.c_int64, ctypes.c_void_p
KERNEL = Kernel(
    Path(__file__).with_name("tensor_product.c"),
    {
        "tp_fwd": [*[_i64] * 5, *[_ptr_t] * 5, *[_ptr_t] * 3, _i64, _ptr_t, _i64, _i64],
        "tp_bwd": [*[_i64] * 5, *[_ptr_t] * 5, *[_ptr_t] * 3, _i64, *[_ptr_t] * 4, _i64, _i64],
    },
    "using e3nn's tensor product",
)


def fused_available() -> bool:
    """Whether the fused kernel compiles and loads here (it needs a C compiler)."""
    return KERNEL.available()


class UVUTerms(nn.Module):
    """The terms of an e3nn `TensorProduct` whose every instruction is "uvu" with a weight per edge
    (`shared_weights=False`), as non-persistent buffers: a checkpoint's state_dict does not change.

    a, b, o, wr: int32[T], rows of x1, x2, the output and the weights; coef: float32[T]."""

    def __init__(self, tp: o3.TensorProduct) -> None:
        super().__init__()
        if tp.shared_weights or any(i.connection_mode != "uvu" or not i.has_weight for i in tp.instructions):
            raise ValueError("UVUTerms needs a TensorProduct of weighted 'uvu' paths with a weight per edge")
        probe = copy.deepcopy(tp).double()
        in1, in2, out = tp.irreps_in1.slices(), tp.irreps_in2.slices(), tp.irreps_out.slices()
        terms: list[tuple[int, int, int, int, float]] = []
        weight_offset = 0
        for ins in tp.instructions:
            mul, ir1 = tp.irreps_in1[ins.i_in1]
            dim1, dim2, dim3 = ir1.dim, tp.irreps_in2[ins.i_in2].ir.dim, tp.irreps_out[ins.i_out].ir.dim
            # The path at u = 0, by one-hot probes: row (i, j) holds x1's component i, x2's j, its weight.
            x1 = torch.zeros(dim1, dim2, tp.irreps_in1.dim, dtype=torch.float64)
            x2 = torch.zeros(dim1, dim2, tp.irreps_in2.dim, dtype=torch.float64)
            x1[range(dim1), :, [in1[ins.i_in1].start + i for i in range(dim1)]] = 1.0
            x2[:, range(dim2), [in2[ins.i_in2].start + j for j in range(dim2)]] = 1.0
            weight = torch.zeros(dim1 * dim2, tp.weight_numel, dtype=torch.float64)
            weight[:, weight_offset] = 1.0
            with torch.no_grad():
                probed = probe(x1.reshape(-1, x1.shape[-1]), x2.reshape(-1, x2.shape[-1]), weight)
            start = out[ins.i_out].start
            path = probed[:, start : start + dim3].reshape(dim1, dim2, dim3)  # [i, j, k] at u = 0
            for i, j, k in torch.nonzero(path.abs() > 1e-12).tolist():
                coef = float(path[i, j, k])
                terms += [
                    (in1[ins.i_in1].start + u * dim1 + i, in2[ins.i_in2].start + j,
                     start + u * dim3 + k, weight_offset + u, coef)
                    for u in range(mul)
                ]  # fmt: skip
            weight_offset += mul  # a "uvu" path has one weight per u
        if weight_offset != tp.weight_numel:
            raise ValueError(f"read {weight_offset} weights off a tensor product of {tp.weight_numel}")
        terms.sort(key=lambda term: (term[2], term[0]))  # by output row: each row's sum stays in cache
        columns = list(zip(*terms, strict=True)) if terms else [()] * 5
        for name, values in zip(("a", "b", "o", "wr"), columns[:4], strict=True):
            self.register_buffer(name, torch.tensor(values, dtype=torch.int32), persistent=False)
        self.register_buffer("coef", torch.tensor(columns[4], dtype=torch.float32), persistent=False)
        self.count = len(terms)
        widths = (tp.irreps_in1.dim, tp.irreps_in2.dim, tp.weight_numel, tp.irreps_out.dim)
        self.dims: tuple[int, int, int, int] = widths  # x1, x2, weight, out

    def arrays(self) -> list[Tensor]:
        """a, b, o, wr, coef: the kernels' term arrays, in their order."""
        return [self.get_buffer(name) for name in ("a", "b", "o", "wr", "coef")]

    def extra_repr(self) -> str:
        return f"terms={self.count}, dims (x1, x2, weight, out)={self.dims}"


class _FusedUVU(torch.autograd.Function):
    """float32 CPU tensors: x1 [E, D1], x2 [E, D2], weight [E, W] -> [E, D_out], or with k > 0 (edges grouped
    by target, k each) each target's sum of them, [E / k, D_out]."""

    @staticmethod
    def forward(ctx, terms: UVUTerms, x1: Tensor, x2: Tensor, weight: Tensor, k: int) -> Tensor:
        lib = KERNEL.loaded()
        x1, x2, weight = (t.detach().contiguous() for t in (x1, x2, weight))
        edges = x1.shape[0]
        out = x1.new_zeros(edges // k, terms.dims[3]) if k else x1.new_empty(edges, terms.dims[3])
        args = [*_head(terms), *map(pointer, (x1, x2, weight)), ctypes.c_int64(k), pointer(out)]
        run_parts(lib.tp_fwd, edges, args, align=_align(k))
        ctx.save_for_backward(x1, x2, weight)
        ctx.terms, ctx.k = terms, k
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, gout: Tensor):
        x1, x2, weight = ctx.saved_tensors
        lib = KERNEL.loaded()
        gout = gout.to(torch.float32).contiguous()  # [E, D_out], or [E / k, D_out]
        dx1, dweight = torch.empty_like(x1), torch.empty_like(weight)
        dx2 = torch.empty_like(x2) if ctx.needs_input_grad[2] else None
        args = [*_head(ctx.terms), *map(pointer, (x1, x2, weight)), ctypes.c_int64(ctx.k)]
        args += [*map(pointer, (gout, dx1, dx2, dweight))]
        run_parts(lib.tp_bwd, x1.shape[0], args, align=_align(ctx.k))
        return None, dx1, dx2, dweight, None


def _align(k: int) -> int:
    """Where a thread's range of edges may start: on a chunk, and (k > 0) not inside a target's k edges."""
    return math.lcm(CHUNK, k) if k else CHUNK


def _head(terms: UVUTerms) -> list:
    """The kernels' leading arguments: the four widths, the number of terms and the terms."""
    sizes = [ctypes.c_int64(n) for n in (*terms.dims, terms.count)]
    return [*sizes, *map(pointer, terms.arrays())]


def _fast(x1: Tensor, x2: Tensor, weight: Tensor) -> bool:
    """Whether the fused kernel takes these inputs: float32 CPU tensors, some edges, a compiled kernel."""
    return (
        x1.device.type == "cpu"
        and all(t.dtype == torch.float32 for t in (x1, x2, weight))
        and x1.shape[0] > 0
        and KERNEL.library() is not None
    )


def tensor_product(tp: o3.TensorProduct, terms: UVUTerms, x1: Tensor, x2: Tensor, weight: Tensor) -> Tensor:
    """tp(x1, x2, weight) for x1 [E, D1], x2 [E, D2], weight [E, W]: the fused kernel for float32 CPU tensors
    where it is available, e3nn's `tp` (the reference) for anything else."""
    if not _fast(x1, x2, weight):
        return tp(x1, x2, weight)
    return _FusedUVU.apply(terms, x1, x2, weight, 0)


def tensor_product_sum(
    tp: o3.TensorProduct, terms: UVUTerms, x1: Tensor, x2: Tensor, weight: Tensor, edge_dst: Tensor,
    num_targets: int,
) -> Tensor:  # fmt: skip
    """The sum of each target's messages tp(x1, x2, weight): float[num_targets, D_out], for x1 [E, D1],
    x2 [E, D2], weight [E, W] and edge_dst long[E]. The fused kernel sums inside itself where it would run
    `tensor_product` and the edges come grouped by target (`grouped_neighbours`); anything else is
    `tensor_product`, then `sum_by_target`."""
    k = grouped_neighbours(edge_dst, num_targets)
    if k and _fast(x1, x2, weight):
        return _FusedUVU.apply(terms, x1, x2, weight, k)
    return sum_by_target(tensor_product(tp, terms, x1, x2, weight), edge_dst, num_targets)
