"""The selective scan as Triton kernels (backend "triton"): CUDA tensors natively, CPU tensors under
Triton's interpreter (`TRITON_INTERPRET=1`, which must be set before this module is imported).

Same arguments and result as `perception.ops.scan.selective_scan_ref`; the glossary and shapes are in the
package's docstring (b batch, d channels, l length, n states, g groups). The recurrence
h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t is linear in h, so time is cut into chunks of CHUNK steps that run in
parallel (a program per (batch, block of BLOCK_D channels, chunk)), and only the chunks' boundary states
run in sequence:

- forward, three launches:
  1. `_chunk_local`: each chunk's last state from h = 0, and ΣΔ over the chunk (its decay is exp(A ΣΔ));
  2. `_chunk_carry`: one program per channel block walks the chunks, h_start(c+1) = exp(A ΣΔ_c) h_start(c)
     + local_c, and leaves every chunk's start state in `starts` [b, d, chunks, n];
  3. `_chunk_output`: each chunk again from its start state, writing y_t = <h_t, C_t>.
- backward, the adjoint G_t = dL/dh_t = gy_t C_t + exp(Δ_{t+1} A) G_{t+1} is the same kind of recurrence
  run back in time, with the same chunk decays:
  1. `_chunk_adjoint_local`: each chunk's outgoing adjoint exp(Δ_s A) G_s from a zero carry-in;
  2. `_chunk_carry` in reverse: the carry-in at every chunk's end;
  3. `_chunk_grads`: each chunk recomputes its states from its start into a scratch buffer, then runs the
     adjoint back through them:
         dΔ_t = <G_t, u_t B_t> + <G_t, h_{t-1} exp(Δ_t A) A>,   du_t = Δ_t <G_t, B_t>
         dA  += G_t h_{t-1} exp(Δ_t A) Δ_t,   dB_t = Σ_d G_t Δ_t u_t,   dC_t = Σ_d gy_t h_t
     dB, dC and dA are written per program and summed in torch afterwards: no atomics, so the gradients
     are the same bits on every run.

Memory: the chunk start states O(b d n l / CHUNK) are kept from forward to backward; the backward's
scratch (every chunk's states) is O(b d n l) while it runs and is freed after.

Everything runs in float32 (bf16 inputs are cast, state and sums stay fp32) and the result comes back in
u's dtype. delta_bias, softplus, D and the z gate are applied around the kernels in torch (`prepare`,
`finish`), whose autograd differentiates them. B and C go to the kernels time-major, [b, g, l, n], so a
step's n values are contiguous. A block of channels never straddles two groups (BLOCK_D divides d / g).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from perception.ops.scan.common import finish, prepare

CHUNK = 64  # steps per chunk: the programs along time, and the sequential length of each
BLOCK_D = 16  # channels per program, at most (the largest power of two up to it that divides d / g)
NUM_WARPS = 1  # a [BLOCK_D, n] state is a few hundred floats: one warp holds it


@triton.jit
def _chunk_local(
    u_ptr, delta_ptr, A_ptr, B_ptr, local_ptr, dsum_ptr,  # u, delta [b,d,l]; A [d,n]; B [b,g,l,n]
    D_TOTAL, L, G, N, NUM_CHUNKS,  # local [b, d, NUM_CHUNKS, N_PAD]; dsum [b, d, NUM_CHUNKS]
    N_PAD: tl.constexpr, CHUNK_LEN: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Each chunk's last state from a zero start, and its ΣΔ per channel."""
    pid_b, pid_d, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    offs_n = tl.arange(0, N_PAD)  # [N_PAD]
    mask_n = offs_n < N
    mask_dn = (offs_d < D_TOTAL)[:, None] & mask_n[None, :]  # [BLOCK_D, N_PAD]
    group = (pid_d * BLOCK_D) // (D_TOTAL // G)  # one group per block
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0)  # [BLOCK_D, N_PAD]
    row = (pid_b * D_TOTAL + offs_d) * L  # [BLOCK_D]: start of each channel's sequence
    bc = (pid_b * G + group) * L * N  # start of this group's [l, n] block of B
    h = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)
    dsum = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = chunk * CHUNK_LEN
    for t in range(start, tl.minimum(start + CHUNK_LEN, L)):
        u_t = tl.load(u_ptr + row + t)  # [BLOCK_D]
        dt_t = tl.load(delta_ptr + row + t)  # [BLOCK_D]
        B_t = tl.load(B_ptr + bc + t * N + offs_n, mask=mask_n, other=0.0)  # [N_PAD]
        h = tl.exp(dt_t[:, None] * A) * h + (dt_t * u_t)[:, None] * B_t[None, :]
        dsum += dt_t
    chunk_row = (pid_b * D_TOTAL + offs_d) * NUM_CHUNKS + chunk  # [BLOCK_D]
    tl.store(local_ptr + chunk_row[:, None] * N_PAD + offs_n[None, :], h)
    tl.store(dsum_ptr + chunk_row, dsum)


