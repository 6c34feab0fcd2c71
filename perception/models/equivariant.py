"""An SO(3)-equivariant point-cloud classifier built from e3nn tensor-product convolutions.

The logits are invariant to rotations (and reflections), translations and the order of points, by
construction rather than by augmentation: centred positions, a neighbour graph that depends only on distances,
spherical-harmonic edge attributes, gated equivariant nonlinearities and pooling of scalar features only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from e3nn import o3
from e3nn.math import soft_one_hot_linspace
from e3nn.nn import FullyConnectedNet, Gate
from torch import Tensor, nn
from torch.nn.utils import parametrize

from perception.models.registry import check
from perception.ops.graphs import farthest_point_sampling, knn, knn_graph
from perception.ops.tensor_product import UVUTerms, tensor_product_sum


class PointConvolution(nn.Module):
    """Tensor-product convolution: `(sc(x_i) + lin2(mean_j TP(lin1(x_j), Y(r_ij), w(|r_ij|)))) / sqrt(2)`.

    The message from neighbour j couples its features with the spherical harmonics Y of the edge vector; the
    tensor product's weights come from a radial network on the edge length, so they are rotation invariant.
    `sc` is a linear self-connection from the targets' own features, whose irreps (`irreps_dst`) may differ
    from the sources' in a bipartite graph (default: the same). As in e3nn's `gate_points_2102` (without
    its node attributes), except that messages are averaged over the `num_neighbors` edges of each target
    (a kNN graph: exactly k) rather than summed and divided by sqrt(num_neighbors): nearby neighbours send
    similar messages, and the sum grew activations 2-3x per layer. The 1/sqrt(2) keeps the residual sum at
    the scale of its terms.
    """

    def __init__(
        self,
        irreps_in: str | o3.Irreps,
        irreps_sh: str | o3.Irreps,
        irreps_out: str | o3.Irreps,
        num_basis: int,
        radial_hidden: int,
        num_neighbors: float,
        irreps_dst: str | o3.Irreps | None = None,
    ) -> None:
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_dst = self.irreps_in if irreps_dst is None else o3.Irreps(irreps_dst)
        self.irreps_sh = o3.Irreps(irreps_sh)
        self.irreps_out = o3.Irreps(irreps_out)
        self.num_neighbors = num_neighbors

        self.sc = o3.Linear(self.irreps_dst, self.irreps_out)
        self.lin1 = o3.Linear(self.irreps_in, self.irreps_in)
        # One "uvu" path (channel-wise, weights per edge) for each output irrep that irreps_out can hold.
        irreps_mid: list[tuple[int, Any]] = []
        instructions: list[tuple[int, int, int, str, bool]] = []
        for i, (mul, ir_in) in enumerate(self.irreps_in):
            for j, (_, ir_edge) in enumerate(self.irreps_sh):
                for ir_out in ir_in * ir_edge:
                    if ir_out in self.irreps_out:
                        instructions.append((i, j, len(irreps_mid), "uvu", True))
                        irreps_mid.append((mul, ir_out))
        mid, perm, _ = o3.Irreps(irreps_mid).sort()
        instructions = [(i, j, perm[k], mode, train) for i, j, k, mode, train in instructions]
        self.tp = o3.TensorProduct(
            self.irreps_in,
            self.irreps_sh,
            mid,
            instructions,
            internal_weights=False,
            shared_weights=False,
        )
        self.tp_terms = UVUTerms(self.tp)  # the same product as a list of terms, for the fused CPU kernel
        self.radial = FullyConnectedNet(
            [num_basis, radial_hidden, self.tp.weight_numel], torch.nn.functional.silu
        )
        self.lin2 = o3.Linear(mid.simplify(), self.irreps_out)

    def forward(
        self,
        x: Tensor,
        edge_src: Tensor,
        edge_dst: Tensor,
        edge_sh: Tensor,
        edge_len_emb: Tensor,
        x_dst: Tensor | None = None,
    ) -> Tensor:
        """x: source features [n_src, irreps_in.dim]; x_dst: target features if the graph is bipartite."""
        x_dst = x if x_dst is None else x_dst
        weight = self.radial(edge_len_emb)  # [E, tp.weight_numel]
        # Each target's sum of its incoming messages TP(...) [E, mid], as torch_geometric.utils.scatter(
        # reduce="sum") computes it (without its 2 s import in every trial's worker); the fused kernel sums
        # them as it makes them.
        aggregated = tensor_product_sum(
            self.tp, self.tp_terms, self.lin1(x)[edge_src], edge_sh, weight, edge_dst, x_dst.shape[0]
        )  # [n_dst, mid]
        return (self.sc(x_dst) + self.lin2(aggregated / self.num_neighbors)) / math.sqrt(2)


class GatedConvolution(nn.Module):
    """A `PointConvolution` followed by an `e3nn.nn.Gate`: SiLU on scalars, sigmoid gates scaling each l > 0.

    irreps_out must be scalars `0e` followed by the gated irreps; the convolution also makes one gate scalar
    per gated irrep.
    """

    def __init__(
        self,
        irreps_in: str | o3.Irreps,
        irreps_sh: str | o3.Irreps,
        irreps_out: str | o3.Irreps,
        num_basis: int,
        radial_hidden: int,
        num_neighbors: float,
        irreps_dst: str | o3.Irreps | None = None,
    ) -> None:
        super().__init__()
        irreps_out = o3.Irreps(irreps_out)
        scalars = o3.Irreps([(mul, ir) for mul, ir in irreps_out if ir.l == 0])
        gated = o3.Irreps([(mul, ir) for mul, ir in irreps_out if ir.l > 0])
        gates = o3.Irreps(f"{gated.num_irreps}x0e")
        self.gate = Gate(scalars, [torch.nn.functional.silu], gates, [torch.sigmoid], gated)
        self.conv = PointConvolution(
            irreps_in, irreps_sh, self.gate.irreps_in, num_basis, radial_hidden, num_neighbors, irreps_dst
        )
        self.irreps_in = self.conv.irreps_in
        self.irreps_dst = self.conv.irreps_dst
        self.irreps_out = self.gate.irreps_out

    def forward(
        self,
        x: Tensor,
        edge_src: Tensor,
        edge_dst: Tensor,
        edge_sh: Tensor,
        edge_len_emb: Tensor,
        x_dst: Tensor | None = None,
    ) -> Tensor:
        return self.gate(self.conv(x, edge_src, edge_dst, edge_sh, edge_len_emb, x_dst))


class Gain(nn.Module):
    """A parametrisation `weight = gain * stored`: same function, `gain` times larger optimizer steps.

    e3nn stores its weights as N(0, 1) and divides by sqrt(fan-in) in forward, where torch's layers store
    U(+-1/sqrt(fan-in)). Adam moves every stored weight by about lr per step, so e3nn weights change
    ~sqrt(fan-in) times slower, relative to their size, than a torch layer's: at lr 1e-3 our tiny model
    reached 52% on the study's data in 10 epochs, against 93-100% with this gain at lr 1e-3 to 1e-2.
    """

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.gain = gain

    def forward(self, stored: Tensor) -> Tensor:
        return stored * self.gain

    def right_inverse(self, weight: Tensor) -> Tensor:
        return weight / self.gain


@dataclass(frozen=True)
class E3nnConfig:
    num_classes: int = 8
    dim: int = 16  # scalar (0e) channels of the hidden features, and the width of the head
    mul: int = 8  # channels of each l > 0 irrep of the hidden features
    depth: int = 2  # gated convolutions; one more convolution maps to `dim` scalars before pooling
    lmax: int = 2  # highest degree of the spherical harmonics and of the hidden irreps
    k: int = 16  # neighbours of each sampled point among the sampled points
    k_input: int = 16  # neighbours of each sampled point among all input points, for the first layer
    num_points: int = 128  # points kept by farthest point sampling inside the model; 0 keeps all
    num_basis: int = 8  # radial basis functions on edge lengths (and on distances to the centroid)
    radial_hidden: int = 32  # hidden width of each radial network
    max_radius: float = 1.0  # edges longer than this contribute nothing (smoothly): clouds lie in a unit ball
    weight_gain: float = 10.0  # e3nn weights are stored divided by this, so Adam moves them faster: see Gain
    local_shape: bool = True  # centres get their neighbourhood's covariance: 4 invariants (0e) and 1x2e
    global_invariants: bool = True  # the head gets the cloud's covariance spectrum, radial and D2 histograms
    global_frame: bool = True  # centres get 3 invariants of their place and shape in the cloud's own axes

    def __post_init__(self) -> None:
        check(isinstance(self.num_classes, int) and self.num_classes >= 2, self, "num_classes", "an int >= 2")
        check(isinstance(self.dim, int) and self.dim >= 1, self, "dim", "an int >= 1")
        check(isinstance(self.mul, int) and self.mul >= 1, self, "mul", "an int >= 1")
        check(isinstance(self.depth, int) and self.depth >= 1, self, "depth", "an int >= 1")
        check(isinstance(self.lmax, int) and 1 <= self.lmax <= 4, self, "lmax", "an int in [1, 4]")
        check(isinstance(self.k, int) and self.k >= 1, self, "k", "an int >= 1")
        check(isinstance(self.k_input, int) and self.k_input >= 1, self, "k_input", "an int >= 1")
        check(
            isinstance(self.num_points, int) and (self.num_points == 0 or self.num_points > self.k),
            self,
            "num_points",
            "0 (keep all points) or an int > k",
        )
        check(isinstance(self.num_basis, int) and self.num_basis >= 2, self, "num_basis", "an int >= 2")
        check(
            isinstance(self.radial_hidden, int) and self.radial_hidden >= 1,
            self,
            "radial_hidden",
            "an int >= 1",
        )
        check(
            isinstance(self.max_radius, (int, float)) and self.max_radius > 0,
            self,
            "max_radius",
            "a number > 0",
        )
        check(
            isinstance(self.weight_gain, (int, float)) and self.weight_gain > 0,
            self,
            "weight_gain",
            "a number > 0 (1 keeps e3nn's own parametrisation)",
        )
        check(isinstance(self.local_shape, bool), self, "local_shape", "a bool")
        check(isinstance(self.global_invariants, bool), self, "global_invariants", "a bool")
        check(isinstance(self.global_frame, bool), self, "global_frame", "a bool")

    @property
    def num_centre_invariants(self) -> int:
        """Invariant (0e) inputs of the centres besides the radial code: local shape 4, global frame 3."""
        return 4 * self.local_shape + 3 * self.global_frame

    @property
    def num_global_invariants(self) -> int:
        """Invariants of the whole cloud given to the head: 3 covariance eigenvalues, 2 histograms."""
        return 3 + 2 * self.num_basis if self.global_invariants else 0

    @property
    def irreps_hidden(self) -> o3.Irreps:
        """`dim` scalars, then `mul` copies of each degree 1..lmax with its natural parity (1o, 2e, 3o...)."""
        return o3.Irreps(f"{self.dim}x0e") + o3.Irreps(
            [(self.mul, (degree, (-1) ** degree)) for degree in range(1, self.lmax + 1)]
        )


SIZES: dict[str, dict] = {
    "tiny": {"dim": 16, "mul": 8, "depth": 2, "lmax": 2, "k": 8, "k_input": 16, "num_points": 64},
    "small": {"dim": 32, "mul": 16, "depth": 3, "lmax": 2, "k": 16, "k_input": 24, "num_points": 256},
    "base": {"dim": 64, "mul": 32, "depth": 4, "lmax": 3, "k": 24, "k_input": 32, "num_points": 512},
}


D2_CENTRES = 32  # centres whose pairwise distances make the D2 histogram


class PointGraph(NamedTuple):
    """What `E3nnNet.preprocess` builds from a batch of clouds; everything after it is message passing."""

    points: Tensor  # [B, N, 3] the input points, centred
    centres: Tensor  # [B, M, 3] the points kept by farthest point sampling (M = N when none are dropped)
    down: Tensor  # [2, B*M*k_input] edges from input points (over B*N) to their nearest centres (over B*M)
    edges: Tensor  # [2, B*M*k] edges between centres: each centre's k nearest others


class E3nnNet(nn.Module):
    r"""An E(3)-invariant point-cloud classifier of gated tensor-product convolutions, in the style of
    `"Tensor field networks: Rotation- and translation-equivariant neural networks for 3D point clouds"
    <https://arxiv.org/abs/1802.08219>`_ (Thomas et al. 2018) as implemented by `"e3nn: Euclidean Neural
    Networks" <https://arxiv.org/abs/2207.09453>`_ (Geiger and Smidt 2022; its `gate_points` models).

    Input float32[B, N, 3] (N > k), output logits [B, num_classes]. `preprocess` centres the cloud, keeps
    `num_points` centres by farthest point sampling (from the point farthest from the centroid), and links
    each centre to its `k_input` nearest input points and its `k` nearest other centres. Node inputs are a
    radial embedding of the distance to the centroid (0e) and the centred position (1o); with `local_shape`,
    each centre also gets the covariance of its `k_input` input neighbours: its eigenvalues over their sum,
    its size against the cloud's mean (4x0e: edge, face or corner, fine or coarse) and its traceless part
    (1x2e: the orientation of that local shape); with `global_frame`, 3 invariants of where the centre and its
    neighbourhood lie along the cloud's own principal axes (see `_frame_invariants`): what a model fed raw
    coordinates reads off the canonical pose, without needing one. The first gated convolution gathers the
    fine local shape of every input point onto the centres; the next ones run on the centres' graph; a last
    convolution keeps `dim` scalars, pooled (mean and max over centres) into an MLP head. With
    `global_invariants`, the head also gets invariants of the whole cloud: the eigenvalues of its covariance,
    and soft histograms of the distances to the centroid and between centres (Osada et al.'s D2 shape
    distribution). Each convolution is a tensor product of neighbour features with the spherical harmonics (up
    to `lmax`) of the edge vector, weighted by a radial network on the edge length, then `e3nn.nn.Gate`. Every
    step is equivariant and the graphs depend only on distances, so the logits are invariant to rotations,
    reflections, translations and point order, up to rounding (and exact distance ties). It computes in
    float32 (or float64) even under bf16 autocast.
    """

    def __init__(self, config: E3nnConfig) -> None:
        super().__init__()
        self.config = config
        self.irreps_sh = o3.Irreps.spherical_harmonics(config.lmax)
        self.irreps_in = o3.Irreps(f"{config.num_basis}x0e + 1x1o")
        # Centres' inputs: the radial code and the local-shape and frame invariants (0e), the position (1o),
        # the local 2e tensor.
        self.irreps_centre = o3.Irreps(f"{config.num_basis + config.num_centre_invariants}x0e + 1x1o") + (
            o3.Irreps("1x2e") if config.local_shape else o3.Irreps("")
        )
        self.irreps_hidden = config.irreps_hidden
        self.irreps_out = o3.Irreps(f"{config.dim}x0e")

        radial = (config.num_basis, config.radial_hidden)
        self.down = GatedConvolution(
            self.irreps_in, self.irreps_sh, self.irreps_hidden, *radial, config.k_input, self.irreps_centre
        )
        layers: list[nn.Module] = []
        for _ in range(config.depth - 1):
            layers.append(
                GatedConvolution(self.irreps_hidden, self.irreps_sh, self.irreps_hidden, *radial, config.k)
            )
        layers.append(
            PointConvolution(self.irreps_hidden, self.irreps_sh, self.irreps_out, *radial, config.k)
        )
        self.layers = nn.ModuleList(layers)
        head_in = 2 * config.dim + config.num_global_invariants
        self.head = nn.Sequential(
            nn.Linear(head_in, config.dim), nn.SiLU(), nn.Linear(config.dim, config.num_classes)
        )
        if config.weight_gain != 1:  # every e3nn weight (radial networks, linear maps); not the torch head
            e3nn_weights = [
                (sub, name)
                for module in [self.down, *self.layers]
                for sub in module.modules()
                for name, _ in sub.named_parameters(recurse=False)
            ]
            for sub, name in e3nn_weights:
                parametrize.register_parametrization(sub, name, Gain(config.weight_gain))

    def preprocess(self, pos: Tensor) -> PointGraph:
        """Centre, subsample and link, from distances only (no gradients flow through the choices)."""
        points = pos - pos.mean(dim=1, keepdim=True)  # translation invariance
        centres = points
        if 0 < self.config.num_points < points.shape[1]:
            idx = farthest_point_sampling(points, self.config.num_points)  # [B, M]
            centres = torch.gather(points, 1, idx[..., None].expand(-1, -1, 3))  # [B, M, 3]
        down = knn(points, centres, min(self.config.k_input, points.shape[1]))
        return PointGraph(points, centres, down, knn_graph(centres, self.config.k))

    def _edge_attributes(self, src_pos: Tensor, dst_pos: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        """Spherical harmonics [E, irreps_sh.dim] and radial embedding [E, num_basis] of each edge vector."""
        cfg = self.config
        edge_vec = src_pos[edge_index[0]] - dst_pos[edge_index[1]]  # [E, 3], from target to source
        edge_sh = o3.spherical_harmonics(self.irreps_sh, edge_vec, normalize=True, normalization="component")
        edge_len_emb = soft_one_hot_linspace(
            edge_vec.norm(dim=1), 0.0, cfg.max_radius, cfg.num_basis, basis="smooth_finite", cutoff=True
        ).mul(cfg.num_basis**0.5)  # zero at 0 and beyond max_radius: long edges fade out smoothly
        return edge_sh, edge_len_emb

    def _node_inputs(self, pos: Tensor) -> Tensor:
        """[n, irreps_in.dim]: a radial code of the distance to the centroid (0e), then the position (1o)."""
        cfg = self.config
        radius_emb = soft_one_hot_linspace(
            pos.norm(dim=1), 0.0, cfg.max_radius, cfg.num_basis, basis="gaussian", cutoff=False
        ).mul(cfg.num_basis**0.5)
        return torch.cat([radius_emb, pos], dim=1)

    def _local_shape(self, points: Tensor, down: Tensor, batch: int) -> tuple[Tensor, Tensor, Tensor]:
        """The covariance of each centre's input neighbours (its `down` sources) over its trace, as
        invariants [B*M, 4] (its eigenvalues, ascending, summing to 1; the root of its trace over the cloud's
        mean), as 2e [B*M, 5] (its traceless part: degree-2 spherical harmonics are quadratic forms, so their
        mean over the offsets is that part in e3nn's basis) and as the matrix [B*M, 3, 3]."""
        k = min(self.config.k_input, points.shape[0] // batch)  # as `preprocess` linked them
        neighbours = points[down[0]].reshape(-1, k, 3)  # [B*M, k, 3], grouped by centre
        offsets = (neighbours - neighbours.mean(dim=1, keepdim=True)).detach()  # [B*M, k, 3]
        cov = offsets.transpose(1, 2) @ offsets / k  # [B*M, 3, 3]
        trace = cov.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-12)  # [B*M]
        eigen = torch.linalg.eigvalsh(cov) / trace[:, None]  # [B*M, 3], ascending, summing to 1
        size = trace.sqrt().reshape(batch, -1)  # [B, M]
        size = (size / size.mean(dim=1, keepdim=True).clamp_min(1e-12)).reshape(-1, 1)  # [B*M, 1]
        quadric = o3.spherical_harmonics("2e", offsets, normalize=False, normalization="component")
        quadric = quadric.mean(dim=1) / trace[:, None]  # [B*M, 5]
        return torch.cat([eigen, size], dim=1), quadric, cov / trace[:, None, None]

    @staticmethod
    def _frame_invariants(points: Tensor, centres: Tensor, local: Tensor | None) -> Tensor:
        """[B*M, 3]: where each centre lies, and how its neighbourhood lies, along the cloud's principal axes.

        With C the covariance of the (centred) cloud over its trace and p a centre: 3 p^T C p and 9 p^T C^2 p
        (both |p|^2 for a round cloud), and 3 tr(S C) with S the centre's local covariance over its trace (1
        for a round cloud; 0 without `local`). Polynomials in the coordinates, so exactly invariant without an
        eigendecomposition, whose axes would jump where two eigenvalues (nearly) tie.
        """
        points = points.detach()
        batch, num_centres, _ = centres.shape
        cov = points.transpose(1, 2) @ points  # [B, 3, 3]: the points are centred
        cov = cov / cov.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-12)[:, None, None]
        p = centres.detach()  # [B, M, 3]
        cp = p @ cov  # [B, M, 3]: C is symmetric
        first = 3 * (cp * p).sum(-1)  # [B, M]
        second = 9 * (cp * cp).sum(-1)  # [B, M]
        if local is None:
            third = torch.zeros_like(first)
        else:
            local = local.reshape(batch, num_centres, 3, 3)
            third = 3 * (local * cov[:, None]).sum(dim=(-1, -2))  # [B, M]
        return torch.stack([first, second, third], dim=-1).reshape(-1, 3)

    def _global_invariants(self, points: Tensor, centres: Tensor) -> Tensor:
        """[B, 3 + 2 * num_basis]: covariance eigenvalues of the cloud, soft histograms of the points'
        distances to the centroid (over [0, max_radius]) and of the distances between the first
        D2_CENTRES centres (over [0, 2 max_radius]; farthest point sampling puts them all over the
        shape, and all M^2 pairs cost more than the convolutions)."""
        cfg = self.config
        points, centres = points.detach(), centres.detach()
        cov = points.transpose(1, 2) @ points / points.shape[1]  # [B, 3, 3]: the points are centred
        eigen = 3 * torch.linalg.eigvalsh(cov)  # [B, 3]; a unit sphere's are 1 each
        radial = soft_one_hot_linspace(
            points.norm(dim=-1), 0.0, cfg.max_radius, cfg.num_basis, basis="gaussian", cutoff=False
        ).mean(dim=1)  # [B, num_basis]
        spread = centres[
            :, :D2_CENTRES
        ]  # [B, m, 3]: the first centres of farthest point sampling, spread out
        pairwise = (spread[:, :, None] - spread[:, None]).norm(dim=-1)  # [B, m, m]
        d2 = soft_one_hot_linspace(
            pairwise, 0.0, 2 * cfg.max_radius, cfg.num_basis, basis="gaussian", cutoff=False
        ).mean(dim=(1, 2))  # [B, num_basis]
        return torch.cat([eigen, radial, d2], dim=1)

    def forward(self, pos: Tensor) -> Tensor:
        # Always float32, also under bf16 autocast: bf16's 3 significant digits would break the invariance
        # that claim 4 measures, autocast has no bf16 eigvalsh, and on CPU e3nn's tensordot would meet
        # bf16 weights with float32 features.
        with torch.autocast(device_type=pos.device.type, enabled=False):
            return self._forward(pos.to(torch.promote_types(pos.dtype, torch.float32)))

    def _forward(self, pos: Tensor) -> Tensor:
        graph = self.preprocess(pos)
        batch, num_centres, _ = graph.centres.shape
        points = graph.points.reshape(-1, 3)  # [B*N, 3]
        centres = graph.centres.reshape(-1, 3)  # [B*M, 3]

        down_sh, down_emb = self._edge_attributes(points, centres, graph.down)
        down_src, down_dst = graph.down
        radial, position = self._node_inputs(centres).split([self.config.num_basis, 3], dim=1)
        scalars, tensors = [radial], []  # the centres' irreps_centre: 0e ..., 1o, then 2e with local_shape
        local = None
        if self.config.local_shape:
            invariants, quadric, local = self._local_shape(points, graph.down, batch)
            scalars.append(invariants)
            tensors.append(quadric)
        if self.config.global_frame:
            scalars.append(self._frame_invariants(graph.points, graph.centres, local))
        centre_inputs = torch.cat([*scalars, position, *tensors], dim=1)  # [B*M, irreps_centre.dim]
        x = self.down(self._node_inputs(points), down_src, down_dst, down_sh, down_emb, centre_inputs)
        edge_sh, edge_emb = self._edge_attributes(centres, centres, graph.edges)
        edge_src, edge_dst = graph.edges
        for layer in self.layers:
            x = layer(x, edge_src, edge_dst, edge_sh, edge_emb)  # [B*M, irreps.dim]

        x = x.reshape(batch, num_centres, self.config.dim)  # scalars only: rotation invariant
        pooled = [x.mean(dim=1), x.amax(dim=1)]  # each [B, dim]
        if self.config.global_invariants:
            pooled.append(self._global_invariants(graph.points, graph.centres))
        return self.head(torch.cat(pooled, dim=1))
