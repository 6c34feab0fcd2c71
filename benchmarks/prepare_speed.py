"""Preparing a benchmark-size point dataset: the point path against the mesh path on the same number of
instances, in one run, with each stage's wall time and peak memory (the stage process and its workers).

    python -m benchmarks.prepare_speed --json prepare_speed.json   # about 5 minutes on 2 cores

1. A synthetic dataset in ScanObjectNN's PB_T50_RS layout and size (11,416 train and 2,882 test clouds of
   2,048 points, 15 classes, `h5_files/main_split/*_augmentedrot_scale75.h5`), written with h5py.
2. `prepare-points` on it (`points.source: scanobjectnn`, `variant: pb_t50_rs`), then `prepare-images` from
   its points at the default canvases.
3. `prepare-points` on procedural meshes, 13 classes, as many instances (878 train and 222 test per class),
   then `prepare-images` from those meshes.

Every stage runs as `python -m pipeline` with the repository's params.yaml changed only where it says,
`runtime.workers: 0` (one per core). Goals: points under a minute and 3 GB, images under two minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
TRAIN, TEST, POINTS, CLASSES = 11_416, 2_882, 2_048, 15


def synthetic_scanobjectnn(root: Path, seed: int = 0) -> Path:
    """PB_T50_RS-sized h5 files: each cloud the surface of a random box or ellipsoid, one kind and aspect
    per class, with 20% background points far from it (mask -1), as the release has."""
    import h5py

    rng = np.random.default_rng(seed)
    aspects = rng.uniform(0.4, 1.6, size=(CLASSES, 3))
    for count, prefix in ((TRAIN, "training"), (TEST, "test")):
        labels = rng.integers(0, CLASSES, size=count)
        directions = rng.normal(size=(count, POINTS, 3)).astype(np.float32)
        boxes = labels % 2 == 0
        norm = np.where(boxes[:, None, None], np.abs(directions).max(-1, keepdims=True), 0)
        norm = norm + np.where(boxes[:, None, None], 0, np.linalg.norm(directions, axis=-1, keepdims=True))
        data = directions / norm * aspects[labels][:, None, :]
        background = rng.random((count, POINTS)) < 0.2
        data[background] = rng.uniform(-3, 3, size=(int(background.sum()), 3))
        mask = np.where(background, -1, labels[:, None]).astype(np.int32)
        path = root / "main_split" / f"{prefix}_objectdataset_augmentedrot_scale75.h5"
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as handle:
            handle["data"], handle["label"], handle["mask"] = data.astype(np.float32), labels, mask
    return root


def run_stage(argv: list[str], cwd: Path) -> dict:
    """Wall seconds and the peak resident memory of the stage's process tree (sampled every 0.1 s)."""
    began = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *argv], cwd=cwd, stdout=subprocess.PIPE, text=True
    )
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    output = proc.stdout.read() if proc.stdout else ""
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{output}")
    lines = [line for line in output.splitlines() if line.startswith(("prepare-points", "prepare-images"))]
    return {
        "seconds": round(time.monotonic() - began, 1),
        "peak_rss_mb": round(peak / 2**20),
        "line": lines[-1],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.prepare_speed", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--json", type=Path, default=Path("prepare_speed.json"))
    args = parser.parse_args(argv)
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    base["runtime"] = {"workers": 0, "progress": False}
    report: dict = {"clouds": TRAIN + TEST, "points_per_file_cloud": POINTS}
    with tempfile.TemporaryDirectory(prefix="prepare-speed-") as tmp:
        work = Path(tmp)
        began = time.monotonic()
        synthetic_scanobjectnn(work / "h5_files")
        report["write_synthetic_seconds"] = round(time.monotonic() - began, 1)
        cases = {
            "points": {
                "source": "scanobjectnn",
                "root": str(work / "h5_files"),
                "variant": "pb_t50_rs",
                "up_axis": "y",
            },
            "meshes": {"source": "procedural", "train_per_class": TRAIN // 13, "test_per_class": TEST // 13},
        }
        for name, points in cases.items():
            params = {**base, "points": {**base["points"], **points}}
            path = work / f"{name}.yaml"
            path.write_text(yaml.safe_dump(params, sort_keys=False))
            out = work / f"{name}-points"
            report[f"{name}_prepare_points"] = run_stage(
                ["prepare-points", "--params", str(path), "--out", str(out)], REPO
            )
            print(f"{name}: prepare-points {report[f'{name}_prepare_points']}", flush=True)
            images = [
                "prepare-images",
                "--params",
                str(path),
                "--points",
                str(out),
                "--out",
                str(work / f"{name}-images"),
            ]
            report[f"{name}_prepare_images"] = run_stage(images, REPO)
            print(f"{name}: prepare-images {report[f'{name}_prepare_images']}", flush=True)
    for stage in ("prepare_points", "prepare_images"):
        report[f"{stage}_points_over_meshes"] = round(
            report[f"points_{stage}"]["seconds"] / report[f"meshes_{stage}"]["seconds"], 2
        )
    report["machine"] = {
        "cpus": psutil.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
