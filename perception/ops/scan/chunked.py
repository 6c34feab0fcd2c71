"""The CPU fast path in torch (backend "chunked"): the recurrence over time chunks, forward without autograd,
backward the hand-written adjoint recurrence run backwards in time; the reference is `reference.py`."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from perception.ops.scan.common import finish, prepare

# Target elements of one chunk tensor [chunk, b, d, n]: about 1 MiB of float32, so a chunk stays in cache.
_CHUNK_ELEMENTS = 1 << 18


def _chunk_length(b: int, d: int, n: int, L: int) -> int:
    return max(16, min(L, _CHUNK_ELEMENTS // max(1, b * d * n)))


def _chunk_inputs(
    uT: torch.Tensor, deltaT: torch.Tensor, A: torch.Tensor, BT: torch.Tensor, t0: int, t1: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ā and B̄x of steps t0..t1, time-major so each step is one contiguous [b, d, n] block.

    uT, deltaT: [l, b, d]; A: [d, n]; BT: [l, b, g, n]. Returns dA, dBu, each [t1 - t0, b, d, n].
    """
    T, b, d = uT[t0:t1].shape
    g, n = BT.shape[2], BT.shape[3]
    dA = torch.exp(deltaT[t0:t1, :, :, None] * A)  # [T, b, d, n]
    du = (deltaT[t0:t1] * uT[t0:t1]).view(T, b, g, d // g, 1)  # [T, b, g, d/g, 1]
    dBu = (du * BT[t0:t1, :, :, None, :]).view(T, b, d, n)  # [T, b, d, n]
    return dA, dBu


def _scan_inplace(dA: torch.Tensor, dBu: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Run h_t = Ā_t h_{t-1} + B̄x_t over a chunk, overwriting dBu [T, b, d, n] with the states h_t.

    One fused in-place kernel per step on pre-sliced views keeps Python overhead at its floor.
    Returns the last state [b, d, n] (a view into dBu).
    """
    for dA_t, h_t in zip(dA.unbind(0), dBu.unbind(0), strict=True):
        h = h_t.addcmul_(dA_t, h)
    return h


def _grouped(x: torch.Tensor, g: int) -> torch.Tensor:
    """[T, b, d, ...] -> [T*b, g, d/g, ...] so a per-group B or C meets its channels in one matmul."""
    T, b, d = x.shape[:3]
    return x.reshape(T * b, g, d // g, *x.shape[3:])  # [T*b, g, d/g, ...]


class _ChunkedScan(torch.autograd.Function):
    """y = scan(u, delta, A, B, C) with delta already biased/softplussed; y, u, delta [b, d, l]."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, chunk):
        b, d, L = u.shape
        g, n = B.shape[1], A.shape[1]
        uT, deltaT = u.permute(2, 0, 1).contiguous(), delta.permute(2, 0, 1).contiguous()  # [l, b, d]
        BT, CT = B.permute(3, 0, 1, 2).contiguous(), C.permute(3, 0, 1, 2).contiguous()  # [l, b, g, n]
        yT = u.new_empty(L, b, d)
        starts = range(0, L, chunk)
        h0s = u.new_empty(len(starts), b, d, n)  # the state entering each chunk: all backward needs
        h = u.new_zeros(b, d, n)
        for c, t0 in enumerate(starts):
            t1 = min(t0 + chunk, L)
            h0s[c] = h
            dA, hs = _chunk_inputs(uT, deltaT, A, BT, t0, t1)
            h = _scan_inplace(dA, hs, h)  # hs: [T, b, d, n]
            # y_t = sum_n h_t C_t, as one batched matmul per chunk.
            y = _grouped(hs, g) @ CT[t0:t1].reshape(-1, g, n, 1)  # [T*b, g, d/g, 1]
            yT[t0:t1] = y.view(t1 - t0, b, d)  # [T, b, d]
        ctx.save_for_backward(uT, deltaT, A, BT, CT, h0s)
        ctx.chunk = chunk
        return yT.permute(1, 2, 0).contiguous()  # [b, d, l]

    @staticmethod
    @once_differentiable  # the in-place adjoint is not itself differentiable: fail loudly on double backward
    def backward(ctx, gy):
        uT, deltaT, A, BT, CT, h0s = ctx.saved_tensors
        L, b, d = uT.shape
        g, n = BT.shape[2], BT.shape[3]
        gyT = gy.permute(2, 0, 1).contiguous()  # [l, b, d]
        du, ddelta = torch.empty_like(uT), torch.empty_like(uT)  # [l, b, d]
        dB, dC = torch.empty_like(BT), torch.empty_like(CT)  # [l, b, g, n]
        dA_param = torch.zeros_like(A)  # [d, n]
        # carry = Ā_{t+1} * dL/dh_{t+1}: the adjoint flowing into step t from the step after it.
        carry = uT.new_zeros(b, d, n)
        for c in reversed(range(h0s.shape[0])):
            t0 = c * ctx.chunk
            t1 = min(t0 + ctx.chunk, L)
            T = t1 - t0
            dA, hs = _chunk_inputs(uT, deltaT, A, BT, t0, t1)  # recompute the chunk's states from h0s[c]
            _scan_inplace(dA, hs, h0s[c])  # hs: [T, b, d, n]
            gy_c = gyT[t0:t1]  # [T, b, d]
            # dL/dC_t = sum_d gy_t h_t (per group).
            dC[t0:t1] = (gy_c.reshape(T * b, g, 1, d // g) @ _grouped(hs, g)).view(T, b, g, n)  # [T, b, g, n]
            # dL/dh_t = gy_t C_t + Ā_{t+1} dL/dh_{t+1}: the adjoint recurrence, backwards, in place.
            dh = (_grouped(gy_c[..., None], g) * CT[t0:t1].view(T * b, g, 1, n)).view(T, b, d, n)
            steps, decays = dh.unbind(0), dA.unbind(0)
            steps[-1].add_(carry)
            for i in range(T - 2, -1, -1):
                steps[i].addcmul_(steps[i + 1], decays[i + 1])
            carry = steps[0] * decays[0]
            # Through B̄x_t = Δ_t u_t B_t: q_t = sum_n dh_t B_t feeds u and Δ; dB sums dh over channels.
            q = (_grouped(dh, g) @ BT[t0:t1].reshape(T * b, g, n, 1)).view(T, b, d)  # [T, b, d]
            du[t0:t1] = q * deltaT[t0:t1]
            ddelta[t0:t1] = q * uT[t0:t1]
            du_c = (deltaT[t0:t1] * uT[t0:t1]).reshape(T * b, g, 1, d // g)  # [T*b, g, 1, d/g]
            dB[t0:t1] = (du_c @ _grouped(dh, g)).view(T, b, g, n)  # [T, b, g, n]
            # Through Ā_t = exp(Δ_t A): dL/d(Δ_t A) = dh_t * h_{t-1} * Ā_t (overwrites dA in place).
            dlogA = dA.mul_(dh)  # [T, b, d, n]
            dlogA[1:].mul_(hs[:-1])
            dlogA[0].mul_(h0s[c])
            ddelta[t0:t1] += (dlogA * A).sum(-1)  # [T, b, d]
            dA_param += torch.einsum("tbdn,tbd->dn", dlogA, deltaT[t0:t1])
        return (
            du.permute(1, 2, 0),  # [b, d, l]
            ddelta.permute(1, 2, 0),  # [b, d, l]
            dA_param,
            dB.permute(1, 2, 3, 0),  # [b, g, n, l]
            dC.permute(1, 2, 3, 0),  # [b, g, n, l]
            None,
        )


def selective_scan_chunked(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None = None, z: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False, chunk: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """The fast path: same arguments and result as `selective_scan_ref`, [b, d, l].

    `chunk` (time steps per chunk) trades memory for nothing else; by default a chunk tensor
    [chunk, b, d, n] is about 1 MiB. Bias, softplus, D and the gate are plain autograd around the scan.
    """
    dtype_in = u.dtype
    u, delta, A, B, C = prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    b, d, L = u.shape
    chunk = chunk or _chunk_length(b, d, A.shape[1], L)
    y = _ChunkedScan.apply(u, delta, A, B, C, chunk)  # [b, d, l]
    return finish(y, u, D, z, dtype_in)
