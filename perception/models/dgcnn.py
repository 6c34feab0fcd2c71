"""DGCNN: EdgeConv on k-nearest-neighbour graphs rebuilt in feature space at every layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from perception.models.registry import check
from perception.ops.graphs import farthest_point_sampling, knn_graph, knn_indices
from perception.ops.neighbour_reduce import neighbour_max_sum


def _edge_mlp(c_in: int, c_out: int) -> nn.Sequential:
    """h([x_i, x_j - x_i]) of one EdgeConv: Linear-BN-LeakyReLU(0.2) on each edge, as in the paper."""
    return nn.Sequential(nn.Linear(2 * c_in, c_out, bias=False), nn.BatchNorm1d(c_out), nn.LeakyReLU(0.2))


def _edge_statistics(
    centre: Tensor, neighbour: Tensor, neighbour_sum: Tensor, sources: Tensor
) -> tuple[Tensor, Tensor]:
    """Mean and biased variance [C] over every edge `e_ij = centre_i + neighbour_j` of the graph `sources`,
    from [B, N, C]-sized sums: each neighbour's term weighted by how often it is one, and the cross term
    through the sum over each point's neighbours. `torch.var_mean` over the edges' rows took longer than the
    whole block. Both parts are centred first, so the squares do not cancel.

    centre [B, N, C]; neighbour [B*N, C]; neighbour_sum [B, N, C], each point's sum over its neighbours'
    rows; sources long[B, N, k], each edge's neighbour among the B*N."""
    k = sources.shape[2]
    total = sources.numel()  # B*N*k edges
    uses = torch.bincount(sources.reshape(-1), minlength=neighbour.shape[0]).to(neighbour.dtype)[:, None]
    centre_mean = centre.mean(dim=(0, 1))  # [C]
    neighbour_mean = (uses * neighbour).sum(dim=0) / total  # [C]: over edges, not points
    centred = centre - centre_mean  # [B, N, C]
    around = neighbour_sum - k * neighbour_mean  # [B, N, C]: sum_j (neighbour_j - its mean)
    var = (
        k * centred.square().sum(dim=(0, 1))
        + 2 * (centred * around).sum(dim=(0, 1))
        + (uses * (neighbour - neighbour_mean).square()).sum(dim=0)
    ) / total
    return centre_mean + neighbour_mean, var


@torch.no_grad()
def _track_statistics(norm: nn.BatchNorm1d, mean: Tensor, var: Tensor, count: int) -> None:
    """BatchNorm1d's running statistics after a training batch of `count` rows with this mean and (biased)
    variance, as `nn.BatchNorm1d.forward` keeps them: the running variance is the unbiased one."""
    tracked = norm.num_batches_tracked
    if norm.running_mean is None or norm.running_var is None or tracked is None:
        return
    tracked += 1
    momentum = 1.0 / float(tracked) if norm.momentum is None else norm.momentum
    norm.running_mean.lerp_(mean, momentum)
    norm.running_var.lerp_(var * count / max(count - 1, 1), momentum)


class EdgeWeights(nn.Module):
    """One EdgeConv's parameters, h as `nn`, without importing torch_geometric: the name and the initial
    weights that `torch_geometric.nn.EdgeConv(h)` gives them, so state_dict keys (`conv.nn.*`) and a seed's
    initial weights are a block built on EdgeConv's. Its constructor resets h's layers once more (drawing the
    linear layer's weights a second time); this does the same. Building EdgeConv in every trial's worker cost
    the ~1 s import and left one generated module file in the temporary folder per process."""

    def __init__(self, h: nn.Sequential) -> None:
        super().__init__()
        self.nn = h
        for layer in h:  # torch_geometric.nn.inits.reset(h)
            reset = getattr(layer, "reset_parameters", None)
            if callable(reset):
                reset()

    @property
    def parts(self) -> tuple[nn.Linear, nn.BatchNorm1d, nn.Module]:
        """h's linear layer, BatchNorm and activation."""
        linear, norm, act = self.nn
        return cast(nn.Linear, linear), cast(nn.BatchNorm1d, norm), act


