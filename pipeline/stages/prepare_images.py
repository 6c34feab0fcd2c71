"""Stage `prepare-images`: the point stage's instances rendered as depth + normal images on canvases.

Each instance is ray-cast from its mesh, or, where the point stage kept points only (its manifest's
`render_from: points`), splatted from its dense cloud with normals estimated from the cloud
(perception.data.splat): the same channels, camera and canvases either way.

Each object is rendered at `images.object_size` px and placed at a random position on a black
`train_resolution` canvas (perception.data.canvas); the test instances are also placed in claim 2's paired
test sets at every test canvas R of `eval_resolutions`. Outputs in one folder:
- `train_r<T>` float32[N, 4, T, T], `train_offsets` int64[N, 2] (the object's top-left (row, col));
- `test_r<T>` (the training distribution) and `test_offsets`;
- for every R: `test_fov_r<R>` (a), `test_centre_r<R>` and `test_corner_r<R>` (b), all [N, 4, R, R], and
  `test_scaled<R>_r<T>` (c) [N, 4, T, T];
- `{train,test}_labels` int64[N], `manifest.json`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from perception.data.arrays import open_dataset, unpack_mesh, write_dataset
from perception.data.canvas import CHANNELS, PLACEMENTS, paste, placement, random_offsets
from perception.data.points import instance_rng
from perception.data.render import Camera, render_depth_normals
from perception.data.splat import estimate_normals, point_spacing, render_points
from pipeline.config import StudyConfig
from pipeline.outputs import FORMAT_VERSION, SPLITS, atomic_output_dir, library_versions
from pipeline.parallel import parallel_map

_OFFSET_KEY = 0xCA  # the placement draws' part of each instance's seed key (apart from the point stage's)


def _render_item(item: tuple) -> dict[int, np.ndarray]:
    """Sprite size -> float32[4, s, s]: one instance's mesh ray-cast at every size its images need."""
    vertices, faces, camera, sizes = item
    return {s: render_depth_normals(vertices, faces, camera, s) for s in sizes}


def _splat_item(item: tuple) -> dict[int, np.ndarray]:
    """Sprite size -> float32[4, s, s]: one instance's dense cloud splatted at every size, its normals and
    point spacing estimated once."""
    points, camera, sizes = item
    normals, spacing = estimate_normals(points), point_spacing(points)
    return {s: render_points(points, normals, camera, s, spacing) for s in sizes}


def canvas_set_file(kind: str, canvas: int, train_canvas: int) -> str:
    """The file of test set `kind` (perception.data.canvas.PLACEMENTS, or "in") at test canvas `canvas`."""
    if kind == "in":
        return f"test_r{train_canvas}"
    if kind == "scaled":
        return f"test_scaled{canvas}_r{train_canvas}"
    return f"test_{kind}_r{canvas}"


def prepare_images(config: StudyConfig, points_dir: Path, out: Path) -> dict[str, Any]:
    """Render every instance of the point dataset in `points_dir` into `out`; returns the manifest written."""
    started = time.perf_counter()
    images = config.images
    points = open_dataset(points_dir, "points")
    camera = Camera(
        images.camera_distance, images.camera_azimuth_deg, images.camera_elevation_deg, images.fov_deg
    )
    T, S = images.train_resolution, images.object_size
    canvases = tuple(r for r in images.resolutions if r != T)
    scaled_sizes = {r: r * S // T for r in canvases}  # the object's side in (a) and (c) at canvas r
    sizes = {"train": (S,), "test": tuple(sorted({S, *scaled_sizes.values()}))}

    from_points = points.manifest.get("render_from") == "points"
    arrays: dict[str, np.ndarray] = {}
    for split_id, split in enumerate(SPLITS):
        count = points.manifest["splits"][split]["count"]
        items: list[tuple]  # the renderer's arguments per instance
        if from_points:
            dense = points.array(f"{split}_dense")
            items = [(dense[i], camera, sizes[split]) for i in range(count)]
        else:
            mesh_arrays = {
                name: points.array(f"{split}_mesh_{name}")
                for name in ("vertices", "faces", "vertex_offsets", "face_offsets")
            }
            mesh_arrays = {f"{split}_mesh_{k}": v for k, v in mesh_arrays.items()}
            items = [
                (*unpack_mesh(mesh_arrays, f"{split}_mesh", i), camera, sizes[split]) for i in range(count)
            ]
        sprites = list(
            parallel_map(
                _splat_item if from_points else _render_item,
                items,
                config.runtime.workers,
                f"prepare-images {split}",
                config.runtime.progress,
            )
        )
        offsets = np.stack(
            [
                random_offsets(1, T, S, instance_rng(config.seed, (_OFFSET_KEY, split_id, i)))[0]
                for i in range(count)
            ]
        )  # (N, 2)
        arrays[f"{split}_r{T}"] = np.stack([paste(s[S], T, o) for s, o in zip(sprites, offsets, strict=True)])
        arrays[f"{split}_offsets"] = offsets.astype(np.int64)
        arrays[f"{split}_labels"] = points.array(f"{split}_labels")
        if split == "test":
            for canvas in canvases:
                for kind in PLACEMENTS:
                    rendered = []
                    for sprite, offset in zip(sprites, offsets, strict=True):
                        side, size, at = placement(kind, offset, T, S, canvas)
                        rendered.append(paste(sprite[size], side, at))
                    arrays[canvas_set_file(kind, canvas, T)] = np.stack(rendered)

    manifest = {
        "kind": "images",
        "task": "shapes",
        "format_version": FORMAT_VERSION,
        "seed": config.seed,
        "params": images.plain(),
        "classes": points.manifest["classes"],
        "channels": list(CHANNELS),
        "rendered_from": "points (splatted, normals estimated)" if from_points else "meshes (ray-cast)",
        "train_resolution": T,
        "object_size": S,
        "resolutions": list(images.resolutions),
        "test_sets": {
            str(canvas): {kind: canvas_set_file(kind, canvas, T) for kind in PLACEMENTS}
            for canvas in canvases
        },
        "splits": {s: {"count": points.manifest["splits"][s]["count"]} for s in SPLITS},
        "points_manifest_sha256": points.manifest_sha256,
        "generator": library_versions(),
    }
    with atomic_output_dir(out) as folder:
        manifest = write_dataset(folder, arrays, manifest)
    elapsed = time.perf_counter() - started
    print(
        f"prepare-images: objects rendered from {'points' if from_points else 'meshes'}, {S} px at "
        f"random positions on {T} px canvases "
        f"({arrays[f'train_r{T}'].shape[0]} train, {arrays[f'test_r{T}'].shape[0]} test); test sets (a) fov, "
        f"(b) centre / corner, (c) scaled at {', '.join(f'{c} px' for c in canvases)}; "
        f"in {elapsed:.1f} s -> {out}"
    )
    return manifest
