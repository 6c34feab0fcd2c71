"""Exact neighbour graphs and farthest point sampling for batches of point clouds, in plain torch.

torch-geometric 2.8's `knn_graph`/`radius_graph`/`fps` need pyg-lib (not installable here), and PyG's CPU
`radius` caps neighbours at 32 and favours some quadrants, which breaks exact rotation invariance. These
versions work on a dense batch `pos: float[B, N, D]` (D = 3 for coordinates, any D for feature space) with a
per-sample distance matrix and its k smallest entries per row (`smallest_k`): exact, uncapped, never linking
two samples.

Graphs come back PyG-style: `edge_index: long[2, E]` as (source, target) over the flattened B*N nodes (node
`b * N + i` is point i of sample b), so messages flow from neighbour (source) to centre (target) as in
`torch_geometric.nn.MessagePassing` with its default flow. Each fast path has a slow reference beside it
(`*_ref`, plain Python loops over pairs) that the tests compare against.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from perception.ops.native import STRICT_FLAGS, Kernel, pointer, run_parts

# Distance matrices are built a few samples at a time so that b * M * N stays below this many elements.
_CHUNK_ELEMENTS = 1 << 24


def _check_pos(pos: Tensor) -> None:
    if pos.dim() != 3:
        raise ValueError(f"pos must be [B, N, D], got shape {tuple(pos.shape)}")


def _distance_chunks(target: Tensor, source: Tensor, exact: bool) -> Iterator[tuple[int, Tensor]]:
    """Yield (first sample, distances float[b, M, N] from targets to sources) over chunks of the batch."""
    batch, num_targets, _ = target.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, num_targets * source.shape[1]))
    # Differences (not |a|^2 + |b|^2 - 2ab) keep distances exact up to rounding, hence rotation invariant.
    mode = "donot_use_mm_for_euclid_dist" if exact else "use_mm_for_euclid_dist"
    for start in range(0, batch, step):
        yield (
            start,
            torch.cdist(target[start : start + step], source[start : start + step], compute_mode=mode),
        )


def _knn_indices(source: Tensor, target: Tensor, k: int, same: bool, loop: bool, exact: bool) -> Tensor:
    """long[B, M, k]: for each target point, its k nearest source points (indices within the sample)."""
    neighbours = []
    for _, dist in _distance_chunks(target.detach(), source.detach(), exact):
        if same and not loop:
            dist.diagonal(dim1=1, dim2=2).fill_(float("inf"))
        neighbours.append(smallest_k(dist, k))  # [b, M, k]
    return torch.cat(neighbours)


def smallest_k(dist: Tensor, k: int) -> Tensor:
    """long[..., k]: the indices of the k smallest entries along dist's last axis, nearest first. A C
    kernel for float32 CPU tensors (`smallest_k.c`: one pass per row that keeps the k best in order, ties to
    the lower index, 1.8x as fast as torch's `topk`, which took a fifth of a DGCNN step); `topk` for
    anything else (GPUs, float64, k > 256). `smallest_k_ref` is the reference the kernel is tested against."""
    lib = SMALLEST_K.library()
    cpu32 = dist.device.type == "cpu" and dist.dtype == torch.float32
    if not cpu32 or lib is None or dist.numel() == 0 or not 1 <= k <= min(_MAX_K, dist.shape[-1]):
        return dist.topk(k, dim=-1, largest=False).indices  # ties in topk's own order
    rows = dist.reshape(-1, dist.shape[-1]).contiguous()  # [R, n]
    out = torch.empty(rows.shape[0], k, dtype=torch.long)
    head = [ctypes.c_int64(rows.shape[1]), ctypes.c_int64(k)]
    pointers = [pointer(rows), pointer(out)]
    run_parts(lib.smallest_k, rows.shape[0], [*head, *pointers])
    return out.reshape(*dist.shape[:-1], k)


def smallest_k_ref(dist: Tensor, k: int) -> Tensor:
    """`smallest_k` by a stable sort (ties to the lower index): the kernel's reference."""
    return dist.sort(dim=-1, stable=True).indices[..., :k]


_MAX_K = 256  # the kernel's MAX_K
SMALLEST_K = Kernel(
    Path(__file__).with_name("smallest_k.c"),
    {
        "smallest_k": [
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
        ]
    },
    "using torch.topk",
)


def _knn(source: Tensor, target: Tensor, k: int, same: bool, loop: bool, exact: bool) -> Tensor:
    batch, num_targets, _ = target.shape
    idx = _knn_indices(source, target, k, same, loop, exact)  # [B, M, k]
    offsets = torch.arange(batch, device=idx.device) * source.shape[1]
    src = (idx + offsets[:, None, None]).reshape(-1)  # [B * M * k], over the flattened B*N sources
    dst = torch.arange(batch * num_targets, device=target.device).repeat_interleave(k)
    return torch.stack([src, dst])


def knn_graph(pos: Tensor, k: int, loop: bool = False, exact: bool = True) -> Tensor:
    """Edges from each point's k nearest neighbours (within its own sample) to the point.

    pos: float[B, N, D]. Returns long[2, B * N * k]: (neighbour, centre), grouped by centre in point order.
    With `loop`, a point counts as its own neighbour (distance 0). `exact=False` computes distances through a
    matrix product: faster in high-dimensional feature space, but rounding may reorder near-ties.
    """
    _check_pos(pos)
    available = pos.shape[1] if loop else pos.shape[1] - 1
    if not 1 <= k <= available:
        raise ValueError(f"k = {k} needs 1 <= k <= {available} for {pos.shape[1]} points (loop={loop})")
    return _knn(pos, pos, k, same=True, loop=loop, exact=exact)


def knn_indices(pos: Tensor, k: int, loop: bool = False, exact: bool = True) -> Tensor:
    """The kNN graph of `knn_graph` as dense indices: long[B, N, k], each point's k nearest neighbours
    (indices within its sample, nearest first). For models that gather neighbours as [B, N, k, C] tensors."""
    _check_pos(pos)
    available = pos.shape[1] if loop else pos.shape[1] - 1
    if not 1 <= k <= available:
        raise ValueError(f"k = {k} needs 1 <= k <= {available} for {pos.shape[1]} points (loop={loop})")
    return _knn_indices(pos, pos, k, same=True, loop=loop, exact=exact)


def knn(source: Tensor, target: Tensor, k: int, exact: bool = True) -> Tensor:
    """Bipartite edges from each target point's k nearest source points (same sample) to the target.

    source: float[B, N, D], target: float[B, M, D]. Returns long[2, B * M * k]: (source node over B*N,
    target node over B*M), grouped by target. A target that is also a source gets itself as a neighbour.
    """
    _check_pos(source)
    _check_pos(target)
    if source.shape[0] != target.shape[0] or source.shape[2] != target.shape[2]:
        raise ValueError(f"source {tuple(source.shape)} and target {tuple(target.shape)} differ in B or D")
    if not 1 <= k <= source.shape[1]:
        raise ValueError(f"k = {k} needs 1 <= k <= {source.shape[1]} source points")
    return _knn(source, target, k, same=False, loop=True, exact=exact)


def radius_graph(pos: Tensor, r: float, loop: bool = False) -> Tensor:
    """Edges between every pair of distinct points (within a sample) at distance <= r, with no neighbour cap.

    pos: float[B, N, D]. Returns long[2, E]: (neighbour, centre), sorted by centre then neighbour.
    """
    _check_pos(pos)
    if not r >= 0:
        raise ValueError(f"r = {r} must be >= 0")
    num_points = pos.shape[1]
    edges = []
    for start, dist in _distance_chunks(pos.detach(), pos.detach(), exact=True):
        within = dist <= r
        if not loop:
            within.diagonal(dim1=1, dim2=2).fill_(False)
        b, centre, neighbour = within.nonzero(as_tuple=True)
        offset = (b + start) * num_points
        edges.append(torch.stack([offset + neighbour, offset + centre]))
    return torch.cat(edges, dim=1)


def sum_by_target(messages: Tensor, edge_dst: Tensor, num_targets: int) -> Tensor:
    """The sum of each target's incoming messages: float[num_targets, C] from messages float[E, C] and their
    targets edge_dst long[E].

    Where the edges come grouped by target, k of them each, in target order (the layout of `knn_graph` and
    `knn`), the messages are a [num_targets, k, C] block summed over k, whose backward is a broadcast. The
    reference, `sum_by_target_ref`, scatters with `index_add_` (as `torch_geometric.utils.scatter` sums), and
    its backward gathers the gradient with `index_select`: a copy of every edge's row, which was the largest
    single cost of an e3nn training step. Both add each target's k messages in edge order, from the first.
    """
    k = grouped_neighbours(edge_dst, num_targets)
    if k:
        return _GroupedSum.apply(messages.view(num_targets, k, -1))  # [num_targets, C]
    return sum_by_target_ref(messages, edge_dst, num_targets)


def grouped_neighbours(edge_dst: Tensor, num_targets: int) -> int:
    """k where the edges' targets edge_dst long[E] are 0 k times, then 1 k times, ... (the layout of
    `knn_graph` and `knn`); 0 for any other layout."""
    k = edge_dst.shape[0] // num_targets if num_targets else 0
    if not k or k * num_targets != edge_dst.shape[0]:
        return 0
    grouped = torch.arange(num_targets, device=edge_dst.device).repeat_interleave(k)  # [E]
    return k if torch.equal(edge_dst, grouped) else 0


class _GroupedSum(torch.autograd.Function):
    """[T, k, C] -> [T, C], the k rows added one at a time in order, as `index_add_` adds them (torch's `sum`
    over k pairs them differently from k = 16 on, which rounds differently); the backward broadcasts."""

    @staticmethod
    def forward(ctx, grouped: Tensor) -> Tensor:
        ctx.k = grouped.shape[1]
        total = grouped[:, 0].clone()  # [T, C]
        for j in range(1, ctx.k):
            total += grouped[:, j]
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.unsqueeze(1).expand(-1, ctx.k, -1)  # [T, k, C], a view: no copy per edge


def sum_by_target_ref(messages: Tensor, edge_dst: Tensor, num_targets: int) -> Tensor:
    """`sum_by_target` for any edge order: `index_add_` into zeros."""
    return messages.new_zeros(num_targets, messages.shape[1]).index_add_(0, edge_dst, messages)


def farthest_point_sampling(pos: Tensor, m: int) -> Tensor:
    """Indices long[B, m] of m points per sample, each the farthest from those already chosen.

    The first point is the one farthest from the sample's centroid, so the choice depends only on the
    geometry: it is invariant to rotations, translations and the order of points (up to exact ties).
    """
    _check_pos(pos)
    batch, num_points, _ = pos.shape
    if not 1 <= m <= num_points:
        raise ValueError(f"m = {m} needs 1 <= m <= {num_points}")
    pos = pos.detach()
    centred = pos - pos.mean(dim=1, keepdim=True)
    current = centred.square().sum(-1).argmax(dim=1)  # [B]
    lib = FARTHEST_POINTS.library()
    if pos.device.type != "cpu" or pos.dtype != torch.float32 or pos.shape[2] != 3 or lib is None:
        return _farthest_points_torch(pos, current, m)
    pos = pos.contiguous()
    chosen = torch.empty(batch, m, dtype=torch.long)
    head = [ctypes.c_int64(num_points), ctypes.c_int64(m)]
    run_parts(lib.farthest_points, batch, [*head, pointer(pos), pointer(current), pointer(chosen)])
    return chosen


def _farthest_points_torch(pos: Tensor, first: Tensor, m: int) -> Tensor:
    """`farthest_point_sampling`'s loop in torch ops from the first picks first long[B]: GPUs, float64,
    machines without a compiler, and the kernel's test reference (the same picks, bit for bit)."""
    batch, num_points, _ = pos.shape
    rows = torch.arange(batch, device=pos.device)
    current = first
    chosen = torch.empty(batch, m, dtype=torch.long, device=pos.device)
    nearest = torch.full((batch, num_points), float("inf"), dtype=pos.dtype, device=pos.device)
    for step in range(m):
        chosen[:, step] = current
        # Squared distance from the newest pick to every point; keep each point's distance to the set.
        new = (pos - pos[rows, current][:, None]).square().sum(-1)  # [B, N]
        nearest = torch.minimum(nearest, new)
        current = nearest.argmax(dim=1)
    return chosen


FARTHEST_POINTS = Kernel(
    Path(__file__).with_name("farthest_points.c"),
    {
        "farthest_points": [
            ctypes.c_int64,
            ctypes.c_int64,
            *[ctypes.c_void_p] * 3,
            ctypes.c_int64,
            ctypes.c_int64,
        ]
    },
    "sampling farthest points with torch ops",
    flags=STRICT_FLAGS,
)


# Slow references: one pair at a time, for the tests.


def _sq_dist(a: Tensor, b: Tensor) -> float:
    return float(sum((float(x) - float(y)) ** 2 for x, y in zip(a.tolist(), b.tolist(), strict=True)))


def knn_graph_ref(pos: Tensor, k: int, loop: bool = False) -> set[tuple[int, int]]:
    """The kNN graph as a set of (neighbour, centre) node pairs, by sorting every pair's distance."""
    batch, num_points, _ = pos.shape
    edges: set[tuple[int, int]] = set()
    for b in range(batch):
        for i in range(num_points):
            others = [j for j in range(num_points) if loop or j != i]
            others.sort(key=lambda j: _sq_dist(pos[b, i], pos[b, j]))
            edges.update((b * num_points + j, b * num_points + i) for j in others[:k])
    return edges


def knn_ref(source: Tensor, target: Tensor, k: int) -> set[tuple[int, int]]:
    """The bipartite kNN graph as a set of (source node, target node) pairs, by sorting every pair."""
    batch, num_targets, _ = target.shape
    num_sources = source.shape[1]
    edges: set[tuple[int, int]] = set()
    for b in range(batch):
        for i in range(num_targets):
            order = sorted(range(num_sources), key=lambda j: _sq_dist(target[b, i], source[b, j]))
            edges.update((b * num_sources + j, b * num_targets + i) for j in order[:k])
    return edges


def radius_graph_ref(pos: Tensor, r: float, loop: bool = False) -> set[tuple[int, int]]:
    """The radius graph as a set of (neighbour, centre) node pairs, testing every pair."""
    batch, num_points, _ = pos.shape
    return {
        (b * num_points + j, b * num_points + i)
        for b in range(batch)
        for i in range(num_points)
        for j in range(num_points)
        if (loop or i != j) and _sq_dist(pos[b, i], pos[b, j]) <= r * r
    }


def farthest_point_sampling_ref(pos: Tensor, m: int) -> list[list[int]]:
    """Farthest point sampling one sample and one point at a time."""
    result = []
    for cloud in pos:
        centroid = cloud.mean(dim=0)
        first = max(range(len(cloud)), key=lambda i: _sq_dist(cloud[i], centroid))
        picks = [first]
        nearest = [_sq_dist(p, cloud[first]) for p in cloud]
        while len(picks) < m:
            nxt = max(range(len(cloud)), key=lambda i: nearest[i])
            picks.append(nxt)
            nearest = [min(d, _sq_dist(p, cloud[nxt])) for d, p in zip(nearest, cloud, strict=True)]
        result.append(picks)
    return result
