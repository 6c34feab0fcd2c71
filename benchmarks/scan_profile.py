"""The selective scan's CPU backends, and whole-model forward latency of ViT, Mamba-hybrid and pure Mamba.

    python -m benchmarks.scan_profile [--json out.json] [--quick]

Part 1, the scan: forward and forward+backward at L = 196, 576, 1024, 4096, dim 192 and 384, N = 16,
batch 1, realistic Mamba parameters (A = -1..-16, softplus delta, D, gate z), for
  - naive:  the mamba-minimal loop that indexes x[:, :, t] each step (written here, the baseline),
  - ref:    perception.ops.scan.selective_scan_ref (a loop over unbind-ed steps, autograd),
  - every fast CPU backend in SCAN_BACKENDS (chunked, native where it compiles; not triton, the GPU's).
Each is timed `repeats` times after a warm-up (fewer repeats at large L and for the slow loops; naive and
ref forward+backward are skipped above L = 1024, where they take seconds to minutes). Peak memory is the
peak of the running sum of allocations and frees that torch.profiler(profile_memory=True) records in one
extra run; it sees torch's allocator only, so the native kernel's per-thread workspace ((2L + 1) N + 4L
floats per thread, 0.5 MiB at L = 4096) is not in it.

Part 2, the models: forward latency (no_grad, batch 1, in_channels 4) of ViT, Mamba-hybrid (attn_layers=3)
and pure Mamba (attn_layers=0) at dim 192, depth 12, heads 3, patch 16, at 224/384/512/1024 px = 196, 576,
1024, 4096 tokens, and the smallest token count at which pure Mamba (and the hybrid) beat ViT, if any.
Times are the median and the min-max over repeats, in ms. Threads: torch's default (2 on the study box).

Part 3, in the same run: the e3nn model's training throughput against e3nn's gate_points_2102 at 256
points (benchmarks.e3nn_reference), the log-log slope of each backend's peak memory against L, and the
wall time of each stage of the last `dvc repro` in this checkout (data/timings).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from perception.machine import processor_name
from perception.models import build
from perception.ops.scan import SCAN_BACKENDS, resolve_backend

LENGTHS = (196, 576, 1024, 4096)
DIMS = (192, 384)
N_STATE = 16
SLOW = ("naive", "ref")  # per-step Python loops with autograd
SLOW_BWD_MAX_L = 1024  # naive/ref forward+backward beyond this take seconds to minutes: skipped


def naive_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba-minimal's selective_scan: one step per token, indexing [:, :, t] inside the loop."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    dA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))  # [b, d, l, n]
    dBu = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)  # [b, d, l, n]
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = dA[:, :, t] * h + dBu[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=2)  # [b, d, l]
    if D is not None:
        y = y + u * D[:, None]
    return y if z is None else y * F.silu(z)


def scan_inputs(d: int, L: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Mamba-1 at init: A = -(1..16), delta_bias the softplus-inverse of a log-uniform dt in [1e-3, 0.1]."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(d, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return {
        "u": torch.randn(1, d, L, generator=g),
        "delta": 0.5 * torch.randn(1, d, L, generator=g),
        "A": -torch.arange(1, N_STATE + 1, dtype=torch.float32).repeat(d, 1),
        "B": torch.randn(1, N_STATE, L, generator=g),
        "C": torch.randn(1, N_STATE, L, generator=g),
        "D": torch.ones(d),
        "z": torch.randn(1, d, L, generator=g),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),
    }


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts), "repeats": repeats}


def peak_mib(fn: Callable[[], object]) -> float:
    """Peak of the running sum of torch allocations (minus frees) during fn, in MiB."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    total = peak = 0
    for e in events:
        total += e.self_cpu_memory_usage
        peak = max(peak, total)
    return peak / 2**20


def bench_scan(quick: bool) -> list[dict]:
    impls = {"naive": naive_scan, "ref": SCAN_BACKENDS["ref"]}
    # triton is the GPU's backend: on CPU it runs only under the interpreter (benchmarks.gpu_check times it)
    impls.update({k: v for k, v in SCAN_BACKENDS.items() if k not in ("ref", "triton")})
    rows = []
    for L in LENGTHS[:2] if quick else LENGTHS:
        for d in DIMS:
            inputs = scan_inputs(d, L)
            for name, scan in impls.items():
                slow = name in SLOW
                reps = (1 if L > 1024 else 3) if slow else (3 if L > 1024 else 7)

                def fwd(scan=scan, inputs=inputs):
                    with torch.no_grad():
                        return scan(**inputs, delta_softplus=True)

                leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}

                def fwd_bwd(scan=scan, leaves=leaves):
                    scan(**leaves, delta_softplus=True).sum().backward()
                    for t in leaves.values():
                        t.grad = None

                row = {"L": L, "dim": d, "n": N_STATE, "backend": name, "fwd": timed(fwd, reps)}
                row["fwd"]["peak_mib"] = peak_mib(fwd)
                if slow and L > SLOW_BWD_MAX_L:
                    row["fwd_bwd"] = None
                else:
                    # The naive loop's backward is quadratic in L (each x[:, :, t] backward zero-fills a full
                    # [b, d, l, n] gradient): one untimed-warm-up-free run, and its peak only up to L = 576.
                    very_slow = name == "naive" and L > 196
                    row["fwd_bwd"] = timed(fwd_bwd, 1 if very_slow else reps, warmup=0 if very_slow else 1)
                    big = name == "naive" and L > 576
                    row["fwd_bwd"]["peak_mib"] = None if big else peak_mib(fwd_bwd)
                rows.append(row)
                fb = row["fwd_bwd"]
                fb_txt = (
                    "skipped"
                    if fb is None
                    else f"{fb['median_ms']:9.2f} ({fb['min_ms']:.1f}-{fb['max_ms']:.1f})"
                )
                print(
                    f"scan L={L:5d} d={d:3d} {name:8s} fwd {row['fwd']['median_ms']:9.2f} "
                    f"({row['fwd']['min_ms']:.1f}-{row['fwd']['max_ms']:.1f}) ms  "
                    f"fwd+bwd {fb_txt} ms  peak fwd {row['fwd']['peak_mib']:.1f} MiB"
                    + ("" if fb is None or fb["peak_mib"] is None else f" fwd+bwd {fb['peak_mib']:.1f} MiB"),
                    flush=True,
                )
    return rows