@triton.jit
def _chunk_carry(
    A_ptr, dsum_ptr, states_ptr,  # states [b, d, NUM_CHUNKS, N_PAD]: each chunk's local part, in place
    D_TOTAL, N, NUM_CHUNKS,
    N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, REVERSE: tl.constexpr,
):  # fmt: skip
    """The chunks in sequence: state in = exp(A ΣΔ) * previous state in + previous chunk's local part.

    Forward (REVERSE False): `states` holds each chunk's local last state and becomes each chunk's start
    state. Backward (REVERSE True): it holds each chunk's outgoing adjoint from a zero carry-in and becomes
    the carry-in at each chunk's end, walking from the last chunk to the first.
    """
    pid_b, pid_d = tl.program_id(0), tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, N_PAD)
    mask_dn = (offs_d < D_TOTAL)[:, None] & (offs_n < N)[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0)  # [BLOCK_D, N_PAD]
    base = (pid_b * D_TOTAL + offs_d) * NUM_CHUNKS  # [BLOCK_D]
    carry = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)
    for step in range(NUM_CHUNKS):
        chunk = NUM_CHUNKS - 1 - step if REVERSE else step
        at = states_ptr + (base + chunk)[:, None] * N_PAD + offs_n[None, :]  # [BLOCK_D, N_PAD]
        local = tl.load(at)
        tl.store(at, carry)
        decay = tl.exp(A * tl.load(dsum_ptr + base + chunk)[:, None])  # exp(A ΣΔ) over the chunk
        carry = decay * carry + local


@triton.jit
def _chunk_output(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, starts_ptr, y_ptr,  # y [b, d, l]; C [b, g, l, n]
    D_TOTAL, L, G, N, NUM_CHUNKS,
    N_PAD: tl.constexpr, CHUNK_LEN: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Each chunk from its start state: y_t = <h_t, C_t>."""
    pid_b, pid_d, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, N_PAD)
    mask_n = offs_n < N
    mask_dn = (offs_d < D_TOTAL)[:, None] & mask_n[None, :]
    group = (pid_d * BLOCK_D) // (D_TOTAL // G)
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0)
    row = (pid_b * D_TOTAL + offs_d) * L
    bc = (pid_b * G + group) * L * N
    chunk_row = (pid_b * D_TOTAL + offs_d) * NUM_CHUNKS + chunk
    h = tl.load(starts_ptr + chunk_row[:, None] * N_PAD + offs_n[None, :])  # [BLOCK_D, N_PAD]
    start = chunk * CHUNK_LEN
    for t in range(start, tl.minimum(start + CHUNK_LEN, L)):
        u_t = tl.load(u_ptr + row + t)
        dt_t = tl.load(delta_ptr + row + t)
        B_t = tl.load(B_ptr + bc + t * N + offs_n, mask=mask_n, other=0.0)
        C_t = tl.load(C_ptr + bc + t * N + offs_n, mask=mask_n, other=0.0)
        h = tl.exp(dt_t[:, None] * A) * h + (dt_t * u_t)[:, None] * B_t[None, :]
        tl.store(y_ptr + row + t, tl.sum(h * C_t[None, :], axis=1))


@triton.jit
def _chunk_adjoint_local(
    delta_ptr, A_ptr, C_ptr, gy_ptr, outgoing_ptr,  # gy [b, d, l]; outgoing [b, d, NUM_CHUNKS, N_PAD]
    D_TOTAL, L, G, N, NUM_CHUNKS,
    N_PAD: tl.constexpr, CHUNK_LEN: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Each chunk's outgoing adjoint exp(Δ_s A) G_s (s its first step) from a zero carry-in at its end."""
    pid_b, pid_d, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, N_PAD)
    mask_n = offs_n < N
    mask_dn = (offs_d < D_TOTAL)[:, None] & mask_n[None, :]
    group = (pid_d * BLOCK_D) // (D_TOTAL // G)
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0)
    row = (pid_b * D_TOTAL + offs_d) * L
    bc = (pid_b * G + group) * L * N
    start = chunk * CHUNK_LEN
    end = tl.minimum(start + CHUNK_LEN, L)
    carried = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)  # exp(Δ_{t+1} A) G_{t+1}
    for back in range(0, end - start):
        t = end - 1 - back
        dt_t = tl.load(delta_ptr + row + t)
        gy_t = tl.load(gy_ptr + row + t)
        C_t = tl.load(C_ptr + bc + t * N + offs_n, mask=mask_n, other=0.0)
        carried = (carried + gy_t[:, None] * C_t[None, :]) * tl.exp(dt_t[:, None] * A)
    chunk_row = (pid_b * D_TOTAL + offs_d) * NUM_CHUNKS + chunk
    tl.store(outgoing_ptr + chunk_row[:, None] * N_PAD + offs_n[None, :], carried)


