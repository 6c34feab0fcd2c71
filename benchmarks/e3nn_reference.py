"""Our tiny `E3nnNet` against e3nn's own `gate_points_2102` network, measured in the same run.

    python benchmarks/e3nn_reference.py [--num-points 256] [--batch 16] [--repeats 5] [--json out.json]

The reference is `e3nn.nn.models.gate_points_2102.Network` as e3nn ships it (it needs neither torch_cluster
nor torch_scatter: its `radius_graph` is a whole-batch `cdist`, its `scatter` a `scatter_add_`), wrapped
as a classifier of float32[B, N, 3] clouds: no node inputs (ones), `num_classes` scalar outputs summed over
the nodes of each cloud. Hidden irreps `{mul}x0e + {mul}x1o + {mul}x2e` (mul 16, lmax 2), 2 gated layers,
radius `max_radius` (0.35: about 15 neighbours at 256 points on the unit-ball surfaces used here; ours
links each of its 128 centres to 16 input points and 10 centres). Above `_WHOLE_BATCH_LIMIT` nodes the
whole-batch distance matrix gets too big, so its `radius_graph` is swapped for
`perception.ops.graphs.radius_graph`, which gives the same edges per sample (the result says which ran).
The radius is fixed, so the reference's neighbours grow with density: at 1024 points it has ~58 per node,
trains at under 1 cloud/s on 2 cores, and this script then takes over 10 minutes.

Training throughput (clouds/s of forward, cross-entropy, backward and an Adam step) is timed for both models
on the same batch, alternating between them within each repeat so that load from other processes hits both
alike; the ratio is the median of the per-repeat ratios. Rotation invariance is the largest change of a
cloud's logits under random rotations (each cloud its own) relative to their norm
(`perception.evaluation.rotation.invariance_error`), in float32 and float64, before and after training.

As shipped, the reference is not invariant even in float64 (a few percent): its `radius_graph` drops
self-loops with `distance > 0` on a matrix-product `cdist`, whose diagonal comes out as ~1e-8 instead of 0
for some points, so a rotation-dependent set of self-loops (zero vector, cutoff 1) adds messages. The same
weights on the exact per-sample graph (`*_exact_graph` errors) are invariant up to rounding.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from e3nn import o3
from e3nn.nn.models import gate_points_2102
from torch import Tensor, nn

from perception.evaluation.rotation import invariance_error
from perception.models.equivariant import SIZES, E3nnConfig, E3nnNet
from perception.ops.graphs import radius_graph
from perception.precision import default_dtype

_WHOLE_BATCH_LIMIT = 8192  # nodes; e3nn's radius_graph holds a (B*N)^2 distance matrix


def _per_sample_radius_graph(num_points: int) -> Callable[[Tensor, float, Tensor], Tensor]:
    """A drop-in for gate_points_2102.radius_graph on equal-sized clouds: exact, per sample."""

    def graph(pos: Tensor, r_max: float, batch: Tensor) -> Tensor:
        edge_index = radius_graph(pos.reshape(-1, num_points, 3), r_max)
        # gate_points_2102 keeps pairs with 0 < distance < r_max: drop coincident points and the boundary.
        vec = pos[edge_index[0]] - pos[edge_index[1]]
        length = vec.norm(dim=1)
        return edge_index[:, (length > 0) & (length < r_max)]

    return graph


class GatePoints2102Classifier(nn.Module):
    """e3nn's `gate_points_2102.Network` as a classifier of float32[B, N, 3] clouds."""

    def __init__(
        self,
        num_classes: int = 8,
        num_points: int = 256,
        mul: int = 16,
        lmax: int = 2,
        layers: int = 2,
        max_radius: float = 0.35,
        num_neighbors: float = 16.0,
    ) -> None:
        super().__init__()
        self.num_points = num_points
        self.net = gate_points_2102.Network(
            irreps_in=None,
            irreps_hidden=o3.Irreps([(mul, (degree, (-1) ** degree)) for degree in range(lmax + 1)]),
            irreps_out=f"{num_classes}x0e",
            irreps_node_attr=None,
            irreps_edge_attr=o3.Irreps.spherical_harmonics(lmax),
            layers=layers,
            max_radius=max_radius,
            number_of_basis=10,
            radial_layers=1,
            radial_neurons=100,
            num_neighbors=num_neighbors,
            num_nodes=num_points,
        )

    def forward(self, pos: Tensor) -> Tensor:
        batch, num_points, _ = pos.shape
        nodes = torch.arange(batch, device=pos.device).repeat_interleave(
            num_points
        )  # [B*N] cloud of each node
        return self.net({"pos": pos.reshape(batch * num_points, 3), "batch": nodes})  # [B, num_classes]


@contextmanager
def _reference_graph(per_sample: bool, num_points: int) -> Iterator[None]:
    original = gate_points_2102.radius_graph
    if per_sample:
        gate_points_2102.radius_graph = _per_sample_radius_graph(num_points)
    try:
        yield
    finally:
        gate_points_2102.radius_graph = original


