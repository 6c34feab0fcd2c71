"""The sequential reference (backend "ref"): the recurrence one Python step per token, with autograd."""

from __future__ import annotations

import torch

from perception.ops.scan.common import finish, prepare


def selective_scan_ref(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None = None, z: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:  # fmt: skip
    """The plain recurrence, one Python step per token, differentiated by autograd. Returns [b, d, l].

    Shapes are in the module glossary. Slow (autograd keeps every step), but obviously right: it is what
    the fast paths are tested against.
    """
    dtype_in = u.dtype
    u, delta, A, B, C = prepare(u, delta, A, B, C, delta_bias, delta_softplus)
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
    return finish(y, u, D, z, dtype_in)