class DynamicEdgeBlock(nn.Module):
    """EdgeConv (max over neighbours) on the kNN graph of this block's own input features.

    `forward` computes EdgeConv per point: the edge MLP's linear layer on [x_i, x_j - x_i] is
    `W_c x_i + W_d (x_j - x_i) = (W_c - W_d) x_i + W_d x_j`, so it runs once per point rather than once per
    edge. BatchNorm then LeakyReLU is monotonic in each channel (increasing where BatchNorm's weight is
    positive, decreasing where negative), so the max over neighbours of the activated edges is the activation
    of the max (or the min) of the raw edges: the max comes first, and BatchNorm and LeakyReLU run on
    [B, N, C] rather than on every edge, with BatchNorm's statistics still taken over every edge. The max of
    `centre_i + neighbour_j` over j is `centre_i` plus the max of the neighbours' rows, which
    `perception.ops.neighbour_reduce` takes (with their sum, for the statistics) without gathering a
    [B, N, k, C] tensor. `forward_per_edge` keeps the per-edge order, and `forward_ref` is the same block
    through `torch_geometric.nn.EdgeConv` on an edge list: the slow references the tests compare against.
    """

    def __init__(self, c_in: int, c_out: int, k: int) -> None:
        super().__init__()
        self.k = k
        self.conv = EdgeWeights(_edge_mlp(c_in, c_out))

    def _edge_parts(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The linear layer's two parts, centre [B, N, c_out] and neighbour [B*N, c_out], and each point's
        neighbours among the B*N points, long[B, N, k]: edge (i, j) is centre_i + neighbour_j."""
        batch, num_points, channels = x.shape
        # A matrix-product distance is fine here: features have no symmetry to preserve beyond point order.
        idx = knn_indices(x, self.k, loop=True, exact=channels <= 3)  # [B, N, k]
        w_centre, w_diff = self.conv.parts[0].weight.split(channels, dim=1)  # each [c_out, C]
        centre = x @ (w_centre - w_diff).T  # [B, N, c_out]
        neighbour = (x @ w_diff.T).reshape(batch * num_points, -1)  # [B*N, c_out]
        offsets = torch.arange(batch, device=x.device)[:, None, None] * num_points
        return centre, neighbour, idx + offsets

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, N, C]; the graph is rebuilt from x (coordinates for the first block, features after that).
        _, norm, act = self.conv.parts
        centre, neighbour, sources = self._edge_parts(x)
        # Each channel times the sign of its BatchNorm weight, so that one max serves both directions.
        sign = torch.where(norm.weight < 0, -1.0, 1.0).to(x.dtype).detach()  # [c_out]
        centre, neighbour = centre * sign, neighbour * sign
        # max_j (centre_i + neighbour_j) = centre_i + max_j neighbour_j: no [B, N, k, c_out] edge tensor
        top, neighbour_sum = neighbour_max_sum(neighbour, sources.reshape(-1, self.k))  # each [B*N, c_out]
        top, neighbour_sum = top.view_as(centre), neighbour_sum.view_as(centre)  # [B, N, c_out]
        if norm.training or norm.running_mean is None or norm.running_var is None:  # the batch's statistics
            mean, var = _edge_statistics(centre, neighbour, neighbour_sum, sources)
            mean = mean * sign  # the unsigned edges' mean; the variance is the same
            _track_statistics(norm, mean.detach(), var.detach(), sources.numel())
        else:
            mean, var = norm.running_mean, norm.running_var
        extreme = (centre + top) * sign  # [B, N, c_out]: the max, or the min where sign < 0
        return act((extreme - mean) * torch.rsqrt(var + norm.eps) * norm.weight + norm.bias)  # [B, N, c_out]

    def forward_per_edge(self, x: Tensor) -> Tensor:
        """`forward` in EdgeConv's own order, BatchNorm and LeakyReLU on every edge and then the max: what
        `forward` did before it took the max first (`benchmarks.epoch` times it as "before")."""
        _, norm, act = self.conv.parts
        centre, neighbour, sources = self._edge_parts(x)
        edges = centre[:, :, None, :] + neighbour[sources]  # [B, N, k, c_out]
        edges = act(norm(edges.reshape(-1, edges.shape[-1])))  # [B*N*k, c_out]
        return edges.reshape(*sources.shape, -1).max(dim=2).values  # [B, N, c_out]

    def forward_ref(self, x: Tensor) -> Tensor:
        # Imported here: torch_geometric takes ~1-2 s to import (it loads torch._dynamo and pandas), which no
        # trial's worker needs. EdgeConv gets the block's own h after its constructor, which would redraw it.
        from torch_geometric.nn import EdgeConv

        conv = EdgeConv(nn.Identity(), aggr="max")
        conv.nn = self.conv.nn
        batch, num_points, channels = x.shape
        edge_index = knn_graph(x, self.k, loop=True, exact=channels <= 3)
        out = conv(x.reshape(batch * num_points, channels), edge_index)  # [B*N, c_out]
        return out.reshape(batch, num_points, -1)


@dataclass(frozen=True)
class DGCNNConfig:
    num_classes: int = 8
    dim: int = 256  # width of the per-point embedding that is pooled; 1024 in the paper
    depth: int = 4  # EdgeConv blocks, widths width * (1, 1, 2, 4, 8, ...); the paper: 4 of 64, 64, 128, 256
    width: int = 32  # width of the first EdgeConv block
    k: int = 10  # neighbours per point, the point itself included; 20 in the paper
    num_points: int = 256  # points kept by farthest point sampling before the first block; 0 keeps all
    dropout: float = 0.5  # in the head, as in the paper

    def __post_init__(self) -> None:
        check(isinstance(self.num_classes, int) and self.num_classes >= 2, self, "num_classes", "an int >= 2")
        check(isinstance(self.dim, int) and self.dim >= 4, self, "dim", "an int >= 4")
        check(isinstance(self.depth, int) and self.depth >= 1, self, "depth", "an int >= 1")
        check(isinstance(self.width, int) and self.width >= 1, self, "width", "an int >= 1")
        check(isinstance(self.k, int) and self.k >= 1, self, "k", "an int >= 1")
        check(
            isinstance(self.num_points, int) and (self.num_points == 0 or self.num_points >= self.k),
            self,
            "num_points",
            "0 (keep all points) or an int >= k",
        )
        check(
            isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1,
            self,
            "dropout",
            "a number in [0, 1)",
        )

    @property
    def widths(self) -> list[int]:
        return [self.width * 2 ** max(0, i - 1) for i in range(self.depth)]


SIZES: dict[str, dict] = {
    "tiny": {"dim": 256, "depth": 4, "width": 32, "k": 10, "num_points": 128},
    "small": {"dim": 512, "depth": 4, "width": 64, "k": 20, "num_points": 0},
    "base": {"dim": 1024, "depth": 4, "width": 64, "k": 20, "num_points": 0},
}


class DGCNN(nn.Module):
    r"""The DGCNN classifier from `"Dynamic Graph CNN for Learning on Point Clouds"
    <https://arxiv.org/abs/1801.07829>`_ (Wang et al. 2019), with `torch_geometric.nn.EdgeConv`.

    Input float32[B, N, 3] (N >= k), output logits [B, num_classes]. Each block links every point to its k
    nearest neighbours in the block's input space (xyz first, learned features after: the "dynamic" graph) and
    applies EdgeConv, `max_j h([x_i, x_j - x_i])`. The blocks' outputs are concatenated, embedded to `dim` per
    point, pooled by max and mean over points and classified by an MLP. Invariant to the order of points;
    not to rotations. `num_points` > 0 first subsamples by farthest point sampling (a CPU-speed option).
    """

    def __init__(self, config: DGCNNConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        widths = c.widths
        self.blocks = nn.ModuleList(
            DynamicEdgeBlock(c_in, c_out, c.k) for c_in, c_out in zip([3] + widths[:-1], widths, strict=True)
        )
        self.embed = nn.Sequential(
            nn.Linear(sum(widths), c.dim, bias=False), nn.BatchNorm1d(c.dim), nn.LeakyReLU(0.2)
        )
        hidden = [2 * c.dim, c.dim // 2, c.dim // 4]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(hidden[:-1], hidden[1:], strict=True):
            layers += [nn.Linear(c_in, c_out, bias=False), nn.BatchNorm1d(c_out), nn.LeakyReLU(0.2)]
            layers.append(nn.Dropout(c.dropout))
        self.head = nn.Sequential(*layers, nn.Linear(hidden[-1], c.num_classes))

    def forward(self, pos: Tensor) -> Tensor:
        if 0 < self.config.num_points < pos.shape[1]:
            idx = farthest_point_sampling(pos, self.config.num_points)  # [B, M]
            pos = torch.gather(pos, 1, idx[..., None].expand(-1, -1, 3))  # [B, M, 3]
        features, x = [], pos
        for block in self.blocks:
            x = block(x)  # [B, N, width_i]
            features.append(x)
        batch, num_points, _ = x.shape
        x = torch.cat(features, dim=2).reshape(batch * num_points, -1)  # [B*N, sum(widths)]
        x = self.embed(x).reshape(batch, num_points, -1)  # [B, N, dim]
        pooled = torch.cat([x.amax(dim=1), x.mean(dim=1)], dim=1)  # [B, 2 * dim]
        return self.head(pooled)