def make_clouds(batch: int, num_points: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """Points on random anisotropic ellipsoids with a little noise, centred, inside the unit ball."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(batch, num_points, 3, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    scales = 0.3 + 0.7 * torch.rand(batch, 1, 3, generator=generator, dtype=torch.float64)
    points = directions * scales + 0.01 * torch.randn(
        batch, num_points, 3, generator=generator, dtype=torch.float64
    )
    points = points - points.mean(dim=1, keepdim=True)
    return (points / points.norm(dim=-1).amax(dim=1)[:, None, None]).to(dtype)


def build_models(
    num_points: int, dtype: torch.dtype, seed: int = 0, **reference: Any
) -> dict[str, nn.Module]:
    # e3nn computes its constants at construction in the default dtype: build float64 models under float64.
    with default_dtype(dtype):
        torch.manual_seed(seed)
        ours = E3nnNet(E3nnConfig(**SIZES["tiny"]))
        torch.manual_seed(seed)
        ref = GatePoints2102Classifier(num_points=num_points, **reference)
    return {"ours": ours, "gate_points_2102": ref}


def rotation_error(model: nn.Module, pos: Tensor, trials: int = 3, seed: int = 0) -> float:
    """`invariance_error` in the clouds' own dtype, all of them in one batch: the worst change of a cloud's
    logits under `trials` random rotations of it, relative to their norm."""
    return invariance_error(model, pos, trials, seed, batch_size=len(pos), dtype=pos.dtype)


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, pos: Tensor, labels: Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(pos), labels).backward()
    optimizer.step()


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def measure_e3nn_vs_reference(
    num_points: int = 256,
    batch: int = 16,
    repeats: int = 5,
    steps: int = 2,
    warmup: int = 2,
    max_radius: float = 0.35,
    seed: int = 0,
    invariance: bool = True,
) -> dict[str, Any]:
    """Training throughput of tiny `E3nnNet` and `gate_points_2102`, interleaved; their invariance errors."""
    per_sample = batch * num_points > _WHOLE_BATCH_LIMIT
    pos = make_clouds(batch, num_points, seed)
    labels = torch.randint(0, 8, (batch,), generator=torch.Generator().manual_seed(seed))
    mean_degree = radius_graph(pos, max_radius).shape[1] / (batch * num_points)
    result: dict[str, Any] = {
        "num_points": num_points,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "ours_config": SIZES["tiny"],
        "reference": {
            "model": "e3nn.nn.models.gate_points_2102.Network",
            "irreps_hidden": "16x0e + 16x1o + 16x2e",
            "layers": 2,
            "max_radius": max_radius,
            "mean_neighbours": mean_degree,
            "graph": "perception.ops.graphs.radius_graph per sample"
            if per_sample
            else "as shipped (whole batch)",
        },
    }
    errors: dict[str, dict[str, float]] = {"ours": {}, "gate_points_2102": {}}

    def record(models: dict[str, nn.Module], pos: Tensor, tag: str) -> None:
        errors["ours"][tag] = rotation_error(models["ours"].eval(), pos)
        with _reference_graph(per_sample, num_points):
            errors["gate_points_2102"][tag] = rotation_error(models["gate_points_2102"].eval(), pos)
        with _reference_graph(True, num_points):  # the same weights on an exact graph
            errors["gate_points_2102"][tag + "_exact_graph"] = rotation_error(models["gate_points_2102"], pos)

    with _reference_graph(per_sample, num_points):
        models = build_models(
            num_points, torch.float32, seed, max_radius=max_radius, num_neighbors=mean_degree
        )
    if invariance:
        record(models, pos, "float32_untrained")
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in models.items()}
    rates: dict[str, list[float]] = {name: [] for name in models}
    with _reference_graph(per_sample, num_points):
        for name, model in models.items():
            model.train()
            for _ in range(warmup):
                _train_step(model, optimizers[name], pos, labels)
        for _ in range(repeats):
            for name, model in models.items():  # alternate, so that outside load hits both alike
                start = time.perf_counter()
                for _ in range(steps):
                    _train_step(model, optimizers[name], pos, labels)
                rates[name].append(steps * batch / (time.perf_counter() - start))
    if invariance:
        record(models, pos, "float32_trained")
        models64 = build_models(
            num_points, torch.float64, seed, max_radius=max_radius, num_neighbors=mean_degree
        )
        pos64 = make_clouds(batch, num_points, seed, torch.float64)
        record(models64, pos64, "float64_untrained")
        with _reference_graph(per_sample, num_points):
            for model in models64.values():
                optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
                for _ in range(3):
                    _train_step(model.train(), optimizer, pos64, labels)
        record(models64, pos64, "float64_trained")

    ratios = [a / b for a, b in zip(rates["ours"], rates["gate_points_2102"], strict=True)]
    for name, model in models.items():
        result[name] = {
            "clouds_per_s": _summary(rates[name]),
            "parameters": sum(p.numel() for p in model.parameters()),
            "rotation_error": errors[name],
        }
    result["speedup"] = _summary(ratios)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-points", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--max-radius", type=float, default=0.35)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = measure_e3nn_vs_reference(
        args.num_points, args.batch, args.repeats, args.steps, max_radius=args.max_radius
    )
    print(f"training throughput at {args.num_points} points, batch {args.batch}, {result['threads']} threads")
    for name in ("ours", "gate_points_2102"):
        rate, err = result[name]["clouds_per_s"], result[name]["rotation_error"]
        print(
            f"{name:17s} {rate['median']:7.1f} clouds/s (min {rate['min']:.1f}, max {rate['max']:.1f}, "
            f"{rate['runs']} runs)  params {result[name]['parameters']}"
        )
        print(f"{'':17s} rotation error (relative): " + ", ".join(f"{k} {v:.1e}" for k, v in err.items()))
    ratio, ref = result["speedup"], result["reference"]
    print(
        f"speed-up ours / gate_points_2102: {ratio['median']:.2f}x "
        f"(min {ratio['min']:.2f}, max {ratio['max']:.2f})"
    )
    print(f"reference graph: {ref['graph']}, mean neighbours {ref['mean_neighbours']:.1f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
