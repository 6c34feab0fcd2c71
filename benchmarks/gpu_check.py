"""One command that checks the GPU path on a CUDA machine (or a Ray GPU worker), in about 6 minutes:

    python -m benchmarks.gpu_check --json gpu.json
    PYTHONPATH=. python benchmarks/gpu_check.py --skip study --json gpu.json   # torch, triton, e3nn, PyG only

1. the `gpu`-marked tests (`pytest -m gpu` over the test files that have them, which import perception
   alone; the Triton scan natively, not under the interpreter);
2. the selective scan, forward+backward, for `triton`, `chunked` and `ref` at L = 1024, 4096, 16384 (dim 384,
   N 16, batch 1, fp32 and bf16; `ref` only at 1024 and `chunked` up to 4096: they take minutes beyond),
   timed with CUDA events, with the allocator's peak memory, and triton's speed-up over chunked; then the
   Triton kernels' chunk length, channel block and warps tried at L = 4096 (`tuning`);
3. forward latency (CUDA events, median) and allocator peak memory of ViT (SDPA), Mamba-hybrid and pure
   Mamba from 196 to 16384 tokens (perception.evaluation.cost, dim 192, depth 12); then ViT and pure Mamba
   at 196, 4096 and 16384 tokens eagerly and replayed from a CUDA graph (`graphs`: how much of a forward
   is the host's launch overhead);
4. a shrunk `profiles/gpu.yaml` study through `dvc repro` in a scratch copy of this repository, two trials
   sharing the GPU through Ray (`gpus_per_trial: 0.5`): the one part that needs Ray, MLflow and DVC.

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
PARTS = ("tests", "scan", "models", "graphs", "study")


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


def gpu_test_files() -> list[str]:
    """The test files with `gpu`-marked tests: collecting only these needs perception alone, so the tests
    run where pydantic, Ray, MLflow and DVC are not installed (tests/test_gpu_check.py holds them to it)."""
    marked = (p for p in sorted((REPO / "tests").glob("test_*.py")) if "pytest.mark.gpu" in p.read_text())
    return [str(p.relative_to(REPO)) for p in marked]


def check_tests() -> dict:
    env = {**os.environ, "PERCEPTION_TRITON_NATIVE": "1"}
    env.pop("TRITON_INTERPRET", None)
    began = time.monotonic()
    files = gpu_test_files()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rfEs", "-m", "gpu", "-p", "no:cacheprovider", *files],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    lines = result.stdout.strip().splitlines() or [""]
    return {
        "returncode": result.returncode,
        "summary": lines[-1],
        "files": files,
        "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))],
        "output_tail": "" if result.returncode == 0 else (result.stdout + result.stderr)[-3000:],
        "seconds": round(time.monotonic() - began, 1),
    }


def scan_inputs(L: int, dim: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A batch-1 scan of `dim` channels, N = 16, on CUDA: Mamba's A = -(1..16), seeded random rest."""
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = {"u": (1, dim, L), "delta": (1, dim, L), "B": (1, 16, L), "C": (1, 16, L), "z": (1, dim, L)}
    tensors = {k: torch.randn(*s, device="cuda", generator=g) for k, s in shapes.items()}
    tensors["A"] = -torch.arange(1, 17, device="cuda", dtype=torch.float32).repeat(dim, 1)
    tensors["D"] = torch.ones(dim, device="cuda")
    return {k: v.to(dtype).requires_grad_() for k, v in tensors.items()}


# (chunk, block_d, num_warps) of the Triton kernels tried at L = 4096; the first is the default.
TUNINGS = [(64, 16, 1), (32, 16, 1), (128, 16, 1), (256, 16, 1), (64, 8, 1), (64, 32, 1), (64, 32, 2),
           (64, 64, 4)]  # fmt: skip


