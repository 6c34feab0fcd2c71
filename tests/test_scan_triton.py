"""The Triton selective scan against the sequential reference: under Triton's interpreter on CPU tensors in
every test run, natively on CUDA where a GPU is present (`gpu`). Tiny shapes: the interpreter runs each
kernel op by op in Python."""

from __future__ import annotations

import os

# Before the kernels' module is imported (NOTES.md: otherwise a launch finds "0 active drivers"); nothing
# else in the test run uses Triton. Unset where a GPU runs the kernels natively.
if not os.environ.get("PERCEPTION_TRITON_NATIVE"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from perception.ops.scan import (  # noqa: E402
    interpreter_problem,
    resolve_backend,
    selective_scan,
    selective_scan_ref,
)
from tests.test_scan import NAMES, mamba_inputs, rel, run  # noqa: E402

pytest.importorskip("triton")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED or interpreter_problem() is not None,
    reason=interpreter_problem() or "CPU tensors need TRITON_INTERPRET=1",
)


def _scan(chunk: int, **tuning):
    from perception.ops.scan.triton_kernels import selective_scan_triton

    return lambda **kw: selective_scan_triton(**kw, chunk=chunk, **tuning)


def _compare(inputs, use, chunk, tol):
    out_ref, g_ref = run(selective_scan_ref, inputs, use)
    out, g = run(_scan(chunk), inputs, use)
    assert out.dtype == inputs["u"].dtype
    assert rel(out.float(), out_ref.float()) < tol
    for k in use:
        assert rel(g[k].float(), g_ref[k].float()) < tol, k


@needs_interpreter
@pytest.mark.parametrize(
    "b, d, L, n, groups, chunk",
    [
        (2, 8, 37, 4, None, 8),  # several chunks, a short last one
        (1, 6, 13, 3, 3, 4),  # n not a power of two (padded), three groups of two channels
        (2, 4, 5, 16, 2, 8),  # L shorter than a chunk
        (1, 8, 16, 4, 1, 16),  # exactly one chunk
    ],
)
def test_triton_matches_the_reference_in_fp32(b, d, L, n, groups, chunk):
    _compare(mamba_inputs(b, d, L, n, groups=groups, seed=3), NAMES, chunk, tol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("use", [("u", "delta", "A", "B", "C"), ("u", "delta", "A", "B", "C", "z")])
def test_triton_without_the_optional_terms(use):
    _compare(mamba_inputs(1, 4, 11, 4, seed=4), use, chunk=4, tol=1e-4)


@needs_interpreter
def test_triton_in_bf16_keeps_fp32_state():
    """bf16 in and out, fp32 state and sums: within bf16's rounding of the output (2^-8 relative)."""
    inputs = {k: v.to(torch.bfloat16) for k, v in mamba_inputs(2, 8, 21, 4, groups=2, seed=6).items()}
    reference = {k: v.float() for k, v in inputs.items()}  # the same rounded values, computed in fp32
    out_ref, g_ref = run(selective_scan_ref, reference, NAMES)
    out, g = run(_scan(4), inputs, NAMES)
    assert out.dtype == torch.bfloat16
    assert rel(out.float(), out_ref) < 8e-3
    for k in NAMES:
        assert rel(g[k].float(), g_ref[k]) < 2e-2, k


@needs_interpreter
def test_the_backend_by_name_and_auto_on_cpu_is_unchanged():
    inputs = mamba_inputs(1, 4, 9, 4, seed=7)
    torch.testing.assert_close(
        selective_scan(**inputs, delta_softplus=True, backend="triton"),
        selective_scan_ref(**inputs, delta_softplus=True),
        rtol=1e-4,
        atol=1e-5,
    )
    assert resolve_backend("auto", "cpu") in ("native", "chunked")
    assert resolve_backend("auto", "cuda") == "triton"  # triton imports here


def test_a_block_of_channels_stays_within_one_group():
    from perception.ops.scan.triton_kernels import _block_d

    assert _block_d(768, 2) == 16 and _block_d(768, 2, most=64) == 64
    assert _block_d(6, 3) == 2 and _block_d(5, 1) == 1 and _block_d(12, 4) == 1


@needs_interpreter
@pytest.mark.parametrize("chunk, block_d", [(3, 1), (5, 2), (64, 4)])
def test_chunk_and_block_sizes_change_speed_not_the_result(chunk, block_d):
    """Chunks run in parallel and meet through their boundary states: any cut gives the reference."""
    inputs = mamba_inputs(2, 8, 29, 4, groups=2, seed=11)
    out_ref, g_ref = run(selective_scan_ref, inputs, NAMES)
    out, g = run(_scan(chunk, block_d=block_d), inputs, NAMES)
    assert rel(out, out_ref) < 1e-4
    for k in NAMES:
        assert rel(g[k], g_ref[k]) < 1e-4, k


@needs_interpreter
def test_gradients_are_the_same_bits_every_run():
    """No atomics: per-block partial sums, added in a fixed order."""
    inputs = mamba_inputs(1, 8, 21, 4, groups=2, seed=12)
    first = run(_scan(4, block_d=2), inputs, NAMES)[1]
    second = run(_scan(4, block_d=2), inputs, NAMES)[1]
    for k in NAMES:
        assert torch.equal(first[k], second[k]), k


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRETED, reason="needs CUDA, without the interpreter"
)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_triton_matches_the_reference_on_cuda(dtype, tol):
    inputs = {k: v.cuda().to(dtype) for k, v in mamba_inputs(2, 64, 1025, 16, groups=2, seed=8).items()}
    reference = {k: v.float() for k, v in inputs.items()}
    out_ref, g_ref = run(selective_scan_ref, reference, NAMES)
    out, g = run(_scan(64), inputs, NAMES)
    assert rel(out.float(), out_ref) < tol
    for k in NAMES:
        assert rel(g[k].float(), g_ref[k]) < tol, k


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRETED, reason="needs CUDA, without the interpreter"
)
def test_triton_stays_correct_at_16384_steps_on_cuda():
    """The issue's longest sequence, against chunked (the per-token reference would take minutes)."""
    from perception.ops.scan import selective_scan_chunked

    inputs = {k: v.cuda() for k, v in mamba_inputs(1, 32, 16384, 16, groups=1, seed=9).items()}
    out_ref, g_ref = run(selective_scan_chunked, inputs, NAMES)
    out, g = run(_scan(64), inputs, NAMES)
    assert rel(out, out_ref) < 1e-4
    for k in NAMES:
        assert rel(g[k], g_ref[k]) < 1e-4, k
