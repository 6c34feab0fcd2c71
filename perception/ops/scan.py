"""The selective scan of Mamba (Gu & Dao 2023, arXiv 2312.00752, Algorithm 2), on CPU or any torch device.

`selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)` has the signature and meaning of
`selective_scan_ref` in state-spaces/mamba (`mamba_ssm/ops/selective_scan_interface.py`), for a real A and
input-dependent B, C. Per channel d and state n, with h_0 = 0:

    delta  <- softplus(delta + delta_bias)                  (each step optional)
    h_t    =  exp(delta_t * A) * h_{t-1}  +  delta_t * B_t * u_t
    y_t    =  <h_t, C_t>                                     (sum over the n states)
    out_t  =  (y_t + D * u_t) * silu(z_t)                    (D and z optional)

Glossary: code names, paper symbols, shapes (b batch, d channels, l length (L in code), n states, g groups)
    u           x      the input sequence                                   [b, d, l]
    delta       Δ      per-token, per-channel step size                     [b, d, l]
    A           A      diagonal state matrix (real, < 0 for a stable scan)  [d, n]
    B, C        B, C   input-dependent input/output maps                    [b, n, l] or [b, g, n, l]
                       (with g groups, channel d uses group d // (d_total / g), as in mamba_ssm)
    D           D      skip connection                                      [d]
    z           -      the Mamba block's gate branch                        [b, d, l]
    delta_bias  -      added to delta before the softplus                   [d]
    h           h      the hidden state                                     [b, d, n]
    dA          Ā      exp(Δ A): the discretised (zero-order hold) decay    [.., d, n]
    dBu         B̄ x    Δ B x: the discretised input (Mamba's simplified B̄)  [.., d, n]

Two paths, each taking the same arguments:
  - `selective_scan_ref`: the plain sequential reference, a Python loop over time with autograd.
  - `selective_scan_chunked`: the CPU fast path (backend "chunked"), a `torch.autograd.Function` whose
    forward is the same recurrence run without autograd and whose backward is the hand-written adjoint
    recurrence run backwards in time. It works on time chunks: each chunk's Ā and B̄x are built for that
    chunk only, and forward keeps just the state at each chunk start, so backward recomputes a chunk's
    states from there. Memory is O(b d l + b d n l / chunk) instead of the O(b d n l) tensors autograd
    would keep per step, and only exp of Δ A <= 0 appears, so nothing overflows (a cumsum/exp-of-cumsum
    form overflows with Mamba's A down to -16).
Beside them, two compiled backends: `native` (a C kernel compiled here, CPU) and `triton`
(perception/ops/scan_triton.py: Triton kernels for CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
`selective_scan(..., backend="auto")` dispatches by name through `SCAN_BACKENDS`: triton on CUDA, native
(else chunked) on CPU. Everything is computed in float32 (float64 stays
float64) and returned in the dtype of u.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# Target elements of one chunk tensor [chunk, b, d, n]: about 1 MiB of float32, so a chunk stays in cache.
_CHUNK_ELEMENTS = 1 << 18


# --------------------------------------------------------------------------------------- shared pre/post


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 when the input is float64 (so gradcheck can run in double)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_shapes(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> None:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be [b, d, l]; got {tuple(u.shape)} and {tuple(delta.shape)}")
    b, d, L = u.shape
    if A.dim() != 2 or A.shape[0] != d or A.is_complex():
        raise ValueError(f"A must be real [d={d}, n]; got {tuple(A.shape)} {A.dtype}")
    n = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        ok = M.dim() == 3 and M.shape == (b, n, L)
        ok = ok or (M.dim() == 4 and M.shape[0] == b and M.shape[2:] == (n, L) and d % M.shape[1] == 0)
        if not ok:
            raise ValueError(
                f"{name} must be [b, n, l] or [b, g, n, l] with g dividing d; got {tuple(M.shape)}"
            )


def _prepare(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> tuple[torch.Tensor, ...]:
    """Cast to the compute dtype, apply delta_bias and softplus, and give B, C a group axis [b, g, n, l]."""
    _check_shapes(u, delta, A, B, C)
    ct = _compute_dtype(u.dtype)
    u, delta, A, B, C = u.to(ct), delta.to(ct), A.to(ct), B.to(ct), C.to(ct)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]  # [b, d, l]
    if delta_softplus:
        delta = F.softplus(delta)
    B = B if B.dim() == 4 else B.unsqueeze(1)  # [b, g, n, l]
    C = C if C.dim() == 4 else C.unsqueeze(1)  # [b, g, n, l]
    return u, delta, A, B, C


def _finish(
    y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """out = (y + D u) * silu(z), each term optional, cast back to the input dtype. All [b, d, l]."""
    out = y if D is None else y + u * D.to(y.dtype)[:, None]
    if z is not None:
        out = out * F.silu(z.to(y.dtype))
    return out.to(dtype)


# ------------------------------------------------------------------------------- the sequential reference


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """The plain recurrence, one Python step per token, differentiated by autograd. Returns [b, d, l].

    Shapes are in the module glossary. Slow (autograd keeps every step), but obviously right: it is what
    the fast paths are tested against.
    """
    dtype_in = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    b, d, L = u.shape
    g, n = B.shape[1], A.shape[1]
    dA = torch.exp(delta[..., None] * A[:, None, :])  # [b, d, l, n]
    # Each channel reads its group's B: view d as (g, d/g).
    dBu = (delta * u).view(b, g, d // g, L, 1) * B.transpose(2, 3).unsqueeze(2)  # [b, g, d/g, l, n]
    dBu = dBu.reshape(b, d, L, n)  # [b, d, l, n]
    Cd = C.transpose(2, 3).unsqueeze(2).expand(b, g, d // g, L, n).reshape(b, d, L, n)  # [b, d, l, n]
    h = u.new_zeros(b, d, n)
    ys = []
    # unbind, not x[:, :, t]: indexing inside the loop made backward 150x slower here (one huge
    # index-backward per step, each zero-filling a full-size gradient).
    for dA_t, dBu_t, C_t in zip(dA.unbind(2), dBu.unbind(2), Cd.unbind(2), strict=True):
        h = dA_t * h + dBu_t  # [b, d, n]
        ys.append((h * C_t).sum(-1))  # [b, d]
    y = torch.stack(ys, dim=-1)  # [b, d, l]
    return _finish(y, u, D, z, dtype_in)


# ---------------------------------------------------------------- the fast path: chunks + adjoint backward


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
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk: int | None = None,
) -> torch.Tensor:
    """The fast path: same arguments and result as `selective_scan_ref`, [b, d, l].

    `chunk` (time steps per chunk) trades memory for nothing else; by default a chunk tensor
    [chunk, b, d, n] is about 1 MiB. Bias, softplus, D and the gate are plain autograd around the scan.
    """
    dtype_in = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    b, d, L = u.shape
    chunk = chunk or _chunk_length(b, d, A.shape[1], L)
    y = _ChunkedScan.apply(u, delta, A, B, C, chunk)  # [b, d, l]
    return _finish(y, u, D, z, dtype_in)


# ----------------------------------------------- the native path: one fused C kernel per channel, via ctypes

# One channel (batch b, channel d) at a time, its N states in one SIMD vector: time runs sequentially, the
# states and channels in parallel (channels split across threads). Forward fuses bias, softplus, the scan,
# D and the gate, and saves nothing but the inputs; backward recomputes the channel's states into a
# per-thread buffer ((L + 1) N floats of h and L N of Ā: 0.5 MiB at L = 4096, N = 16, so it stays in L2)
# and runs the adjoint backwards over it. exp, softplus and sigmoid are branch-free polynomials so the
# compiler vectorises them; exp's argument is clamped to [-87, 88] (exp(-87) ~ 1.6e-38 stands in for 0).
_NATIVE_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float fexp(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float k = __builtin_rintf(x * 1.4426950408889634f);
    float r = x - k * 0.693145751953125f - k * 1.428606765330187e-06f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666667e-1f + r * (4.1666668e-2f
              + r * (8.3333338e-3f + r * 1.3888889e-3f)))));
    int32_t bits = ((int32_t)k + 127) << 23;
    float s;
    memcpy(&s, &bits, 4);
    return p * s;
}
static inline float fsigmoid(float x) { return 1.0f / (1.0f + fexp(-x)); }
static inline float fsoftplus(float x) {  /* max(x, 0) + log1p(exp(-|x|)), log1p by the atanh series */
    float e = fexp(x < 0.0f ? x : -x), s = e / (2.0f + e), s2 = s * s;
    float l = 2.0f * s * (1.0f + s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9
              + s2 * (1.0f / 11 + s2 * (1.0f / 13)))))));
    return (x > 0.0f ? x : 0.0f) + l;
}

/* Shapes: u, delta, z, out, du, ddelta, dz [b, d, L]; A, dA [d or b*d, NS]; B, C, dB, dC [b, g, L, NS];
   D, bias, dD, dbias [d or b*d]. Channels c0..c1 of the b*d channels; D, z, bias may be NULL. */
static void delta_of(const float *dc, float bd, int32_t softplus, int64_t L, float *dt, float *sg) {
    for (int64_t t = 0; t < L; t++) {
        float x = dc[t] + bd;
        dt[t] = softplus ? fsoftplus(x) : x;
        if (sg) sg[t] = softplus ? fsigmoid(x) : 1.0f;
    }
}

void scan_fwd(int64_t d, int64_t L, int64_t g, const float *u, const float *delta, const float *A,
              const float *B, const float *C, const float *D, const float *z, const float *bias,
              int32_t softplus, float *out, int64_t c0, int64_t c1) {
    float *dt = malloc(sizeof(float) * L);
    for (int64_t c = c0; c < c1; c++) {
        const int64_t bi = c / d, di = c % d, gi = di / (d / g);
        const float *uc = u + c * L, *Bc = B + (bi * g + gi) * L * NS, *Cc = C + (bi * g + gi) * L * NS;
        float *oc = out + c * L, h[NS], a[NS];
        delta_of(delta + c * L, bias ? bias[di] : 0.0f, softplus, L, dt, NULL);
        for (int k = 0; k < NS; k++) { h[k] = 0.0f; a[k] = A[di * NS + k]; }
        for (int64_t t = 0; t < L; t++) {
            const float *Bt = Bc + t * NS, *Ct = Cc + t * NS, dtt = dt[t], du = dtt * uc[t];
            float y = 0.0f;
            for (int k = 0; k < NS; k++) {
                h[k] = fexp(dtt * a[k]) * h[k] + du * Bt[k];
                y += h[k] * Ct[k];
            }
            oc[t] = y;
        }
        const float Dd = D ? D[di] : 0.0f;
        for (int64_t t = 0; t < L; t++) oc[t] += Dd * uc[t];
        if (z) {
            const float *zc = z + c * L;
            for (int64_t t = 0; t < L; t++) oc[t] *= zc[t] * fsigmoid(zc[t]);
        }
    }
    free(dt);
}

void scan_bwd(int64_t d, int64_t L, int64_t g, const float *u, const float *delta, const float *A,
              const float *B, const float *C, const float *D, const float *z, const float *bias,
              int32_t softplus, const float *gout, float *du, float *ddelta, float *dA, float *dB, float *dC,
              float *dD, float *dz, float *dbias, int64_t c0, int64_t c1) {
    float *H = malloc(sizeof(float) * ((2 * L + 1) * NS + 4 * L));
    float *E = H + (L + 1) * NS, *dt = E + L * NS, *sg = dt + L, *y = sg + L, *gy = y + L;
    for (int64_t c = c0; c < c1; c++) {
        const int64_t bi = c / d, di = c % d, gi = di / (d / g);
        const float *uc = u + c * L, *Bc = B + (bi * g + gi) * L * NS, *Cc = C + (bi * g + gi) * L * NS;
        float *dBc = dB + (bi * g + gi) * L * NS, *dCc = dC + (bi * g + gi) * L * NS;
        const float *gc = gout + c * L, Dd = D ? D[di] : 0.0f;
        float a[NS], carry[NS], dAacc[NS];
        delta_of(delta + c * L, bias ? bias[di] : 0.0f, softplus, L, dt, sg);
        /* recompute the states: H row t + 1 is h_t, row 0 is h_{-1} = 0; E row t is exp(dt_t A) */
        for (int k = 0; k < NS; k++) {
            a[k] = A[di * NS + k];
            H[k] = carry[k] = dAacc[k] = 0.0f;
        }
        for (int64_t t = 0; t < L; t++) {
            const float *Bt = Bc + t * NS, *Ct = Cc + t * NS, *hp = H + t * NS;
            const float dtt = dt[t], dut = dtt * uc[t];
            float *ht = H + (t + 1) * NS, *et = E + t * NS, yt = 0.0f;
            for (int k = 0; k < NS; k++) {
                et[k] = fexp(dtt * a[k]);
                ht[k] = et[k] * hp[k] + dut * Bt[k];
                yt += ht[k] * Ct[k];
            }
            y[t] = yt;
        }
        /* out = (y + D u) * silu(z): gy = dout/dy, dz, dD */
        float dDacc = 0.0f;
        if (z) {
            const float *zc = z + c * L;
            float *dzc = dz + c * L;
            for (int64_t t = 0; t < L; t++) {
                const float s = fsigmoid(zc[t]), silu = zc[t] * s;
                gy[t] = gc[t] * silu;
                dzc[t] = gc[t] * (y[t] + Dd * uc[t]) * s * (1.0f + zc[t] * (1.0f - s));
            }
        } else {
            for (int64_t t = 0; t < L; t++) gy[t] = gc[t];
        }
        for (int64_t t = 0; t < L; t++) dDacc += gy[t] * uc[t];
        /* the adjoint, backwards: dh_t = gy_t C_t + exp(dt_{t+1} A) dh_{t+1} */
        float *duc = du + c * L, *ddc = ddelta + c * L, dbacc = 0.0f;
        for (int64_t t = L - 1; t >= 0; t--) {
            const float *Bt = Bc + t * NS, *Ct = Cc + t * NS, *ht = H + (t + 1) * NS, *hp = H + t * NS;
            const float *et = E + t * NS, gt = gy[t], dtt = dt[t], ut = uc[t], dut = dtt * ut;
            float *dBt = dBc + t * NS, *dCt = dCc + t * NS, q = 0.0f, r = 0.0f;
            for (int k = 0; k < NS; k++) {
                const float dh = gt * Ct[k] + carry[k], w = dh * hp[k] * et[k];
                dCt[k] += gt * ht[k];
                dBt[k] += dh * dut;
                q += dh * Bt[k];
                r += w * a[k];
                dAacc[k] += w * dtt;
                carry[k] = et[k] * dh;
            }
            duc[t] = q * dtt + gt * Dd;
            ddc[t] = (q * ut + r) * sg[t];
            dbacc += ddc[t];
        }
        for (int k = 0; k < NS; k++) dA[c * NS + k] = dAacc[k];
        dD[c] = dDacc;
        dbias[c] = dbacc;
    }
    free(H);
}
"""

