"""What every backend does around its scan: check the shapes, cast to the compute dtype, apply delta's
bias and softplus, give B and C a group axis; then add D u and the gate. Shapes: the package glossary."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 when the input is float64 (so gradcheck can run in double)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_shapes(
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


def prepare(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> tuple[torch.Tensor, ...]:
    """Cast to the compute dtype, apply delta_bias and softplus, and give B, C a group axis [b, g, n, l]."""
    check_shapes(u, delta, A, B, C)
    ct = compute_dtype(u.dtype)
    u, delta, A, B, C = u.to(ct), delta.to(ct), A.to(ct), B.to(ct), C.to(ct)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]  # [b, d, l]
    if delta_softplus:
        delta = F.softplus(delta)
    B = B if B.dim() == 4 else B.unsqueeze(1)  # [b, g, n, l]
    C = C if C.dim() == 4 else C.unsqueeze(1)  # [b, g, n, l]
    return u, delta, A, B, C


def finish(
    y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """out = (y + D u) * silu(z), each term optional, cast back to the input dtype. All [b, d, l]."""
    out = y if D is None else y + u * D.to(y.dtype)[:, None]
    if z is not None:
        out = out * F.silu(z.to(y.dtype))
    return out.to(dtype)
