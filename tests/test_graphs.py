"""Exact neighbour graphs and farthest point sampling against their slow references."""

from __future__ import annotations

import pytest
import torch
from e3nn import o3

from perception.ops.graphs import (
    farthest_point_sampling,
    farthest_point_sampling_ref,
    knn,
    knn_graph,
    knn_graph_ref,
    knn_indices,
    knn_ref,
    radius_graph,
    radius_graph_ref,
    smallest_k,
    smallest_k_ref,
    sum_by_target,
    sum_by_target_ref,
)


def _cloud(batch: int, num_points: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, num_points, 3, generator=generator, dtype=dtype) * 2 - 1


def _edge_set(edge_index: torch.Tensor) -> set[tuple[int, int]]:
    return set(map(tuple, edge_index.t().tolist()))


def _per_centre_neighbour_sets(edge_index: torch.Tensor, num_nodes: int) -> list[set[int]]:
    sets: list[set[int]] = [set() for _ in range(num_nodes)]
    for src, dst in edge_index.t().tolist():
        sets[dst].add(src)
    return sets


@pytest.mark.parametrize("loop", [False, True])
def test_knn_graph_matches_brute_force(loop: bool) -> None:
    pos = _cloud(3, 40)
    edge_index = knn_graph(pos, k=7, loop=loop)
    assert edge_index.shape == (2, 3 * 40 * 7)
    assert edge_index.dtype == torch.long
    assert _edge_set(edge_index) == knn_graph_ref(pos, k=7, loop=loop)
    # Each centre appears exactly k times, never as its own neighbour unless loop.
    assert torch.equal(torch.bincount(edge_index[1], minlength=120), torch.full((120,), 7))
    assert loop == bool((edge_index[0] == edge_index[1]).any())


@pytest.mark.parametrize("loop", [False, True])
def test_dense_knn_indices_are_the_knn_graph(loop: bool) -> None:
    pos = _cloud(3, 40, seed=4)
    idx = knn_indices(pos, k=6, loop=loop)
    assert idx.shape == (3, 40, 6) and idx.dtype == torch.long
    as_edges = {
        (b * 40 + int(j), b * 40 + i) for b in range(3) for i in range(40) for j in idx[b, i].tolist()
    }
    assert as_edges == knn_graph_ref(pos, k=6, loop=loop)
    distances = pos[:, :, None] - pos.gather(1, idx.reshape(3, -1, 1).expand(-1, -1, 3)).reshape(3, 40, 6, 3)
    assert (distances.norm(dim=-1).diff(dim=2) >= 0).all()  # nearest first
    with pytest.raises(ValueError, match="k = 40"):
        knn_indices(pos, k=40, loop=False)


