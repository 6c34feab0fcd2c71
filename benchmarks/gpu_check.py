"""One command that checks the GPU path on a CUDA machine (or a Ray GPU worker), in about 5 minutes:

    python -m benchmarks.gpu_check --json gpu.json

1. the `gpu`-marked tests (`pytest -m gpu`; the Triton scan natively, not under the interpreter);
2. the selective scan, forward+backward, for `triton`, `chunked` and `ref` at L = 1024, 4096, 16384 (dim 384,
   N 16, batch 1, fp32 and bf16; `ref` only at 1024 and `chunked` up to 4096: they take minutes beyond),
   timed with CUDA events, with the allocator's peak memory, and triton's speed-up over chunked;
3. forward latency (CUDA events, median) and allocator peak memory of ViT (SDPA), Mamba-hybrid and pure
   Mamba from 196 to 16384 tokens (perception.evaluation.cost, dim 192, depth 12);
4. a shrunk `profiles/gpu.yaml` study through `dvc repro` in a scratch copy of this repository, two trials
   sharing the GPU through Ray (`gpus_per_trial: 0.5`).

It prints one table and writes everything to the JSON. `--quick` shrinks every part (a smoke run);
`--skip` leaves parts out (e.g. `--skip study`). Without CUDA it stops with one line saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PARTS = ("tests", "scan", "models", "study")


def _cuda_time(fn, repeats: int) -> list[float]:
    """Milliseconds of `fn()` per repeat, by CUDA events, after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def check_tests() -> dict:
    env = {**os.environ, "PERCEPTION_TRITON_NATIVE": "1"}
    env.pop("TRITON_INTERPRET", None)
    began = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    summary = (result.stdout.strip().splitlines() or [""])[-1]
    return {
        "returncode": result.returncode,
        "summary": summary,
        "seconds": round(time.monotonic() - began, 1),
    }