_NATIVE_FLAGS = (
    "-O3", "-march=native", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math",
    "-fassociative-math", "-fno-signed-zeros", "-ffp-contract=fast",
)  # fmt: skip
_native_libs: dict[int, ctypes.CDLL | None] = {}
_native_error: str | None = None
_pool: ThreadPoolExecutor | None = None


def _native_lib(n: int) -> ctypes.CDLL | None:
    """The kernel for N = n states, compiled once per machine (cached on disk), or None with no compiler."""
    global _native_error
    if n in _native_libs:
        return _native_libs[n]
    lib = None
    try:
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise RuntimeError("no C compiler (cc or gcc) on PATH")
        flags = (*_NATIVE_FLAGS, f"-DNS={n}")
        # The key covers the source, flags and machine (-march=native code must not cross machines).
        key = "\n".join((_NATIVE_SOURCE, cc, *flags, platform.node(), platform.machine()))
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        # A cache only this user can write: a shared /tmp would let another account plant a library here.
        default = (
            Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "perception-study" / "scan"
        )
        cache = Path(os.environ.get("PERCEPTION_SCAN_CACHE") or default)
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        so = cache / f"scan_n{n}_{digest}.so"
        if not so.exists():
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                src, out = Path(tmp) / "scan.c", Path(tmp) / so.name
                src.write_text(_NATIVE_SOURCE)
                subprocess.run([cc, *flags, str(src), "-o", str(out)], check=True, capture_output=True)
                os.replace(out, so)  # atomic: concurrent processes never load a half-written library
        lib = ctypes.CDLL(str(so))
        i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
        lib.scan_fwd.argtypes = [i64, i64, i64, *[ptr] * 8, i32, ptr, i64, i64]
        lib.scan_bwd.argtypes = [i64, i64, i64, *[ptr] * 8, i32, *[ptr] * 9, i64, i64]
        for fn in (lib.scan_fwd, lib.scan_bwd):
            fn.restype = None
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        _native_error = f"{e} {detail.decode(errors='replace')[:500]}".strip()
        warnings.warn(f"native selective scan unavailable, using 'chunked': {_native_error}", stacklevel=3)
    _native_libs[n] = lib
    return lib


