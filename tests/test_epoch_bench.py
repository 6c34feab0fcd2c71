"""benchmarks.epoch's "before": each named reference path, and only those named, in place while timed."""

from __future__ import annotations

import subprocess

import pytest
import torch

import benchmarks.epoch as epoch
import perception.layers.attention as attention
import perception.layers.rope as rope
import perception.models.equivariant as equivariant
import perception.models.pointnet as pointnet
import perception.ops.graphs as graphs
import perception.ops.scan.native as native_scan
import perception.ops.tensor_product as tensor_product
import perception.training as training
import pipeline.training.trainable as trainable
from benchmarks.epoch import KERNELS_BEFORE, REPO, REVERSIONS, before, main
from perception.layers.rope import apply_rope_ref
from perception.models.equivariant import SIZES, E3nnConfig, E3nnNet


def test_one_reversion_swaps_that_path_only_and_puts_it_back() -> None:
    fast_sum, fast_predict, fast_k = equivariant.tensor_product_sum, training.predict, graphs.smallest_k
    with before(["summed_messages"]):
        assert equivariant.tensor_product_sum is not fast_sum
        assert training.predict is fast_predict and graphs.smallest_k is fast_k
    assert equivariant.tensor_product_sum is fast_sum
    with before(["farthest_points"]):
        assert graphs.FARTHEST_POINTS.library() is None and equivariant.tensor_product_sum is fast_sum
    assert graphs.FARTHEST_POINTS.library() is not None or not graphs.FARTHEST_POINTS.available()
    with before(["per_point"]):
        assert pointnet.per_point is pointnet.per_point_ref and graphs.smallest_k is fast_k
    assert pointnet.per_point is not pointnet.per_point_ref
    with before(["adamw"]):
        assert trainable.adamw is training.adamw_ref and pointnet.per_point is not pointnet.per_point_ref
    assert trainable.adamw is training.adamw
    with before(["rope"]):
        assert attention.apply_rope is apply_rope_ref and trainable.adamw is training.adamw
    assert attention.apply_rope is rope.apply_rope
    with before(REVERSIONS):
        assert training.predict is not fast_predict and graphs.smallest_k is not fast_k
    assert (equivariant.tensor_product_sum, training.predict, graphs.smallest_k) == (
        fast_sum,
        fast_predict,
        fast_k,
    )


@pytest.mark.parametrize(
    "names", [["summed_messages"], ["tensor_product"], ["tensor_product", "summed_messages"]]
)
def test_the_e3nn_reversions_compute_what_the_model_computes(names: list[str]) -> None:
    """ "before" times other code for the same model: its logits agree with the fast path's."""
    torch.manual_seed(0)
    model = E3nnNet(E3nnConfig(**{**SIZES["tiny"], "num_classes": 4})).eval()
    pos = torch.randn(3, 80, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(pos)
        with before(names):
            got = model(pos)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_an_unknown_name_is_refused_before_any_work(capsys) -> None:
    with pytest.raises(ValueError, match="--before fused: unknown; one or more of serialize"):
        with before(["fused"]):
            pass
    with pytest.raises(SystemExit):
        main(["--before", "summed_messages", "fused"])
    assert "--before fused: unknown" in capsys.readouterr().err


def _has_kernels_before() -> bool:
    shown = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", KERNELS_BEFORE], capture_output=True)
    return shown.returncode == 0


needs_history = pytest.mark.skipif(
    not _has_kernels_before(), reason=f"needs commit {KERNELS_BEFORE} in this checkout's history"
)


@pytest.mark.skipif(not native_scan.native_available(), reason="needs a C compiler")
@needs_history
def test_the_scan_kernel_before_its_mended_backward_gives_the_same_bits() -> None:
    """ "before" times the previous kernel, not other arithmetic: its output and gradients, bit for bit."""
    g = torch.Generator().manual_seed(3)
    b, d, groups, L, n = 2, 8, 2, 37, 16
    inputs = [
        torch.randn(b, d, L, generator=g),  # u
        torch.randn(b, d, L, generator=g) * 0.5 - 1,  # delta, before the softplus
        -torch.exp(torch.randn(d, n, generator=g) * 0.5 + 1),  # A < 0
        torch.randn(b, groups, L, n, generator=g),  # B, time-major per group
        torch.randn(b, groups, L, n, generator=g),  # C
        torch.randn(d, generator=g),  # D
        torch.randn(b, d, L, generator=g),  # z
        torch.randn(d, generator=g) * 0.1,  # delta_bias
    ]
    gout = torch.randn(b, d, L, generator=g)

    def run() -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        out = native_scan._NativeScan.apply(*leaves, True)
        out.backward(gout)
        return [out.detach(), *(leaf.grad for leaf in leaves)]

    now = run()
    with before(["scan_backward"]):
        assert native_scan._native_lib(n) is not native_scan._kernel(n).library()
        then = run()
    assert native_scan._native_lib(n) is native_scan._kernel(n).library()  # put back
    for got, want in zip(then, now, strict=True):
        assert torch.equal(got, want)


def _tensor_product_library_now():
    """The kernel as compiled from today's source: the class's method, under any patch of the instance's."""
    return type(tensor_product.KERNEL).library(tensor_product.KERNEL)


@pytest.mark.skipif(not tensor_product.fused_available(), reason="needs a C compiler")
@needs_history
@pytest.mark.parametrize("k", [0, 8, 10])
def test_the_tensor_product_kernel_before_its_tiled_transposes_gives_the_same_bits(k: int) -> None:
    """Edge counts that leave a partial chunk and a partial tile, widths that leave partial tiles, and
    (k = 10) targets whose edges straddle two chunks: the same output and gradients, bit for bit."""
    torch.manual_seed(0)
    terms = E3nnNet(E3nnConfig(**{**SIZES["tiny"], "num_classes": 4})).layers[0].conv.tp_terms
    d1, d2, dw, dout = terms.dims
    edges = k * 37 if k else 203  # 37 targets of k edges each
    g = torch.Generator().manual_seed(k)
    x1, x2, weight = (torch.randn(edges, width, generator=g) for width in (d1, d2, dw))
    gout = torch.randn(edges // k if k else edges, dout, generator=g)

    def run() -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_(True) for t in (x1, x2, weight)]
        out = tensor_product._FusedUVU.apply(terms, *leaves, k)
        out.backward(gout)
        return [out.detach(), *(leaf.grad for leaf in leaves)]

    now = run()
    with before(["tp_transposes"]):
        assert tensor_product.KERNEL.loaded() is not _tensor_product_library_now()
        then = run()
    assert tensor_product.KERNEL.loaded() is _tensor_product_library_now()  # put back
    for got, want in zip(then, now, strict=True):
        assert torch.equal(got, want)


def test_a_kernel_source_missing_from_history_is_refused_before_any_work(monkeypatch, capsys) -> None:
    monkeypatch.setattr(epoch, "KERNELS_BEFORE", "0000000")
    with pytest.raises(SystemExit):
        main(["--before", "tp_transposes"])
    err = capsys.readouterr().err
    assert "perception/ops/tensor_product.c at commit 0000000 is not in this checkout's git history" in err
    assert "leave scan_backward, tp_transposes out of --before" in err
    assert "prepare" not in err  # refused before the datasets are prepared