@triton.jit
def _chunk_grads(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, gy_ptr, starts_ptr, carry_ptr, scratch_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr,  # du, ddelta [b,d,l]; dA [b, NUM_CHUNKS, d, N_PAD];
    D_TOTAL, L, G, N, NUM_CHUNKS,  # dB, dC [b, d / BLOCK_D, l, N_PAD]: one partial per channel block
    N_PAD: tl.constexpr, CHUNK_LEN: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Each chunk's states recomputed into scratch, then the adjoint back through them from its carry-in."""
    pid_b, pid_d, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, N_PAD)
    mask_n = offs_n < N
    mask_dn = (offs_d < D_TOTAL)[:, None] & mask_n[None, :]
    group = (pid_d * BLOCK_D) // (D_TOTAL // G)
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0)
    row = (pid_b * D_TOTAL + offs_d) * L
    bc = (pid_b * G + group) * L * N
    partial = (pid_b * tl.num_programs(1) + pid_d) * L * N_PAD  # this block's [l, N_PAD] of dB and dC
    chunk_row = (pid_b * D_TOTAL + offs_d) * NUM_CHUNKS + chunk
    tile = chunk_row[:, None] * N_PAD + offs_n[None, :]  # [BLOCK_D, N_PAD]
    # This program's scratch: [CHUNK_LEN, BLOCK_D, N_PAD], its chunk's states.
    program = (pid_b * tl.num_programs(1) + pid_d) * NUM_CHUNKS + chunk
    scratch = scratch_ptr + program * CHUNK_LEN * BLOCK_D * N_PAD
    scratch = scratch + tl.arange(0, BLOCK_D)[:, None] * N_PAD + offs_n[None, :]  # [BLOCK_D, N_PAD]
    start = chunk * CHUNK_LEN
    end = tl.minimum(start + CHUNK_LEN, L)
    h_start = tl.load(starts_ptr + tile)
    h = h_start
    for t in range(start, end):  # h_start .. h_{end-1}
        u_t = tl.load(u_ptr + row + t)
        dt_t = tl.load(delta_ptr + row + t)
        B_t = tl.load(B_ptr + bc + t * N + offs_n, mask=mask_n, other=0.0)
        h = tl.exp(dt_t[:, None] * A) * h + (dt_t * u_t)[:, None] * B_t[None, :]
        tl.store(scratch + (t - start) * BLOCK_D * N_PAD, h)
    carried = tl.load(carry_ptr + tile)  # exp(Δ_{end} A) G_{end}: the adjoint flowing in from later chunks
    dA_acc = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)
    for back in range(0, end - start):
        i = end - 1 - start - back
        t = start + i
        h_t = tl.load(scratch + i * BLOCK_D * N_PAD)
        h_prev = tl.load(scratch + (i - 1) * BLOCK_D * N_PAD, mask=(i > 0) & mask_dn, other=0.0)
        h_prev = tl.where(i > 0, h_prev, h_start)  # [BLOCK_D, N_PAD]
        u_t = tl.load(u_ptr + row + t)
        dt_t = tl.load(delta_ptr + row + t)
        gy_t = tl.load(gy_ptr + row + t)
        B_t = tl.load(B_ptr + bc + t * N + offs_n, mask=mask_n, other=0.0)
        C_t = tl.load(C_ptr + bc + t * N + offs_n, mask=mask_n, other=0.0)
        dA_t = tl.exp(dt_t[:, None] * A)  # [BLOCK_D, N_PAD]
        G_t = carried + gy_t[:, None] * C_t[None, :]  # dL/dh_t
        tl.store(dC_ptr + partial + t * N_PAD + offs_n, tl.sum(gy_t[:, None] * h_t, axis=0))
        GB = tl.sum(G_t * B_t[None, :], axis=1)  # [BLOCK_D]: <G_t, B_t>
        decay = G_t * h_prev * dA_t  # [BLOCK_D, N_PAD]: dL/d(Δ_t A) per state
        tl.store(du_ptr + row + t, dt_t * GB)
        tl.store(ddelta_ptr + row + t, u_t * GB + tl.sum(decay * A, axis=1))
        tl.store(dB_ptr + partial + t * N_PAD + offs_n, tl.sum(G_t * (dt_t * u_t)[:, None], axis=0))
        dA_acc += decay * dt_t[:, None]
        carried = G_t * dA_t
    dA_row = (pid_b * NUM_CHUNKS + chunk) * D_TOTAL + offs_d  # [BLOCK_D]
    tl.store(dA_ptr + dA_row[:, None] * N_PAD + offs_n[None, :], dA_acc)


