"""The selective scan: the reference against hand-computed values, the fast path against the reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from perception.ops.scan import (
    SCAN_BACKENDS,
    native_available,
    resolve_backend,
    selective_scan,
    selective_scan_chunked,
    selective_scan_native,
    selective_scan_ref,
)

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

# Every fast backend, tested against the reference; native needs a C compiler and is skipped without one.
_needs_cc = pytest.mark.skipif(not native_available(), reason="native scan: no C compiler here")
FAST = ["auto", "chunked", pytest.param("native", marks=_needs_cc)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-relative error ||a - b|| / ||b||."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def mamba_inputs(
    b: int, d: int, L: int, n: int, groups: int | None = None, seed: int = 0, dt_max: float = 0.1
) -> dict[str, torch.Tensor]:
    """Realistic Mamba-1 parameters: S4D-real A = -(1..n), delta = softplus(x + bias) with the bias the
    softplus-inverse of a log-uniform dt in [0.001, dt_max], as in Mamba's dt_proj init."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(d, generator=g) * (math.log(dt_max) - math.log(1e-3)) + math.log(1e-3))
    bc_shape = (b, n, L) if groups is None else (b, groups, n, L)
    return {
        "u": torch.randn(b, d, L, generator=g),
        "delta": 0.5 * torch.randn(b, d, L, generator=g),
        "A": -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1),
        "B": torch.randn(*bc_shape, generator=g),
        "C": torch.randn(*bc_shape, generator=g),
        "D": torch.randn(d, generator=g),
        "z": torch.randn(b, d, L, generator=g),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),
    }


