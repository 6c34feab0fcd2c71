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

Backends, one file each, all taking the same arguments (`common.py` holds the shared pre/post steps):
  - `reference.py`, `selective_scan_ref`: the plain sequential reference, a Python loop over time with
    autograd. Every other backend is tested against it.
  - `chunked.py`, `selective_scan_chunked`: the CPU fast path (backend "chunked"), a
    `torch.autograd.Function` whose forward is the same recurrence run without autograd and whose backward
    is the hand-written adjoint recurrence run backwards in time. It works on time chunks: each chunk's Ā
    and B̄x are built for that chunk only, and forward keeps just the state at each chunk start, so backward
    recomputes a chunk's states from there. Memory is O(b d l + b d n l / chunk) instead of the O(b d n l)
    tensors autograd would keep per step, and only exp of Δ A <= 0 appears, so nothing overflows (a
    cumsum/exp-of-cumsum form overflows with Mamba's A down to -16).
  - `native.py`, `selective_scan_native` (backend "native"): the C kernel `native_scan.c`, compiled here on
    first use and called through ctypes (CPU).
  - `triton_kernels.py` (backend "triton"): Triton kernels for CUDA tensors, or CPU tensors under
    TRITON_INTERPRET=1; imported only when used.
`selective_scan(..., backend="auto")` dispatches by name through `SCAN_BACKENDS`: triton on CUDA, native
(else chunked) on CPU. Everything is computed in float32 (float64 stays float64) and returned in the dtype
of u.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from perception.ops.scan.chunked import selective_scan_chunked
from perception.ops.scan.native import native_available, selective_scan_native
from perception.ops.scan.reference import selective_scan_ref


def triton_available() -> bool:
    """Whether the `triton` package imports (CUDA builds of torch ship it; the test extra pins it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run the kernels with the installed packages, or None.

    Triton 3.6's interpreter turns a scalar kernel argument into a 1-element numpy array and takes int()
    of it, which numpy 2.4 and newer refuse ("only 0-dimensional arrays can be converted to Python
    scalars"); 3.7 fixed it. Compiled kernels on a GPU are not affected. (The GPU machine this project
    is checked on has Triton 3.6 and numpy 2.5.)
    """
    import numpy as np
    import triton

    def version(text: str) -> tuple[int, int]:
        major, minor = (int("".join(c for c in part if c.isdigit()) or 0) for part in text.split(".")[:2])
        return major, minor

    if version(triton.__version__) < (3, 7) and version(np.__version__) >= (2, 4):
        return (
            f"Triton {triton.__version__}'s interpreter cannot run with numpy {np.__version__} (it needs "
            "Triton >= 3.7 or numpy < 2.4); on a GPU the compiled kernels are unaffected"
        )
    return None


def selective_scan_triton(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None = None, z: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:  # fmt: skip
    """The Triton kernels (backend "triton", `triton_kernels.py`): CUDA tensors, or CPU tensors under
    Triton's interpreter (TRITON_INTERPRET=1 set before the kernels' module is first imported)."""
    if not triton_available():
        raise RuntimeError(
            "scan backend 'triton' needs the triton package: a CUDA build of torch ships it, or "
            "pip install triton==3.7.1 (the version torch 2.13.0 pins)"
        )
    if u.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "scan backend 'triton' runs CPU tensors only under Triton's interpreter: set TRITON_INTERPRET=1 "
            "before perception.ops.scan.triton_kernels is imported, or use a CUDA tensor"
        )
    if u.device.type == "cpu" and (problem := interpreter_problem()):
        raise RuntimeError(f"scan backend 'triton' on CPU tensors: {problem}")
    from perception.ops.scan.triton_kernels import selective_scan_triton as run

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
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None = None, z: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False, backend: str = "auto",
) -> torch.Tensor:  # fmt: skip
    """Mamba's selective scan, [b, d, l]; arguments as in `selective_scan_ref`, run by `backend`."""
    scan = SCAN_BACKENDS[resolve_backend(backend, u.device)]
    return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


__all__ = [
    "BACKEND_NAMES", "SCAN_BACKENDS", "interpreter_problem", "native_available", "resolve_backend",
    "selective_scan", "selective_scan_chunked", "selective_scan_native", "selective_scan_ref",
    "selective_scan_triton", "triton_available",
]  # fmt: skip