def check_tuning(L: int, dim: int, repeats: int) -> list[dict]:
    """Forward+backward of the Triton scan at L for each of TUNINGS, fp32: which cut of the work is
    fastest on this GPU."""
    from perception.ops.scan.triton_kernels import selective_scan_triton

    leaves = scan_inputs(L, dim, torch.float32)
    rows = []
    for chunk, block_d, warps in TUNINGS:

        def step(chunk=chunk, block_d=block_d, warps=warps):
            out = selective_scan_triton(
                **leaves, delta_softplus=True, chunk=chunk, block_d=block_d, num_warps=warps
            )
            out.sum().backward()

        times = _cuda_time(step, repeats)
        row = {"chunk": chunk, "block_d": block_d, "num_warps": warps, "L": L, "dim": dim}
        rows.append(row | {"fwd_bwd_ms": sorted(times)[len(times) // 2]})
    return rows


def check_scan(lengths: list[int], dim: int, repeats: int) -> list[dict]:
    from perception.ops.scan import selective_scan

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for L in lengths:
            leaves = scan_inputs(L, dim, dtype)
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


def check_graphs(resolutions: list[int], repeats: int) -> list[dict]:
    """ViT and pure Mamba (the sweep's models) eagerly and replayed from a CUDA graph, forward only: the
    graph replays the same kernels without Python or launch overhead, so the difference is what a small
    forward spends on the host rather than the GPU."""
    from perception.evaluation.cost import default_cost_models, study_input

    factories = default_cost_models(192, 12, 3, 16)
    device = torch.device("cuda")
    rows = []
    for name in ("vit", "mamba"):
        model = factories[name]().to(device).eval()
        for resolution in resolutions:
            x = study_input(model, resolution, 1, device)
            row = {"model": name, "tokens": (resolution // 16) ** 2}
            with torch.inference_mode():
                row["eager_ms"] = sorted(_cuda_time(lambda m=model, x=x: m(x), repeats))[repeats // 2]
                try:
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):  # warm-up off the default stream, as capture wants
                        model(x)
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        model(x)
                    row["graph_ms"] = sorted(_cuda_time(graph.replay, repeats))[repeats // 2]
                    del graph
                except RuntimeError as err:  # a forward that cannot be captured says why
                    row["graph_error"] = str(err).splitlines()[0]
            rows.append(row)
        del model
        torch.cuda.empty_cache()
    return rows


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
        lines.extend(f"    {line}" for line in report["tests"]["failures"])
    for row in report.get("tuning", []):
        lines.append(
            f"  triton chunk {row['chunk']:4d} block_d {row['block_d']:3d} warps {row['num_warps']}"
            f"  L={row['L']}  fwd+bwd {row['fwd_bwd_ms']:8.2f} ms"
        )
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
    for row in report.get("graphs", []):
        replay = f"{row['graph_ms']:8.2f} ms" if "graph_ms" in row else row["graph_error"]
        lines.append(
            f"  graph {row['model']:13s} {row['tokens']:6d} tokens  eager {row['eager_ms']:8.2f} ms"
            f"  CUDA graph {replay}"
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

    def save() -> None:  # after every part, so a run cut short by a time limit still leaves its numbers
        report["seconds"] = round(time.monotonic() - began, 1)
        partial = args.json.with_name(args.json.name + ".part")
        partial.write_text(json.dumps(report, indent=2, default=str) + "\n")
        partial.replace(args.json)

    def part(name: str, run) -> None:
        if name in args.skip:
            return
        print(f"gpu_check: {name} ...", flush=True)
        report[name] = run()
        save()

    part("tests", check_tests)
    lengths, repeats = ([1024], 3) if args.quick else ([1024, 4096, 16384], 10)
    part("scan", lambda: check_scan(lengths, 384, repeats))
    if "scan" not in args.skip:
        report["tuning"] = check_tuning(1024 if args.quick else 4096, 384, repeats)
        save()
    resolutions = [224, 512] if args.quick else [224, 384, 512, 1024, 2048]  # 196 .. 16384 tokens
    part("models", lambda: check_models(resolutions, 0.2 if args.quick else 1.0))
    part("graphs", lambda: check_graphs([224, 1024] if args.quick else [224, 1024, 2048], repeats))
    part("study", lambda: check_study(args.quick))
    save()
    print(_table(report))
    print(f"gpu_check: {report['seconds']} s -> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
