"""The selective scan as Triton kernels (backend "triton"): CUDA tensors natively, CPU tensors under
Triton's interpreter (`TRITON_INTERPRET=1`, which must be set before this module is imported).

Same arguments and result as `perception.ops.scan.selective_scan_ref`; the glossary and shapes are in the
package's docstring (b batch, d channels, l length, n states, g groups). Two kernels:

- `_scan_fwd`: one program per (batch, block of BLOCK_D channels). The state h [BLOCK_D, n] lives in
  registers and runs over time; y_t = <h_t, C_t> is written per step, and h is saved at the start of every
  chunk of CHUNK steps (`chunk_states` [b, d, l / CHUNK, n]).
- `_scan_bwd`: the same programs walk the chunks from last to first. Each chunk's states are recomputed
  from its saved start into a scratch buffer of one chunk ([CHUNK, BLOCK_D, n] per program), then the
  adjoint recurrence runs back through it:
      G_t = dL/dh_t = gy_t C_t + exp(Δ_{t+1} A) G_{t+1}
      dΔ_t += <G_t, u_t B_t> + <G_t, h_{t-1} exp(Δ_t A) A>,   du_t = Δ_t <G_t, B_t>
      dA  += G_t h_{t-1} exp(Δ_t A) Δ_t,   dB_t += Σ_d G_t Δ_t u_t,   dC_t += Σ_d gy_t h_t
  so nothing of size [b, d, l, n] is ever stored. dB, dC and dA sum over channels or batches of several
  programs: atomic adds.

Everything runs in float32 (bf16 inputs are cast, state and sums stay fp32) and the result comes back in
u's dtype. delta_bias, softplus, D and the z gate are applied around the kernel in torch (`prepare`,
`finish`), whose autograd differentiates them. B and C go to the kernels time-major, [b, g, l, n], so a
step's n values are contiguous. A block of channels never straddles two groups (BLOCK_D divides d / g).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from perception.ops.scan.common import finish, prepare

CHUNK = 64  # steps whose states backward recomputes at a time: scratch is [CHUNK, BLOCK_D, n] per program


@triton.jit
def _scan_fwd(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, y_ptr, hs_ptr,  # u, delta, y [b, d, l]; A [d, n]; B, C [b,g,l,n]
    D_TOTAL, L, G, N, NUM_CHUNKS,  # hs [b, d, NUM_CHUNKS, N_PAD]: the state before each chunk
    N_PAD: tl.constexpr, CHUNK_LEN: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_b, pid_d = tl.program_id(0), tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    offs_n = tl.arange(0, N_PAD)  # [N_PAD]
    mask_d = offs_d < D_TOTAL
    mask_dn = mask_d[:, None] & (offs_n < N)[None, :]  # [BLOCK_D, N_PAD]
    group = (pid_d * BLOCK_D) // (D_TOTAL // G)  # one group per block
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0)  # [BLOCK_D, N_PAD]
    row = (pid_b * D_TOTAL + offs_d) * L  # [BLOCK_D]: start of each channel's sequence
    bc = (pid_b * G + group) * L * N  # start of this group's [l, n] block of B and C
    hs_row = ((pid_b * D_TOTAL + offs_d) * NUM_CHUNKS)[:, None] * N_PAD + offs_n[None, :]  # [BLOCK_D, N_PAD]
    h = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)
    for t in range(L):
        if t % CHUNK_LEN == 0:
            tl.store(hs_ptr + hs_row + (t // CHUNK_LEN) * N_PAD, h, mask=mask_dn)
        u_t = tl.load(u_ptr + row + t, mask=mask_d, other=0.0)  # [BLOCK_D]
        dt_t = tl.load(delta_ptr + row + t, mask=mask_d, other=0.0)  # [BLOCK_D]
        B_t = tl.load(B_ptr + bc + t * N + offs_n, mask=offs_n < N, other=0.0)  # [N_PAD]
        C_t = tl.load(C_ptr + bc + t * N + offs_n, mask=offs_n < N, other=0.0)  # [N_PAD]
        h = tl.exp(dt_t[:, None] * A) * h + (dt_t * u_t)[:, None] * B_t[None, :]  # [BLOCK_D, N_PAD]
        tl.store(y_ptr + row + t, tl.sum(h * C_t[None, :], axis=1), mask=mask_d)


@triton.jit
def _scan_bwd(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, gy_ptr, hs_ptr, scratch_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr,  # du, ddelta [b, d, l]; dA [d, n]; dB, dC [b, g, l, n]
    D_TOTAL, L, G, N, NUM_CHUNKS,
    N_PAD: tl.constexpr, CHUNK_LEN: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_b, pid_d = tl.program_id(0), tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, N_PAD)
    mask_d = offs_d < D_TOTAL
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    group = (pid_d * BLOCK_D) // (D_TOTAL // G)
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0)
    row = (pid_b * D_TOTAL + offs_d) * L
    bc = (pid_b * G + group) * L * N
    hs_row = ((pid_b * D_TOTAL + offs_d) * NUM_CHUNKS)[:, None] * N_PAD + offs_n[None, :]
    # This program's scratch: [CHUNK_LEN, BLOCK_D, N_PAD], one recomputed chunk of states.
    program = pid_b * tl.num_programs(1) + pid_d
    tile = tl.arange(0, BLOCK_D)[:, None] * N_PAD + offs_n[None, :]  # [BLOCK_D, N_PAD]
    scratch = scratch_ptr + program * CHUNK_LEN * BLOCK_D * N_PAD + tile
    carried = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)  # exp(Δ_{t+1} A) G_{t+1}
    dA_acc = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)
    for back in range(NUM_CHUNKS):
        chunk = NUM_CHUNKS - 1 - back
        start = chunk * CHUNK_LEN
        h = tl.load(hs_ptr + hs_row + chunk * N_PAD, mask=mask_dn, other=0.0)
        for i in range(CHUNK_LEN):  # recompute the chunk's states h_start .. h_{start+CHUNK-1}
            t = start + i
            if t < L:
                u_t = tl.load(u_ptr + row + t, mask=mask_d, other=0.0)
                dt_t = tl.load(delta_ptr + row + t, mask=mask_d, other=0.0)
                B_t = tl.load(B_ptr + bc + t * N + offs_n, mask=mask_n, other=0.0)
                h = tl.exp(dt_t[:, None] * A) * h + (dt_t * u_t)[:, None] * B_t[None, :]
                tl.store(scratch + i * BLOCK_D * N_PAD, h)
        for j in range(CHUNK_LEN):  # the adjoint, back through the chunk
            i = CHUNK_LEN - 1 - j
            t = start + i
            if t < L:
                h_t = tl.load(scratch + i * BLOCK_D * N_PAD)
                if i > 0:
                    h_prev = tl.load(scratch + (i - 1) * BLOCK_D * N_PAD)
                else:
                    h_prev = tl.load(hs_ptr + hs_row + chunk * N_PAD, mask=mask_dn, other=0.0)
                u_t = tl.load(u_ptr + row + t, mask=mask_d, other=0.0)
                dt_t = tl.load(delta_ptr + row + t, mask=mask_d, other=0.0)
                gy_t = tl.load(gy_ptr + row + t, mask=mask_d, other=0.0)
                B_t = tl.load(B_ptr + bc + t * N + offs_n, mask=mask_n, other=0.0)
                C_t = tl.load(C_ptr + bc + t * N + offs_n, mask=mask_n, other=0.0)
                dA_t = tl.exp(dt_t[:, None] * A)  # [BLOCK_D, N_PAD]
                G_t = carried + gy_t[:, None] * C_t[None, :]  # dL/dh_t
                tl.atomic_add(dC_ptr + bc + t * N + offs_n, tl.sum(gy_t[:, None] * h_t, axis=0), mask=mask_n)
                GB = tl.sum(G_t * B_t[None, :], axis=1)  # [BLOCK_D]: <G_t, B_t>
                decay = G_t * h_prev * dA_t  # [BLOCK_D, N_PAD]: dL/d(Δ_t A) per state
                tl.store(du_ptr + row + t, dt_t * GB, mask=mask_d)
                tl.store(ddelta_ptr + row + t, u_t * GB + tl.sum(decay * A, axis=1), mask=mask_d)
                dB_t = tl.sum(G_t * (dt_t * u_t)[:, None], axis=0)  # [N_PAD]
                tl.atomic_add(dB_ptr + bc + t * N + offs_n, dB_t, mask=mask_n)
                dA_acc += decay * dt_t[:, None]
                carried = G_t * dA_t
    tl.atomic_add(dA_ptr + offs_d[:, None] * N + offs_n[None, :], dA_acc, mask=mask_dn)


def _block_d(d: int, g: int) -> int:
    """The largest power of two up to 64 that divides d / g, so a block of channels shares one group."""
    per_group, block = d // g, 1
    while block < 64 and per_group % (block * 2) == 0:
        block *= 2
    return block


class _TritonScan(torch.autograd.Function):
    """y = <h_t, C_t> of the recurrence; fp32 contiguous u, delta [b,d,l], A [d,n], B, C [b,g,l,n]."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, chunk):
        b, d, L = u.shape
        g, n = B.shape[1], A.shape[1]
        n_pad, block_d = triton.next_power_of_2(n), _block_d(d, g)
        num_chunks = triton.cdiv(L, chunk)
        y = torch.empty_like(u)
        chunk_states = u.new_empty(b, d, num_chunks, n_pad)  # the state before each chunk
        grid = (b, triton.cdiv(d, block_d))
        _scan_fwd[grid](u, delta, A, B, C, y, chunk_states, d, L, g, n, num_chunks, n_pad, chunk, block_d)
        ctx.save_for_backward(u, delta, A, B, C, chunk_states)
        ctx.meta = (chunk, n_pad, block_d, num_chunks)
        return y

    @staticmethod
    def backward(ctx, gy):
        u, delta, A, B, C, chunk_states = ctx.saved_tensors
        chunk, n_pad, block_d, num_chunks = ctx.meta
        b, d, L = u.shape
        g, n = B.shape[1], A.shape[1]
        grid = (b, triton.cdiv(d, block_d))
        scratch = u.new_empty(grid[0] * grid[1], chunk, block_d, n_pad)  # one chunk of states per program
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dA = torch.zeros_like(A)
        dB, dC = torch.zeros_like(B), torch.zeros_like(C)
        _scan_bwd[grid](
            u, delta, A, B, C, gy.float().contiguous(), chunk_states, scratch, du, ddelta, dA, dB, dC,
            d, L, g, n, num_chunks, n_pad, chunk, block_d,
        )  # fmt: skip
        return du, ddelta, dA, dB, dC, None


def selective_scan_triton(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None = None, z: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False, chunk: int = CHUNK,
) -> torch.Tensor:  # fmt: skip
    """The Triton kernels (backend "triton"): same arguments and result as `selective_scan_ref`, [b, d, l].

    `chunk` is the backward's recomputation length (memory O(b d n l / chunk) for the chunk-start states).
    """
    dtype_in = u.dtype
    u, delta, A, B, C = prepare(
        u.float(), delta.float(), A.float(), B.float(), C.float(), delta_bias, delta_softplus
    )
    Bt, Ct = B.transpose(2, 3).contiguous(), C.transpose(2, 3).contiguous()  # [b, g, l, n]: time-major
    y = _TritonScan.apply(u.contiguous(), delta.contiguous(), A.contiguous(), Bt, Ct, chunk)  # [b, d, l]
    return finish(y, u, D, z, dtype_in)
