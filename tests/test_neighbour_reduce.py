"""The neighbour max and sum kernel (DGCNN's EdgeConv) against the gather-then-reduce reference."""

from __future__ import annotations

import pytest
import torch

import perception.ops.neighbour_reduce as reduce
from perception.ops.neighbour_reduce import fused_available, neighbour_max_sum, neighbour_max_sum_ref
from tests.conftest import on_one_then_two_threads

pytestmark = pytest.mark.skipif(not fused_available(), reason="neighbour max kernel: no C compiler here")


def _graph(rows: int, k: int, channels: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, channels, generator=generator)
    sources = torch.randint(0, rows, (rows, k), generator=generator)  # repeated neighbours included
    sources[:, 0] = torch.arange(rows)  # each point its own neighbour, as DGCNN's loop=True graph has it
    return features, sources


def _run(function, features: torch.Tensor, sources: torch.Tensor, seed: int = 1):
    leaf = features.detach().clone().requires_grad_()
    top, total = function(leaf, sources)
    generator = torch.Generator().manual_seed(seed)
    grad_top, grad_total = (torch.randn(top.shape, generator=generator) for _ in range(2))
    (top * grad_top + total * grad_total).sum().backward()
    return top.detach(), total.detach(), leaf.grad


@pytest.mark.parametrize(("rows", "k", "channels"), [(1, 1, 1), (50, 4, 3), (384, 10, 64)])
def test_kernel_equals_the_gathered_reference(rows: int, k: int, channels: int) -> None:
    features, sources = _graph(rows, k, channels)
    top, total, grad = _run(neighbour_max_sum, features, sources)
    ref_top, ref_total, ref_grad = _run(neighbour_max_sum_ref, features, sources)
    assert torch.equal(top, ref_top)  # a max is exact
    torch.testing.assert_close(total, ref_total, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-6)


def test_the_max_shares_its_gradient_among_ties_as_amax_does() -> None:
    features = torch.tensor([[1.0, 5.0], [3.0, 5.0], [3.0, -1.0]])  # rows 0 and 1 tie for channel 1's max
    sources = torch.tensor([[0, 1, 2]])
    leaf = features.clone().requires_grad_()
    top, _ = neighbour_max_sum(leaf, sources)
    top.backward(torch.tensor([[2.0, 6.0]]))
    reference = features.clone().requires_grad_()
    reference[sources].amax(dim=1).backward(torch.tensor([[2.0, 6.0]]))
    assert torch.equal(leaf.grad, reference.grad)
    assert leaf.grad[:, 1].tolist() == [3.0, 3.0, 0.0] and leaf.grad[:, 0].tolist() == [0.0, 1.0, 1.0]


def test_the_kernel_runs_float32_cpu_and_the_reference_everything_else(monkeypatch) -> None:
    features, sources = _graph(40, 5, 8)
    calls = []
    original = reduce._NeighbourMaxSum.apply
    monkeypatch.setattr(reduce._NeighbourMaxSum, "apply", lambda *a: calls.append(1) or original(*a))
    neighbour_max_sum(features, sources)
    assert calls == [1]
    doubled = features.double()
    got = neighbour_max_sum(doubled, sources)
    want = neighbour_max_sum_ref(doubled, sources)
    assert calls == [1] and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_two_threads_give_what_one_gives() -> None:
    features, sources = _graph(1000, 10, 16)
    one, two = on_one_then_two_threads(lambda: _run(neighbour_max_sum, features, sources))
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


def test_sources_outside_the_rows_are_refused_before_the_kernel_reads_them() -> None:
    features, sources = _graph(10, 3, 4)
    sources[3, 1] = 10
    with pytest.raises(IndexError, match="10 rows"):
        neighbour_max_sum(features, sources)