def check_scan(lengths: list[int], dim: int, repeats: int) -> list[dict]:
    from perception.ops.scan import selective_scan

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for L in lengths:
            g = torch.Generator(device="cuda").manual_seed(0)
            shapes = {
                "u": (1, dim, L),
                "delta": (1, dim, L),
                "B": (1, 16, L),
                "C": (1, 16, L),
                "z": (1, dim, L),
            }
            tensors = {k: torch.randn(*s, device="cuda", generator=g) for k, s in shapes.items()}
            tensors["A"] = -torch.arange(1, 17, device="cuda", dtype=torch.float32).repeat(dim, 1)
            tensors["D"] = torch.ones(dim, device="cuda")
            leaves = {k: v.to(dtype).requires_grad_() for k, v in tensors.items()}
            for backend in ("triton", "chunked", "ref"):
                if (backend == "ref" and L > 1024) or (backend == "chunked" and L > 4096):
                    continue

                def step(backend=backend, leaves=leaves):
                    out = selective_scan(**leaves, delta_softplus=True, backend=backend)
                    out.float().sum().backward()

                torch.cuda.reset_peak_memory_stats()
                times = _cuda_time(step, repeats if backend == "triton" else 1)
                rows.append(
                    {
                        "backend": backend, "dtype": str(dtype).removeprefix("torch."), "L": L, "dim": dim,
                        "fwd_bwd_ms": sorted(times)[len(times) // 2],
                        "peak_mb": torch.cuda.max_memory_allocated() / 2**20,
                    }
                )  # fmt: skip
    for row in rows:
        chunked = next(
            (
                r
                for r in rows
                if r["backend"] == "chunked" and r["L"] == row["L"] and r["dtype"] == row["dtype"]
            ),
            None,
        )
        if row["backend"] == "triton" and chunked:
            row["speedup_over_chunked"] = chunked["fwd_bwd_ms"] / row["fwd_bwd_ms"]
    return rows


def check_models(resolutions: list[int], min_run_time: float) -> dict:
    from perception.evaluation.cost import cost_study

    study = cost_study(
        192, 12, 3, 16, resolutions, torch.device("cuda"), 0, 1000,
        progress=lambda line: print(f"gpu_check: {line}", flush=True), min_run_time=min_run_time,
    )  # fmt: skip
    return study.as_dict()


# Top-level entries of the repository a scratch copy leaves out: outputs, environments, the tracking store.
NOT_COPIED = {
    ".git", ".venv", ".dvc", ".pytest_cache", ".ruff_cache", "perception_study.egg-info",
    "data", "metrics", "plots", "reports", "dvc.lock", "mlflow.db", "mlruns", "mlartifacts", "gpu.json",
}  # fmt: skip


def shrunk_gpu_params(quick: bool, gpus_per_trial: float = 0.5) -> dict:
    """profiles/gpu.yaml at the profile's widths and resolutions, on a few samples, epochs and models."""
    import yaml

    params = yaml.safe_load((REPO / "profiles/gpu.yaml").read_text())
    params["seeds"] = [0]
    params["points"].update({"train_per_class": 8, "test_per_class": 4, "num_points": 256})
    params["proximity"].update({"train_count": 64, "test_count": 32})
    params["train"].update(
        {"epochs": 1 if quick else 2, "points_per_cloud": 256, "gpus_per_trial": gpus_per_trial}
    )
    # Two trials at once on this machine's CPUs too (the profile asks 4 each, for a GPU worker's node).
    cpus = max(1, min(4, (os.cpu_count() or 2) // 2))
    params["train"].update({"warmup_epochs": 0, "grace_period": 1, "cpus_per_trial": cpus})
    params["train"]["models"] = {"vit": {}, "mamba_hybrid": {}, "pointnet": {}}
    params["train"]["all_families"] = False
    # 196, 576 and 1024 tokens: the exponents are fitted from 576 on (evaluate.cost_fit_min_tokens)
    params["evaluate"].update(
        {"cost_resolutions": [224, 384, 512], "cost_depth": 2, "cost_min_run_time": 0.1}
    )
    return params


def scratch_copy(destination: Path) -> Path:
    """This repository's code and params, without its outputs, as a fresh git + DVC repository."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        top = Path(folder).resolve() == REPO
        return {n for n in names if n == "__pycache__" or (top and n in NOT_COPIED)}

    shutil.copytree(REPO, destination, ignore=ignore)
    (destination / "data/raw").mkdir(parents=True, exist_ok=True)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=destination, check=True, capture_output=True)
    shutil.copy(REPO / ".dvc/config", destination / ".dvc/config")  # the project's DVC settings
    return destination


def check_study(quick: bool, gpus_per_trial: float = 0.5) -> dict:
    """A shrunk profiles/gpu.yaml through `dvc repro` in a scratch copy, two trials per GPU."""
    import yaml

    params = shrunk_gpu_params(quick, gpus_per_trial)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = scratch_copy(Path(tmp) / "study")
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        began = time.monotonic()
        result = subprocess.run(["dvc", "repro"], cwd=root, capture_output=True, text=True)
        seconds = round(time.monotonic() - began, 1)
        trials = json.loads((root / "data/train/trials.json").read_text()) if result.returncode == 0 else []
        verdicts = []
        if result.returncode == 0:
            verdicts = json.loads((root / "reports/verdicts.json").read_text())["claims"]
    return {
        "returncode": result.returncode,
        "seconds": seconds,
        "trials": [
            {k: t[k] for k in ("variant", "status", "device", "duration_s", "val_accuracy")} for t in trials
        ],
        "verdicts": [{"claim": v["claim"], "verdict": v["verdict"]} for v in verdicts],
        "error_tail": "" if result.returncode == 0 else (result.stdout + result.stderr)[-2000:],
    }


def _table(report: dict) -> str:
    lines = [f"GPU check on {report['device']} (torch {report['torch']}, triton {report['triton']})"]
    if "tests" in report:
        lines.append(f"  gpu tests: {report['tests']['summary']}")
    for row in report.get("scan", []):
        extra = f"  {row['speedup_over_chunked']:.1f}x chunked" if "speedup_over_chunked" in row else ""
        lines.append(
            f"  scan {row['backend']:8s} {row['dtype']:9s} L={row['L']:6d}  "
            f"fwd+bwd {row['fwd_bwd_ms']:9.2f} ms  peak {row['peak_mb']:8.1f} MiB{extra}"
        )
    for row in report.get("models", {}).get("rows", []):
        lines.append(
            f"  model {row['model']:13s} {row['tokens']:6d} tokens  {row['latency_ms']:8.2f} ms"
            f"  peak {row['peak_memory_mb']:8.1f} MiB"
        )
    if "study" in report:
        s = report["study"]
        lines.append(f"  study: dvc repro exit {s['returncode']} in {s['seconds']} s; trials " + ", ".join(
            f"{t['variant']} {t['status']} on {t['device']}" for t in s["trials"]
        ))  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--json", type=Path, default=Path("gpu.json"))
    parser.add_argument("--quick", action="store_true", help="shrink every part: a smoke run")
    parser.add_argument("--skip", nargs="*", default=[], choices=PARTS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine or a Ray GPU worker", file=sys.stderr)
        return 2
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    report: dict = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": triton_version,
    }
    began = time.monotonic()
    if "tests" not in args.skip:
        report["tests"] = check_tests()
    if "scan" not in args.skip:
        report["scan"] = check_scan(
            [1024] if args.quick else [1024, 4096, 16384], 384, 3 if args.quick else 10
        )
    if "models" not in args.skip:
        resolutions = [224, 512] if args.quick else [224, 384, 512, 1024, 2048]  # 196 .. 16384 tokens
        report["models"] = check_models(resolutions, 0.2 if args.quick else 1.0)
    if "study" not in args.skip:
        report["study"] = check_study(args.quick)
    report["seconds"] = round(time.monotonic() - began, 1)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(_table(report))
    print(f"gpu_check: {report['seconds']} s -> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
