"""Training throughput of every registered model at its CPU default size, at the default data sizes.

    python -m benchmarks.throughput [--repeats 5] [--json out.json]

Images are float32[B, 4, 32, 32] (the default training resolution), clouds float32[B, 1024, 3] (the default
number of points). A training step is forward, cross-entropy, backward and an Adam step. Each model is
timed `repeats` times over a few steps after a warm-up; the table gives the median and the spread
(min-max). The e3nn model is also compared with e3nn's own `gate_points_2102` at the same number of points,
in the same run (benchmarks.e3nn_reference).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from perception.machine import processor_name
from perception.models import FAMILIES, build

IMAGE_SHAPE = (4, 32, 32)
NUM_POINTS = 1024


def training_throughput(
    model: torch.nn.Module, inputs: torch.Tensor, steps: int, repeats: int
) -> list[float]:
    """Samples per second of `repeats` timed runs of `steps` training steps each, after one warm-up step."""
    labels = torch.randint(0, 8, (inputs.shape[0],), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), labels).backward()
        optimizer.step()

    step()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(steps * inputs.shape[0] / (time.perf_counter() - start))
    return rates


def summary(rates: list[float]) -> dict[str, float]:
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "runs": len(rates)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-points", type=int, default=256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    results: dict = {
        "machine": {
            "processor": processor_name(),
            "threads": torch.get_num_threads(),
        },
        "batch": args.batch,
        "models": {},
    }
    print(f"training throughput, batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"{'model':14s} {'input':20s} {'median/s':>9s} {'min-max/s':>15s} {'params':>9s}")
    for name, family in FAMILIES.items():
        model = build(name)
        shape = IMAGE_SHAPE if family.input_kind == "image" else (NUM_POINTS, 3)
        inputs = torch.randn(args.batch, *shape)
        if family.input_kind == "points":  # clouds in the unit ball, as the prepared data are
            inputs = inputs / inputs.norm(dim=-1).amax(dim=1)[:, None, None]
        rates = summary(training_throughput(model, inputs, args.steps, args.repeats))
        params = sum(p.numel() for p in model.parameters())
        results["models"][name] = {"input": list(shape), "samples_per_s": rates, "parameters": params}
        unit = "images" if family.input_kind == "image" else "clouds"
        described = f"{unit} {'x'.join(map(str, shape))}"
        print(
            f"{name:14s} {described:20s} {rates['median']:9.1f} "
            f"{rates['min']:7.1f}-{rates['max']:<7.1f} {params:9d}"
        )

    from benchmarks.e3nn_reference import measure_e3nn_vs_reference

    reference = measure_e3nn_vs_reference(num_points=args.reference_points, batch=16, repeats=args.repeats)
    results["e3nn_vs_gate_points_2102"] = reference
    print(f"e3nn vs gate_points_2102 at {args.reference_points} points:")
    print(json.dumps(reference, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
