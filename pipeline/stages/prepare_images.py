"""Stage `prepare-images`: the point stage's instances rendered as depth + normal images.

Outputs in one folder: `train_r<R>` float32[N, 4, R, R] at the training resolution, `test_r<R>` at every
resolution (training and evaluation), `{train,test}_labels` int64[N], `manifest.json`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from perception.data.arrays import open_dataset, unpack_mesh, write_dataset
from perception.data.render import Camera, render_depth_normals
from pipeline.config import StudyConfig
from pipeline.outputs import atomic_output_dir
from pipeline.parallel import parallel_map
from pipeline.stages.prepare_points import FORMAT_VERSION, SPLITS, library_versions


def _render_item(item: tuple) -> list[np.ndarray]:
    vertices, faces, camera, resolutions = item
    return [render_depth_normals(vertices, faces, camera, r) for r in resolutions]


def prepare_images(config: StudyConfig, points_dir: Path, out: Path) -> dict[str, Any]:
    """Render every instance of the point dataset in `points_dir` into `out`; returns the manifest written."""
    started = time.perf_counter()
    images = config.images
    points = open_dataset(points_dir, "points")
    camera = Camera(
        images.camera_distance, images.camera_azimuth_deg, images.camera_elevation_deg, images.fov_deg
    )
    resolutions = {"train": (images.train_resolution,), "test": images.resolutions}

    arrays: dict[str, np.ndarray] = {}
    for split in SPLITS:
        mesh_arrays = {
            name: points.array(f"{split}_mesh_{name}")
            for name in ("vertices", "faces", "vertex_offsets", "face_offsets")
        }
        mesh_arrays = {f"{split}_mesh_{k}": v for k, v in mesh_arrays.items()}
        count = points.manifest["splits"][split]["count"]
        items = [
            (*unpack_mesh(mesh_arrays, f"{split}_mesh", i), camera, resolutions[split]) for i in range(count)
        ]
        rendered = list(
            parallel_map(
                _render_item,
                items,
                config.runtime.workers,
                f"prepare-images {split}",
                config.runtime.progress,
            )
        )
        for k, resolution in enumerate(resolutions[split]):
            arrays[f"{split}_r{resolution}"] = np.stack([r[k] for r in rendered]).astype(np.float32)
        arrays[f"{split}_labels"] = points.array(f"{split}_labels")

    manifest = {
        "kind": "images",
        "format_version": FORMAT_VERSION,
        "seed": config.seed,
        "params": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(images).items()},
        "classes": points.manifest["classes"],
        "channels": ["depth", "normal_x", "normal_y", "normal_z"],
        "train_resolution": images.train_resolution,
        "resolutions": list(images.resolutions),
        "splits": {s: {"count": points.manifest["splits"][s]["count"]} for s in SPLITS},
        "points_manifest_sha256": points.manifest_sha256,
        "generator": library_versions(),
    }
    with atomic_output_dir(out) as folder:
        manifest = write_dataset(folder, arrays, manifest)
    elapsed = time.perf_counter() - started
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in arrays.items() if "_r" in k)
    print(f"prepare-images: {shapes} in {elapsed:.1f} s -> {out}")
    return manifest