def test_bipartite_knn_matches_brute_force() -> None:
    source, target = _cloud(2, 50, seed=8), _cloud(2, 12, seed=9)
    edge_index = knn(source, target, k=5)
    assert edge_index.shape == (2, 2 * 12 * 5)
    assert _edge_set(edge_index) == knn_ref(source, target, k=5)
    assert torch.equal(edge_index[0] // 50, edge_index[1] // 12)  # each target's sources are from its sample
    # A target that is also a source finds itself first (distance 0).
    assert torch.equal(knn(source, source[:, :7], k=1)[0] % 50, torch.arange(7).repeat(2))


@pytest.mark.parametrize("loop", [False, True])
def test_radius_graph_matches_brute_force(loop: bool) -> None:
    pos = _cloud(3, 40, seed=1)
    edge_index = radius_graph(pos, r=0.6, loop=loop)
    assert _edge_set(edge_index) == radius_graph_ref(pos, r=0.6, loop=loop)
    assert edge_index.shape[1] == len(_edge_set(edge_index))  # no duplicates


def test_radius_graph_has_no_neighbour_cap() -> None:
    # 200 points in a tiny ball: every point has all 199 others within r (PyG's CPU radius caps at 32).
    pos = _cloud(2, 200, seed=2) * 0.01
    edge_index = radius_graph(pos, r=1.0)
    assert edge_index.shape[1] == 2 * 200 * 199
    assert torch.equal(torch.bincount(edge_index[1]), torch.full((400,), 199))


def test_no_cross_sample_edges() -> None:
    # Sample 1 is a copy of sample 0 shifted by a tiny amount: nearest points lie across samples if mixed.
    pos = _cloud(1, 50, seed=3)
    pos = torch.cat([pos, pos + 1e-6, pos - 1e-6])
    for edge_index in (knn_graph(pos, k=5), radius_graph(pos, r=0.8), knn_graph(pos, k=5, exact=False)):
        assert torch.equal(edge_index[0] // 50, edge_index[1] // 50)


def test_graphs_are_invariant_to_rotation() -> None:
    pos = _cloud(2, 64, seed=4)
    rotated = pos @ o3.rand_matrix(dtype=torch.float64).T
    assert _edge_set(knn_graph(rotated, k=8)) == _edge_set(knn_graph(pos, k=8))
    assert _edge_set(radius_graph(rotated, r=0.5)) == _edge_set(radius_graph(pos, r=0.5))
    assert torch.equal(farthest_point_sampling(rotated, 16), farthest_point_sampling(pos, 16))


def test_graphs_are_invariant_to_permutation() -> None:
    pos = _cloud(1, 64, seed=5)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    permuted = pos[:, perm]
    for build in (lambda p: knn_graph(p, k=6), lambda p: radius_graph(p, r=0.5)):
        original = _per_centre_neighbour_sets(build(pos), 64)
        moved = _per_centre_neighbour_sets(build(permuted), 64)
        # Point i of `permuted` is point perm[i] of `pos`: map indices back and compare as sets.
        for i in range(64):
            assert {int(perm[j]) for j in moved[i]} == original[int(perm[i])]
    picks = farthest_point_sampling(pos, 20)[0]
    picks_permuted = perm[farthest_point_sampling(permuted, 20)[0]]
    assert torch.equal(picks, picks_permuted)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # the torch loop, and the kernel
def test_farthest_point_sampling_matches_reference(dtype: torch.dtype) -> None:
    pos = _cloud(3, 50, seed=6, dtype=dtype)
    picks = farthest_point_sampling(pos, 12)
    assert picks.tolist() == farthest_point_sampling_ref(pos, 12)
    assert all(len(set(row)) == 12 for row in picks.tolist())


@pytest.mark.parametrize("seed", range(6))
def test_the_farthest_point_kernel_picks_what_the_torch_loop_picks(seed: int) -> None:
    """Bit for bit, also where distances tie: repeated points, and coordinates on a coarse grid."""
    import perception.ops.graphs as graphs

    if graphs.FARTHEST_POINTS.library() is None:
        pytest.skip("no C compiler here: the torch loop runs everything")
    generator = torch.Generator().manual_seed(seed)
    num_points = (192, 256, 40)[seed % 3]
    pos = torch.randn(6, num_points, 3, generator=generator) * 10.0 ** (seed - 2)
    if seed % 2:
        pos[:, ::5] = pos[:, :1].clone()  # every fifth point repeats the first
    else:
        pos = torch.round(pos / pos.abs().max() * 4) / 4  # a grid: many equal distances
    first = (pos - pos.mean(dim=1, keepdim=True)).square().sum(-1).argmax(dim=1)
    for m in (1, 7, num_points // 2):
        assert torch.equal(farthest_point_sampling(pos, m), graphs._farthest_points_torch(pos, first, m))


def test_farthest_point_sampling_runs_the_kernel_for_float32_cpu_only(monkeypatch) -> None:
    import perception.ops.graphs as graphs

    if graphs.FARTHEST_POINTS.library() is None:
        pytest.skip("no C compiler here: the torch loop runs everything")
    loop = graphs._farthest_points_torch

    def refused(*args):
        raise AssertionError("the torch loop ran")

    monkeypatch.setattr(graphs, "_farthest_points_torch", refused)
    pos = _cloud(2, 30, dtype=torch.float32)
    picks = farthest_point_sampling(pos, 9)  # the kernel
    with pytest.raises(AssertionError, match="torch loop ran"):
        farthest_point_sampling(pos.double(), 9)
    monkeypatch.setattr(graphs, "_farthest_points_torch", loop)
    assert torch.equal(farthest_point_sampling(pos.double(), 9), picks)


def test_chunked_distance_matrices_give_the_same_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    from perception.ops import graphs

    pos = _cloud(5, 30, seed=7)
    whole = knn_graph(pos, k=4)
    monkeypatch.setattr(graphs, "_CHUNK_ELEMENTS", 30 * 30 * 2)  # two samples per chunk
    assert torch.equal(knn_graph(pos, k=4), whole)
    assert _edge_set(radius_graph(pos, r=0.5)) == radius_graph_ref(pos, r=0.5)


def test_bad_arguments_raise() -> None:
    pos = _cloud(1, 10)
    with pytest.raises(ValueError, match="k = 10"):
        knn_graph(pos, k=10)
    with pytest.raises(ValueError, match="B, N, D"):
        knn_graph(pos[0], k=3)
    with pytest.raises(ValueError, match="m = 11"):
        farthest_point_sampling(pos, 11)
    with pytest.raises(ValueError, match="r = -1"):
        radius_graph(pos, r=-1.0)
    with pytest.raises(ValueError, match="k = 11"):
        knn(pos, pos[:, :3], k=11)
    with pytest.raises(ValueError, match="differ in B or D"):
        knn(pos, _cloud(2, 3), k=2)


@pytest.mark.parametrize(("n", "k"), [(1, 1), (12, 12), (192, 11), (300, 40)])
def test_smallest_k_equals_a_stable_sort(n: int, k: int) -> None:
    generator = torch.Generator().manual_seed(n + k)
    dist = torch.randn(5, 7, n, generator=generator)
    dist[:, :, ::3] = dist[:, :, :1].clone()  # ties: a third of each row equals its first entry
    dist[0, 0, 0] = float("nan")  # counts as +inf: last
    got = smallest_k(dist, k)
    assert torch.equal(got, smallest_k_ref(dist, k))
    assert got.shape == (5, 7, k) and got.dtype == torch.long
    if n > 1:
        assert 0 not in got[0, 0, : k - 1].tolist() or k == n


def test_smallest_k_runs_the_kernel_for_float32_cpu_and_topk_for_the_rest(monkeypatch) -> None:
    import perception.ops.graphs as graphs

    if graphs.SMALLEST_K.library() is None:
        pytest.skip("no C compiler here: topk runs everything")
    dist = torch.rand(3, 50)
    want = smallest_k_ref(dist, 5)
    topk = torch.Tensor.topk

    def refused(*args, **kwargs):
        raise AssertionError("topk ran")

    monkeypatch.setattr(torch.Tensor, "topk", refused)
    assert torch.equal(smallest_k(dist, 5), want)  # float32 on CPU: the kernel
    for other, k in ((dist.double(), 5), (torch.rand(2, 400), 300)):  # float64, and k beyond the kernel's 256
        with pytest.raises(AssertionError, match="topk ran"):
            smallest_k(other, k)
    monkeypatch.setattr(torch.Tensor, "topk", topk)
    assert torch.equal(smallest_k(dist.double(), 5), want)  # distinct values: topk's order is the same


@pytest.mark.parametrize(("targets", "k"), [(1, 1), (7, 3), (256, 8), (64, 16), (40, 24)])
def test_grouped_sum_by_target_equals_index_add_bitwise(targets: int, k: int) -> None:
    """A kNN graph's layout (k edges per target, grouped, in target order) takes the grouped sum: the same
    values and gradients as the index_add_ reference, bit for bit (k = 16 and 24 are where torch's own sum
    over k would round differently)."""
    generator = torch.Generator().manual_seed(targets + k)
    pos = _cloud(2, targets // 2 + k, seed=k, dtype=torch.float32) if targets > 1 else None
    if pos is not None and targets % 2 == 0:
        edge_src, edge_dst = knn(pos, pos[:, : targets // 2], k)  # the layout the models build
    else:
        edge_dst = torch.arange(targets).repeat_interleave(k)
    messages = torch.randn(targets * k, 19, generator=generator, requires_grad=True)
    grad = torch.randn(targets, 19, generator=generator)
    got, want = sum_by_target(messages, edge_dst, targets), sum_by_target_ref(messages, edge_dst, targets)
    assert torch.equal(got, want)
    (got_grad,) = torch.autograd.grad(got, messages, grad)
    (want_grad,) = torch.autograd.grad(want, messages, grad)
    assert torch.equal(got_grad, want_grad)


def test_sum_by_target_takes_any_other_edge_order_to_the_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    messages = torch.randn(12, 5, generator=generator, dtype=torch.float64)
    edge_dst = torch.arange(4).repeat_interleave(3)
    for order in (torch.randperm(12, generator=generator), torch.arange(12)):
        dst = edge_dst[order]
        want = torch.zeros(4, 5, dtype=torch.float64).index_add_(0, dst, messages)
        assert torch.allclose(sum_by_target(messages, dst, 4), want)
    uneven = torch.tensor([0, 0, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3])  # not k per target
    want = torch.zeros(4, 5, dtype=torch.float64).index_add_(0, uneven, messages)
    assert torch.equal(sum_by_target(messages, uneven, 4), want)
    assert sum_by_target(messages[:0], edge_dst[:0], 0).shape == (0, 5)