MODELS = {
    "vit": ("vit", {"image_size": 224}),
    "mamba_hybrid": ("mamba_hybrid", {"attn_layers": 3}),
    "mamba": ("mamba_hybrid", {"attn_layers": 0}),
}


def bench_models(quick: bool, depth: int) -> dict:
    sizes = (224, 384) if quick else (224, 384, 512, 1024)
    common = {"dim": 192, "depth": depth, "heads": 3, "patch_size": 16, "in_channels": 4, "num_classes": 8}
    rows = []
    for px in sizes:
        x = torch.randn(1, 4, px, px, generator=torch.Generator().manual_seed(0))
        for label, (family, extra) in MODELS.items():
            torch.manual_seed(0)
            model = build(family, **common, **extra).eval()

            def fwd(model=model, x=x):
                with torch.no_grad():
                    return model(x)

            r = timed(fwd, 3 if px >= 1024 else 5)
            rows.append({"model": label, "px": px, "tokens": (px // 16) ** 2, **r})
            print(f"model {label:13s} {px:5d}px {(px // 16) ** 2:5d} tokens {r['median_ms']:9.1f} ms "
                  f"({r['min_ms']:.1f}-{r['max_ms']:.1f})", flush=True)  # fmt: skip
    crossover = {}
    for label in ("mamba", "mamba_hybrid"):
        faster = [
            r["tokens"]
            for r in rows
            if r["model"] == label
            and r["median_ms"]
            < next(v["median_ms"] for v in rows if v["model"] == "vit" and v["px"] == r["px"])
        ]
        crossover[label] = min(faster) if faster else None
    return {"depth": depth, "rows": rows, "faster_than_vit_from_tokens": crossover}


def _memory_exponents(rows: list[dict]) -> dict[str, float]:
    """Least-squares log-log slope of fwd+bwd peak memory against L, per backend and dim (1 = linear)."""
    from perception.evaluation.cost import fit_exponent

    out = {}
    for backend in sorted({r["backend"] for r in rows}):
        for d in DIMS:
            pts = [
                (r["L"], r["fwd_bwd"]["peak_mib"])
                for r in rows
                if r["backend"] == backend and r["dim"] == d and r["fwd_bwd"] and r["fwd_bwd"]["peak_mib"]
            ]
            if len(pts) >= 2:
                out[f"{backend}_d{d}"] = round(fit_exponent([p[0] for p in pts], [p[1] for p in pts]), 3)
    return out


def _stage_times(folder: Path) -> dict[str, float]:
    """Each stage's wall time in the last `dvc repro` here (written by `python -m pipeline`)."""
    return {
        p.stem: round(json.loads(p.read_text())["wall_seconds"], 1) for p in sorted(folder.glob("*.json"))
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="small sizes only (a smoke test)")
    parser.add_argument("--depth", type=int, default=12, help="model depth (default 12)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    result = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": processor_name(),
        "auto_backend": resolve_backend("auto"),
        "scan": bench_scan(args.quick),
    }
    summary = {}
    for r in result["scan"]:
        if r["fwd_bwd"] is not None and r["backend"] != "naive":
            naive = next(
                (
                    s
                    for s in result["scan"]
                    if s["backend"] == "naive" and s["L"] == r["L"] and s["dim"] == r["dim"]
                ),
                None,
            )
            if naive and naive["fwd_bwd"]:
                key = f"L{r['L']}_d{r['dim']}_{r['backend']}"
                summary[key] = naive["fwd_bwd"]["median_ms"] / r["fwd_bwd"]["median_ms"]
    result["fwd_bwd_speedup_over_naive"] = summary
    print("\nfwd+bwd speed-up over the naive x[:, t] loop:")
    for k, v in summary.items():
        print(f"  {k:24s} {v:7.1f}x")
    result["models"] = bench_models(args.quick, args.depth)
    print(f"\nfaster than ViT from (tokens): {result['models']['faster_than_vit_from_tokens']}")
    result["memory_exponent_in_L"] = _memory_exponents(result["scan"])
    print(f"peak memory of fwd+bwd against L (log-log slope): {result['memory_exponent_in_L']}")
    if not args.quick:
        from benchmarks.e3nn_reference import measure_e3nn_vs_reference

        e3nn = measure_e3nn_vs_reference(num_points=256, batch=16, repeats=3)
        result["e3nn_vs_gate_points_2102"] = e3nn
        print(
            f"e3nn training at 256 points: {e3nn['ours']['clouds_per_s']['median']:.1f} clouds/s vs "
            f"gate_points_2102 {e3nn['gate_points_2102']['clouds_per_s']['median']:.1f} "
            f"({e3nn['speedup']['median']:.1f}x, min {e3nn['speedup']['min']:.1f}x)"
        )
    result["study_stage_seconds"] = _stage_times(Path("data/timings"))
    print(
        f"last study run, wall time per stage (s): {result['study_stage_seconds'] or 'no study run here yet'}"
    )
    result["wall_s"] = time.perf_counter() - t0
    print(f"auto backend: {result['auto_backend']}; total {result['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
