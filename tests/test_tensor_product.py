"""The fused CPU kernel of e3nn's "uvu" tensor product against e3nn's own TensorProduct, its reference."""

from __future__ import annotations

import pytest
import torch
from e3nn import o3

import perception.ops.tensor_product as fused_tp
from perception.models.equivariant import SIZES, E3nnConfig, E3nnNet
from perception.ops.graphs import sum_by_target_ref
from perception.ops.tensor_product import UVUTerms, fused_available, tensor_product, tensor_product_sum

pytestmark = pytest.mark.skipif(not fused_available(), reason="fused tensor product: no C compiler here")


def _products() -> dict[str, torch.nn.Module]:
    """The three tensor products of the study's e3nn model: the first, a middle and the last convolution."""
    torch.manual_seed(0)
    model = E3nnNet(E3nnConfig(**{**SIZES["tiny"], "lmax": 3}))  # lmax 3: paths up to 3 x 3 -> 3 as well
    return {"down": model.down.conv.tp, "middle": model.layers[0].conv.tp, "last": model.layers[-1].tp}


def _inputs(tp: torch.nn.Module, edges: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    dims = (tp.irreps_in1.dim, tp.irreps_in2.dim, tp.weight_numel)
    return tuple(torch.randn(edges, d, generator=generator).requires_grad_() for d in dims)


def _run(function, inputs: tuple[torch.Tensor, ...], gout: torch.Tensor | None = None):
    """The output and the gradients of every input under `gout` (random if None)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = function(*leaves)
    gout = torch.randn_like(out, generator=torch.Generator().manual_seed(1)) if gout is None else gout
    out.backward(gout)
    return out.detach(), [leaf.grad for leaf in leaves], gout


@pytest.mark.parametrize("layer", ["down", "middle", "last"])
@pytest.mark.parametrize("edges", [1, 63, 64, 200])  # within one chunk, one full chunk, a tail
def test_fused_product_and_gradients_equal_e3nns(layer: str, edges: int) -> None:
    tp = _products()[layer]
    terms = UVUTerms(tp)
    inputs = _inputs(tp, edges)
    want, want_grads, gout = _run(tp, inputs)
    got, got_grads, _ = _run(lambda *x: tensor_product(tp, terms, *x), inputs, gout)
    scale = want.abs().max()
    torch.testing.assert_close(got, want, atol=1e-5 * scale, rtol=1e-5)
    for name, g, w in zip(("x1", "x2", "weight"), got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5 * w.abs().max(), rtol=1e-5, msg=f"{layer}: grad of {name}")


def test_the_fused_path_is_taken_and_its_terms_are_exactly_the_products_nonzeros() -> None:
    """Every weighted path contributes terms (u times its Clebsch-Gordan nonzeros), and the kernel, not
    e3nn, computes float32 CPU products: its result differs from e3nn's in rounding, not by zero."""
    tp = _products()["middle"]
    terms = UVUTerms(tp)
    count = 0
    for ins in tp.instructions:
        mul, ir1 = tp.irreps_in1[ins.i_in1]
        ir2, ir3 = tp.irreps_in2[ins.i_in2].ir, tp.irreps_out[ins.i_out].ir
        count += mul * int((o3.wigner_3j(ir1.l, ir2.l, ir3.l).abs() > 1e-9).sum())
    assert len(terms.coef) == count
    x1, x2, weight = (t.detach() for t in _inputs(tp, 300))
    calls = []
    original = fused_tp._FusedUVU.apply
    fused_tp._FusedUVU.apply = lambda *a: calls.append(1) or original(*a)  # type: ignore[method-assign]
    try:
        tensor_product(tp, terms, x1, x2, weight)
    finally:
        fused_tp._FusedUVU.apply = original  # type: ignore[method-assign]
    assert calls == [1]


def test_two_threads_give_what_one_gives() -> None:
    tp = _products()["middle"]
    terms = UVUTerms(tp)
    inputs = _inputs(tp, 1000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, one_grads, gout = _run(lambda *x: tensor_product(tp, terms, *x), inputs)
        torch.set_num_threads(2)
        two, two_grads, _ = _run(lambda *x: tensor_product(tp, terms, *x), inputs, gout)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    for a, b in zip(one_grads, two_grads, strict=True):
        assert torch.equal(a, b)


def test_float64_and_empty_inputs_run_e3nns_product() -> None:
    """The invariance measurement runs in float64: e3nn's own product, bit for bit."""
    tp = _products()["middle"].double()
    terms = UVUTerms(tp)
    x1, x2, weight = (t.detach().double() for t in _inputs(tp, 50))
    assert torch.equal(tensor_product(tp, terms, x1, x2, weight), tp(x1, x2, weight))
    empty = (t[:0].float() for t in (x1, x2, weight))
    assert tensor_product(tp.float(), terms, *empty).shape == (0, tp.irreps_out.dim)


def test_terms_refuse_a_product_that_is_not_uvu_with_weights_per_edge() -> None:
    shared = o3.FullyConnectedTensorProduct("2x0e + 1x1o", "1x0e + 1x1o", "2x0e + 1x1o")
    with pytest.raises(ValueError, match="uvu"):
        UVUTerms(shared)


def test_the_terms_are_not_in_the_checkpoint() -> None:
    """Checkpoints keep e3nn's state_dict: the terms are rebuilt from the architecture, not stored."""
    model = E3nnNet(E3nnConfig(**SIZES["tiny"]))
    assert not [key for key in model.state_dict() if "tp_terms" in key]
    assert any(True for _ in model.layers[0].conv.tp_terms.buffers())


def test_gradients_without_x2s_equal_e3nns() -> None:
    """The model's spherical harmonics need no gradient: the kernel's shorter backward for that case."""
    tp = _products()["middle"]
    terms = UVUTerms(tp)
    x1, x2, weight = _inputs(tp, 130)
    x2 = x2.detach()
    want, want_grads, gout = _run(lambda a, w: tp(a, x2, w), (x1, weight))
    got, got_grads, _ = _run(lambda a, w: tensor_product(tp, terms, a, x2, w), (x1, weight), gout)
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max(), rtol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5 * w.abs().max(), rtol=1e-5)


def _grouped_targets(targets: int, k: int) -> torch.Tensor:
    return torch.arange(targets).repeat_interleave(k)  # the kNN graphs' layout: k edges a target, in order


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("layer", "targets", "k"),
    [("middle", 1, 1), ("middle", 9, 8), ("middle", 130, 8), ("down", 70, 16), ("last", 11, 24)],
)  # within one chunk, across chunks with a tail; k = 24 does not divide the chunk: the threads split on 192
def test_summed_products_equal_the_products_summed_bit_for_bit(
    layer: str, targets: int, k: int, threads: int
) -> None:
    """The kernel's sum into each target is the per-edge kernel's messages summed by index_add_: the same
    floats, and the same gradients, in one thread or two."""
    tp = _products()[layer]
    terms = UVUTerms(tp)
    x1, x2, weight = _inputs(tp, targets * k)
    x2 = x2.detach()  # as in the model: the spherical harmonics need no gradient
    edge_dst = _grouped_targets(targets, k)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        want, want_grads, gout = _run(
            lambda a, w: sum_by_target_ref(tensor_product(tp, terms, a, x2, w), edge_dst, targets),
            (x1, weight),
        )
        got, got_grads, _ = _run(
            lambda a, w: tensor_product_sum(tp, terms, a, x2, w, edge_dst, targets), (x1, weight), gout
        )
    finally:
        torch.set_num_threads(before)
    assert got.shape == (targets, tp.irreps_out.dim)
    assert torch.equal(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert torch.equal(g, w)


def test_summed_products_of_any_other_layout_or_dtype_are_the_products_summed() -> None:
    """Edges not grouped by target, and float64 (the invariance measurement), take the product and then
    `sum_by_target`: e3nn's own product in float64, bit for bit."""
    tp = _products()["middle"]
    terms = UVUTerms(tp)
    x1, x2, weight = (t.detach() for t in _inputs(tp, 48))
    shuffled = _grouped_targets(6, 8)[torch.randperm(48, generator=torch.Generator().manual_seed(0))]
    want = torch.zeros(6, tp.irreps_out.dim).index_add_(
        0, shuffled, tensor_product(tp, terms, x1, x2, weight)
    )
    assert torch.equal(tensor_product_sum(tp, terms, x1, x2, weight, shuffled, 6), want)
    tp64 = tp.double()
    x1, x2, weight = (t.double() for t in (x1, x2, weight))
    grouped = _grouped_targets(6, 8)
    want = torch.zeros(6, tp.irreps_out.dim, dtype=torch.float64).index_add_(0, grouped, tp64(x1, x2, weight))
    assert torch.equal(tensor_product_sum(tp64, terms, x1, x2, weight, grouped, 6), want)


def test_the_e3nn_models_loss_and_gradients_are_those_of_the_products_summed(monkeypatch) -> None:
    """A training step of the study's e3nn model, with the kernel's sums and with the per-edge messages
    summed by index_add_ (the code before): the same loss and every gradient, bit for bit."""
    import perception.models.equivariant as equivariant

    torch.manual_seed(0)
    model = E3nnNet(E3nnConfig(**{**SIZES["tiny"], "num_classes": 5}))
    pos = torch.randn(4, 96, 3, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 4])

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(pos), labels)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    def refused(*args):
        raise AssertionError("a convolution summed its messages outside the kernel")

    monkeypatch.setattr(fused_tp, "sum_by_target", refused)  # every convolution's graph is grouped
    got_loss, got_grads = step()
    monkeypatch.undo()
    monkeypatch.setattr(
        equivariant,
        "tensor_product_sum",
        lambda tp, terms, x1, x2, w, dst, n: sum_by_target_ref(tensor_product(tp, terms, x1, x2, w), dst, n),
    )
    want_loss, want_grads = step()
    assert torch.equal(got_loss, want_loss)
    assert all(torch.equal(g, w) for g, w in zip(got_grads, want_grads, strict=True))
