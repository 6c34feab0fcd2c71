"""The native path (backend "native"): one fused C kernel per channel (`native_scan.c`), via ctypes.

One channel (batch b, channel d) at a time, its N states in one SIMD vector: time runs sequentially, the
states and channels in parallel (channels split across threads). Forward fuses bias, softplus, the scan,
D and the gate, and saves nothing but the inputs; backward recomputes the channel's states into a
per-thread buffer ((L + 1) N floats of h and L N of Ā: 0.5 MiB at L = 4096, N = 16, so it stays in L2)
and runs the adjoint backwards over it. exp, softplus and sigmoid are branch-free polynomials so the
compiler vectorises them (`perception/ops/fastmath.h`); exp's argument is clamped to [-87, 88] (exp(-87)
~ 1.6e-38 stands in for 0).

The kernel is compiled on first use with the machine's C compiler, per state size N, and cached in a folder
only this user can write; without a compiler the backend hands its work to `chunked` with a warning.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from perception.ops.native import FASTMATH, Kernel, pointer, run_parts
from perception.ops.scan.chunked import selective_scan_chunked
from perception.ops.scan.common import check_shapes

_i64, _i32, _ptr_t = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
_SIGNATURES = {
    "scan_fwd": [_i64, _i64, _i64, *[_ptr_t] * 8, _i32, _ptr_t, _i64, _i64],
    "scan_bwd": [_i64, _i64, _i64, *[_ptr_t] * 8, _i32, *[_ptr_t] * 9, _i64, _i64],
}
_kernels: dict[int, Kernel] = {}  # one per state size N, compiled in (NS)


def _kernel(n: int) -> Kernel:
    if n not in _kernels:
        source = Path(__file__).with_name("native_scan.c")
        headers = (FASTMATH,)
        _kernels[n] = Kernel(source, _SIGNATURES, "using 'chunked'", f"#define NS {n}\n", headers)
    return _kernels[n]


def _native_lib(n: int) -> ctypes.CDLL | None:
    """The kernel for N = n states, compiled once per machine (cached on disk), or None with no compiler."""
    return _kernel(n).library()


def native_available(n: int = 16) -> bool:
    """Whether the native kernel compiles and loads here (it needs a C compiler)."""
    return _kernel(n).available()


class _NativeScan(torch.autograd.Function):
    """out = (scan(softplus?(delta + bias)) + D u) * silu(z), all in one kernel. float32, contiguous;
    u, delta, z [b, d, l]; A [d, n]; B, C [b, g, l, n] (time-major per group); D, bias [d] or None."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, bias, softplus):
        b, d, L = u.shape
        g, n = B.shape[1], A.shape[1]
        lib = _native_lib(n)
        out = torch.empty_like(u)
        head = [ctypes.c_int64(d), ctypes.c_int64(L), ctypes.c_int64(g)]
        ins = [pointer(t) for t in (u, delta, A, B, C, D, z, bias)]
        run_parts(lib.scan_fwd, b * d, [*head, *ins, ctypes.c_int32(int(softplus)), pointer(out)])
        ctx.save_for_backward(u, delta, A, B, C, D, z, bias)
        ctx.softplus = softplus
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, gout):
        u, delta, A, B, C, D, z, bias = ctx.saved_tensors
        b, d, L = u.shape
        g, n = B.shape[1], A.shape[1]
        gout = gout.to(torch.float32).contiguous()
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dz = torch.empty_like(u) if z is not None else None
        dA, dD, dbias = u.new_empty(b * d, n), u.new_empty(b * d), u.new_empty(b * d)
        parts = max(1, min(torch.get_num_threads(), b * d))
        dBC = u.new_zeros(parts, 2, *B.shape)  # per-part dB, dC: channels of one group share B and C
        head = [ctypes.c_int64(d), ctypes.c_int64(L), ctypes.c_int64(g)]
        ins = [pointer(t) for t in (u, delta, A, B, C, D, z, bias)]
        args = [
            *head,
            *ins,
            ctypes.c_int32(int(ctx.softplus)),
            pointer(gout),
            pointer(du),
            pointer(ddelta),
            pointer(dA),
        ]

        def per_part(i: int) -> list:
            return [pointer(dBC[i, 0]), pointer(dBC[i, 1]), pointer(dD), pointer(dz), pointer(dbias)]

        run_parts(_native_lib(n).scan_bwd, b * d, args, per_part)
        dB, dC = dBC.sum(0).unbind(0)
        return (
            du,
            ddelta,
            dA.view(b, d, n).sum(0),
            dB,
            dC,
            None if D is None else dD.view(b, d).sum(0),
            dz,
            None if bias is None else dbias.view(b, d).sum(0),
            None,
        )


def selective_scan_native(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None = None, z: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:  # fmt: skip
    """The native fused kernel (backend "native"): same arguments and result as `selective_scan_ref`.

    Runs in float32 on CPU. float64 inputs (kept in double), other devices, or a machine without a C
    compiler go to `selective_scan_chunked` instead.
    """
    check_shapes(u, delta, A, B, C)
    if u.device.type != "cpu" or u.dtype == torch.float64 or _native_lib(A.shape[1]) is None:
        return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    f32 = [None if t is None else t.to(torch.float32).contiguous() for t in (u, delta, A, D, z, delta_bias)]
    u_, delta_, A_, D_, z_, bias_ = f32
    B_, C_ = ((M if M.dim() == 4 else M.unsqueeze(1)).to(torch.float32) for M in (B, C))
    B_, C_ = B_.transpose(2, 3).contiguous(), C_.transpose(2, 3).contiguous()  # [b, g, l, n]
    out = _NativeScan.apply(u_, delta_, A_, B_, C_, D_, z_, bias_, bool(delta_softplus))
    return out.to(u.dtype)