def run(scan, inputs: dict[str, torch.Tensor], use: tuple[str, ...], softplus: bool = True, **kw):
    """Output and the gradient of every used input, for a fixed random output gradient."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if k in use}
    out = scan(**leaves, delta_softplus=softplus, **kw)
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    grads = torch.autograd.grad(out, list(leaves.values()), gout)
    return out, dict(zip(leaves, grads, strict=True))


CORE = ("u", "delta", "A", "B", "C")
OPTIONS = {
    "bare": CORE,
    "D": (*CORE, "D"),
    "z": (*CORE, "z"),
    "bias": (*CORE, "delta_bias"),
    "all": NAMES,
}


def assert_match(inputs: dict[str, torch.Tensor], use: tuple[str, ...], tol: float = 1e-4, **kw) -> None:
    out_ref, g_ref = run(selective_scan_ref, inputs, use)
    out, g = run(selective_scan, inputs, use, **kw)
    assert torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in g.values())
    assert rel(out, out_ref) < tol
    for k in use:
        assert rel(g[k], g_ref[k]) < tol, k


# ------------------------------------------------------------------------------- the reference by hand


def test_reference_by_hand():
    """L=2, dim=1, N=1, worked on paper: h1 = Δ1 B1 u1; h2 = exp(Δ2 A) h1 + Δ2 B2 u2; y = C h."""
    u = torch.tensor([[[1.0, 2.0]]])  # [b=1, d=1, L=2]
    delta = torch.tensor([[[0.5, 0.25]]])
    A = torch.tensor([[-2.0]])  # [d, n]
    B = torch.tensor([[[3.0, 4.0]]])  # [b, n, L]
    C = torch.tensor([[[5.0, 6.0]]])
    h1 = 0.5 * 3.0 * 1.0
    h2 = math.exp(0.25 * -2.0) * h1 + 0.25 * 4.0 * 2.0
    y = torch.tensor([[[5.0 * h1, 6.0 * h2]]])
    for scan in (selective_scan_ref, selective_scan):
        torch.testing.assert_close(scan(u, delta, A, B, C), y)
        # out = (y + D u) * silu(z)
        D, z = torch.tensor([0.5]), torch.tensor([[[1.0, -1.0]]])
        gate = torch.tensor([1 / (1 + math.exp(-1.0)), -1 / (1 + math.exp(1.0))])
        torch.testing.assert_close(scan(u, delta, A, B, C, D, z), (y + 0.5 * u) * gate)
        # delta_bias then softplus: raw delta 0 plus the softplus-inverse of (0.5, 0.25) gives delta back.
        bias = torch.tensor([math.log(math.expm1(0.5))])
        raw = torch.tensor([[[0.0, math.log(math.expm1(0.25)) - bias.item()]]])
        torch.testing.assert_close(scan(u, raw, A, B, C, delta_bias=bias, delta_softplus=True), y)
        # d(y1 + y2)/dA = C2 Δ2 exp(Δ2 A) h1 (h1 does not depend on A).
        A_ = A.clone().requires_grad_()
        scan(u, delta, A_, B, C).sum().backward()
        torch.testing.assert_close(A_.grad, torch.tensor([[6.0 * 0.25 * math.exp(-0.5) * h1]]))


# ----------------------------------------------------------------------- fast path against the reference


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_fast_matches_reference_L197(option, backend):
    assert_match(mamba_inputs(2, 8, 197, 16), OPTIONS[option], backend=backend)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("groups", [None, 2])
def test_fast_matches_reference_L1025(groups, backend):
    assert_match(mamba_inputs(1, 4, 1025, 16, groups=groups, seed=3), NAMES, backend=backend)


@pytest.mark.parametrize("backend", FAST)
def test_fast_matches_reference_L4096(backend):
    assert_match(mamba_inputs(1, 4, 4096, 16, seed=4), NAMES, backend=backend)


@_needs_cc
@pytest.mark.parametrize("n", [3, 4, 64])
def test_native_matches_reference_other_state_sizes(n):
    """The kernel is compiled per N: odd and large N, grouped B/C, batch 2, L not a power of two."""
    assert_match(mamba_inputs(2, 6, 301, n, groups=3, seed=9), NAMES, backend="native")


@_needs_cc
def test_native_float64_and_threads_fall_back_or_agree():
    """float64 goes to chunked (in double); one thread and several threads give the same result."""
    inputs = {k: v.double() for k, v in mamba_inputs(1, 4, 50, 4, seed=10).items()}
    out = selective_scan_native(**inputs, delta_softplus=True)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, selective_scan_ref(**inputs, delta_softplus=True))
    inputs = mamba_inputs(2, 7, 97, 16, groups=7, seed=11)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out1, g1 = run(selective_scan_native, inputs, NAMES)
        torch.set_num_threads(max(2, threads))
        out2, g2 = run(selective_scan_native, inputs, NAMES)
    finally:
        torch.set_num_threads(threads)
    assert rel(out1, out2) < 1e-6
    for k in NAMES:
        assert rel(g1[k], g2[k]) < 1e-6, k


def test_auto_picks_native_when_it_compiles():
    assert resolve_backend("auto") == ("native" if native_available() else "chunked")
    assert set(SCAN_BACKENDS) >= {"ref", "chunked", "native"}


@pytest.mark.parametrize("chunk", [1, 5, 64, 197, 500])
def test_chunk_size_does_not_change_the_result(chunk):
    """Chunk boundaries (including a chunk of 1, and a last chunk shorter than the others) are exact."""
    inputs = mamba_inputs(2, 6, 197, 4, groups=3, seed=5)
    out_ref, g_ref = run(selective_scan_ref, inputs, NAMES)
    out, g = run(selective_scan_chunked, inputs, NAMES, chunk=chunk)
    assert rel(out, out_ref) < 1e-5
    for k in NAMES:
        assert rel(g[k], g_ref[k]) < 1e-5, k


def test_fast_gradcheck_float64():
    """The hand-written backward against finite differences, in double, across chunk boundaries."""
    inputs = {k: v.double() for k, v in mamba_inputs(2, 4, 9, 3, groups=2, seed=6).items()}
    leaves = [inputs[k].requires_grad_() for k in NAMES]

    def f(*args: torch.Tensor) -> torch.Tensor:
        kw = dict(zip(NAMES, args, strict=True))
        return selective_scan_chunked(**kw, delta_softplus=True, chunk=4)

    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("backend", FAST)
def test_float32_large_L_stays_finite(backend):
    """Large steps (dt up to 5) and A down to -64 over L=4096: decays underflow to 0, never overflow."""
    inputs = mamba_inputs(2, 8, 4096, 64, seed=7, dt_max=5.0)
    out, g = run(selective_scan, inputs, NAMES, backend=backend)
    assert torch.isfinite(out).all()
    for k, t in g.items():
        assert torch.isfinite(t).all(), k


@pytest.mark.parametrize("backend", FAST)
def test_fast_path_keeps_little_for_backward(backend):
    """Memory: the fast path saves O(b d L) for backward, not the O(b d L n) states autograd would keep."""
    b, d, L, n = 1, 16, 4096, 16
    inputs = {k: v.requires_grad_() for k, v in mamba_inputs(b, d, L, n, seed=8).items()}
    saved = {"ref": 0, "fast": 0}

    def count(key: str):
        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[key] += t.numel()
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    with count("fast"):
        selective_scan(**inputs, delta_softplus=True, backend=backend)
    with count("ref"):
        selective_scan_ref(**inputs, delta_softplus=True)
    assert saved["fast"] < 12 * b * d * L  # a few [b, d, L] tensors, B and C, chunk-start states
    assert saved["ref"] > 3 * b * d * L * n


@pytest.mark.parametrize("backend", FAST)
def test_dtype_in_dtype_out(backend):
    inputs = mamba_inputs(1, 4, 33, 4)
    half = {k: (v.bfloat16() if k in ("u", "delta", "z") else v) for k, v in inputs.items()}
    out = selective_scan(**half, delta_softplus=True, backend=backend)
    assert out.dtype == torch.bfloat16
    ref = selective_scan_ref(**half, delta_softplus=True)
    torch.testing.assert_close(out, ref)


def test_backend_dispatch_and_errors():
    inputs = mamba_inputs(1, 4, 20, 4)
    fast = selective_scan(**inputs, delta_softplus=True, backend="ref")
    torch.testing.assert_close(fast, selective_scan_ref(**inputs, delta_softplus=True))
    with pytest.raises(ValueError, match="backend"):
        selective_scan(**inputs, backend="cuda-magic")
    bad = dict(inputs, B=inputs["B"][:, :, :-1])
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(**bad)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(**dict(inputs, A=inputs["A"][:-1]))


def test_softplus_is_applied_after_bias():
    """delta_softplus=True means softplus(delta + delta_bias), not softplus(delta) + delta_bias."""
    inputs = mamba_inputs(1, 3, 10, 2)
    explicit = dict(
        inputs, delta=F.softplus(inputs["delta"] + inputs["delta_bias"][:, None]), delta_bias=None
    )
    torch.testing.assert_close(selective_scan(**inputs, delta_softplus=True), selective_scan(**explicit))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["auto", "chunked"])
def test_fast_matches_reference_on_cuda(backend):
    # The native kernel is CPU-only: on CUDA tensors `auto` and `native` hand over to the chunked form.
    inputs = {k: v.cuda() for k, v in mamba_inputs(1, 8, 1025, 16, seed=5).items()}
    assert_match(inputs, NAMES, backend=backend)