def _block_d(d: int, g: int, most: int = BLOCK_D) -> int:
    """The largest power of two up to `most` that divides d / g, so a block of channels shares one group."""
    per_group, block = d // g, 1
    while block < most and per_group % (block * 2) == 0:
        block *= 2
    return block


class _TritonScan(torch.autograd.Function):
    """y = <h_t, C_t> of the recurrence; fp32 contiguous u, delta [b,d,l], A [d,n], B, C [b,g,l,n]."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, chunk, block_d, num_warps):
        b, d, L = u.shape
        g, n = B.shape[1], A.shape[1]
        n_pad, block_d = triton.next_power_of_2(n), _block_d(d, g, block_d)
        num_chunks = triton.cdiv(L, chunk)
        meta = {"N_PAD": n_pad, "CHUNK_LEN": chunk, "BLOCK_D": block_d, "num_warps": num_warps}
        sizes = (d, L, g, n, num_chunks)
        starts = u.new_empty(b, d, num_chunks, n_pad)  # each chunk's local last state, then its start state
        dsum = u.new_empty(b, d, num_chunks)  # ΣΔ per chunk: its decay is exp(A ΣΔ)
        grid = (b, d // block_d, num_chunks)
        _chunk_local[grid](u, delta, A, B, starts, dsum, *sizes, **meta)
        _chunk_carry[grid[:2]](A, dsum, starts, d, n, num_chunks, n_pad, block_d, False, num_warps=num_warps)
        y = torch.empty_like(u)
        _chunk_output[grid](u, delta, A, B, C, starts, y, *sizes, **meta)
        ctx.save_for_backward(u, delta, A, B, C, starts, dsum)
        ctx.meta = (chunk, block_d, num_warps)
        return y

    @staticmethod
    def backward(ctx, gy):
        u, delta, A, B, C, starts, dsum = ctx.saved_tensors
        chunk, block_d, num_warps = ctx.meta
        b, d, L = u.shape
        g, n = B.shape[1], A.shape[1]
        n_pad, num_chunks = triton.next_power_of_2(n), triton.cdiv(L, chunk)
        meta = {"N_PAD": n_pad, "CHUNK_LEN": chunk, "BLOCK_D": block_d, "num_warps": num_warps}
        sizes = (d, L, g, n, num_chunks)
        gy = gy.float().contiguous()
        grid = (b, d // block_d, num_chunks)
        carry = torch.empty_like(starts)  # each chunk's outgoing adjoint, then its carry-in
        _chunk_adjoint_local[grid](delta, A, C, gy, carry, *sizes, **meta)
        _chunk_carry[grid[:2]](A, dsum, carry, d, n, num_chunks, n_pad, block_d, True, num_warps=num_warps)
        scratch = u.new_empty(b * (d // block_d) * num_chunks, chunk, block_d, n_pad)  # every chunk's states
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dA_part = u.new_empty(b, num_chunks, d, n_pad)
        dB_part = u.new_empty(b, d // block_d, L, n_pad)
        dC_part = u.new_empty(b, d // block_d, L, n_pad)
        _chunk_grads[grid](
            u, delta, A, B, C, gy, starts, carry, scratch, du, ddelta, dA_part, dB_part, dC_part,
            *sizes, **meta,
        )  # fmt: skip
        del scratch
        blocks_per_group = d // block_d // g
        dA = dA_part.sum(dim=(0, 1))[:, :n]  # [d, n]
        dB = dB_part.view(b, g, blocks_per_group, L, n_pad).sum(2)[..., :n]  # [b, g, l, n]
        dC = dC_part.view(b, g, blocks_per_group, L, n_pad).sum(2)[..., :n]  # [b, g, l, n]
        return du, ddelta, dA, dB, dC, None, None, None


def selective_scan_triton(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None = None, z: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False, chunk: int = CHUNK, block_d: int = BLOCK_D, num_warps: int = NUM_WARPS,
) -> torch.Tensor:  # fmt: skip
    """The Triton kernels (backend "triton"): same arguments and result as `selective_scan_ref`, [b, d, l].

    `chunk` is the steps per chunk (parallel programs along time: l / chunk), `block_d` the most channels
    per program, `num_warps` the warps per program: speed only, never the result beyond rounding.
    """
    dtype_in = u.dtype
    u, delta, A, B, C = prepare(
        u.float(), delta.float(), A.float(), B.float(), C.float(), delta_bias, delta_softplus
    )
    Bt, Ct = B.transpose(2, 3).contiguous(), C.transpose(2, 3).contiguous()  # [b, g, l, n]: time-major
    y = _TritonScan.apply(
        u.contiguous(), delta.contiguous(), A.contiguous(), Bt, Ct, chunk, block_d, num_warps
    )  # [b, d, l]
    return finish(y, u, D, z, dtype_in)