def native_available(n: int = 16) -> bool:
    """Whether the native kernel compiles and loads here (it needs a C compiler)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _native_lib(n) is not None


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if t is None else t.data_ptr())


def _run_channels(fn, channels: int, args: list, per_part: Callable[[int], list] = lambda i: []) -> int:
    """Run fn(*args, *per_part(i), c0, c1) over contiguous channel ranges, one per torch thread.

    ctypes drops the GIL during the call, so the parts run in parallel on a small thread pool.
    Returns the number of parts.
    """
    global _pool
    parts = max(1, min(torch.get_num_threads(), channels))
    bounds = [channels * i // parts for i in range(parts + 1)]
    calls = [(*args, *per_part(i), bounds[i], bounds[i + 1]) for i in range(parts)]
    if parts == 1:
        fn(*calls[0])
        return 1
    if _pool is None or _pool._max_workers < parts - 1:
        _pool = ThreadPoolExecutor(max_workers=max(parts - 1, os.cpu_count() or 1))
    futures = [_pool.submit(fn, *call) for call in calls[1:]]
    fn(*calls[0])
    for f in futures:
        f.result()
    return parts


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
        ins = [_ptr(t) for t in (u, delta, A, B, C, D, z, bias)]
        _run_channels(lib.scan_fwd, b * d, [*head, *ins, ctypes.c_int32(int(softplus)), _ptr(out)])
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
        ins = [_ptr(t) for t in (u, delta, A, B, C, D, z, bias)]
        args = [*head, *ins, ctypes.c_int32(int(ctx.softplus)), _ptr(gout), _ptr(du), _ptr(ddelta), _ptr(dA)]

        def per_part(i: int) -> list:
            return [_ptr(dBC[i, 0]), _ptr(dBC[i, 1]), _ptr(dD), _ptr(dz), _ptr(dbias)]

        _run_channels(_native_lib(n).scan_bwd, b * d, args, per_part)
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
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """The native fused kernel (backend "native"): same arguments and result as `selective_scan_ref`.

    Runs in float32 on CPU. float64 inputs (kept in double), other devices, or a machine without a C
    compiler go to `selective_scan_chunked` instead.
    """
    _check_shapes(u, delta, A, B, C)
    if u.device.type != "cpu" or u.dtype == torch.float64 or _native_lib(A.shape[1]) is None:
        return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    f32 = [None if t is None else t.to(torch.float32).contiguous() for t in (u, delta, A, D, z, delta_bias)]
    u_, delta_, A_, D_, z_, bias_ = f32
    B_, C_ = ((M if M.dim() == 4 else M.unsqueeze(1)).to(torch.float32) for M in (B, C))
    B_, C_ = B_.transpose(2, 3).contiguous(), C_.transpose(2, 3).contiguous()  # [b, g, l, n]
    out = _NativeScan.apply(u_, delta_, A_, B_, C_, D_, z_, bias_, bool(delta_softplus))
    return out.to(u.dtype)


# ------------------------------------------------------------------------------------------ dispatch


def triton_available() -> bool:
    """Whether the `triton` package imports (CUDA builds of torch ship it; the test extra pins it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """The Triton kernels (backend "triton", perception/ops/scan_triton.py): CUDA tensors, or CPU tensors
    under Triton's interpreter (TRITON_INTERPRET=1 set before the kernels' module is first imported)."""
    if not triton_available():
        raise RuntimeError(
            "scan backend 'triton' needs the triton package: a CUDA build of torch ships it, or "
            "pip install triton==3.7.1 (the version torch 2.13.0 pins)"
        )
    if u.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "scan backend 'triton' runs CPU tensors only under Triton's interpreter: set TRITON_INTERPRET=1 "
            "before perception.ops.scan_triton is imported, or use a CUDA tensor"
        )
    from perception.ops.scan_triton import selective_scan_triton as run

    return run(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


ScanFn = Callable[..., torch.Tensor]

# name -> implementation; every entry takes selective_scan_ref's arguments. "auto" is resolved below.
SCAN_BACKENDS: dict[str, ScanFn] = {
    "ref": selective_scan_ref,
    "chunked": selective_scan_chunked,
    "native": selective_scan_native,
    "triton": selective_scan_triton,
}
BACKEND_NAMES = ("auto", *SCAN_BACKENDS)


def resolve_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """The concrete backend `backend` means for tensors on `device`; "auto" is the fastest one available:
    triton on CUDA (when triton imports), native on CPU (when a C compiler is there), else chunked."""
    if backend == "auto" and torch.device(device).type == "cuda":
        # chunked on a GPU launches kernels per token: latency would measure that, not the architecture
        return "triton" if triton_available() else "chunked"
    if backend == "auto":
        # native is 4-7x faster than chunked on CPU (benchmarks/scan_profile.py); it needs a C compiler and
        # itself hands float64, non-CPU tensors and compiler-less machines to chunked.
        return "native" if native_available() else "chunked"
    if backend not in SCAN_BACKENDS:
        raise ValueError(f"scan backend {backend!r} is not one of {', '.join(BACKEND_NAMES)}")
    return backend


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Mamba's selective scan, [b, d, l]; arguments as in `selective_scan_ref`, run by `backend`."""
    scan = SCAN_BACKENDS[resolve_backend(backend, u.device)]
    return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
