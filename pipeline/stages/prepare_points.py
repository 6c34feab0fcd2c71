"""Stage `prepare-points`: the point-cloud dataset, from `points.source`, and what the image stage renders.

Sources: `procedural` (meshes made here), `folder` (a class/split folder of mesh and point files),
`modelnet40_h5` (PointNet's HDF5 release) and `scanobjectnn` (its h5_files). Outputs in one folder (see
perception.data.arrays): `{train,test}_points` float32[N, P, 3], `{train,test}_labels` int64[N], and for the
image stage either `{train,test}_mesh_*` (every instance has a mesh) or `{train,test}_dense` float32[N, D, 3]
(some have only points: every instance is then rendered from points); `manifest.json`, which records the
source files' sha256.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from perception.data import benchmarks
from perception.data.arrays import pack_meshes, sha256_file, write_dataset
from perception.data.clouds import GEOMETRY_SUFFIXES, cloud_instance, dense_from_mesh, file_instance
from perception.data.meshio import UnusableFile, list_mesh_files
from perception.data.points import Instance, SamplingSpec, instance_rng, procedural_instance
from perception.data.sampling import turn_up
from pipeline.config import StudyConfig, resolve_path
from pipeline.errors import DataError
from pipeline.outputs import FORMAT_VERSION, SPLITS, atomic_output_dir, library_versions
from pipeline.parallel import parallel_map

_SLICE_KEY = 0x51  # the max_per_class draws' part of the seed key (apart from every instance's own draws)


def _procedural_item(item: tuple) -> Instance:
    class_name, anisotropy, deformation, spec, seed, key = item
    return procedural_instance(class_name, anisotropy, spec, seed, key, deformation=deformation)


def _file_item(item: tuple) -> Instance | str:
    path, up_axis, spec, seed, key = item
    try:
        return file_instance(path, up_axis, spec, seed, key)
    except UnusableFile as err:
        return str(err)


def _cloud_item(item: tuple) -> Instance | str:
    cloud, up_axis, spec, seed, key = item
    if len(cloud) == 0:
        return "no object points once the background is dropped"
    try:
        return cloud_instance(turn_up(cloud.astype(np.float64), up_axis), spec, seed, key)
    except UnusableFile as err:
        return str(err)


def _sliced(rows: list[tuple], max_per_class: int, seed: int, split_id: int, class_id: int) -> list[tuple]:
    """At most `max_per_class` of one split's rows of one class, drawn with the data seed, in their order."""
    if not max_per_class or len(rows) <= max_per_class:
        return rows
    rng = instance_rng(seed, (_SLICE_KEY, split_id, class_id))
    return [rows[i] for i in sorted(rng.choice(len(rows), size=max_per_class, replace=False))]


def _work_items(config: StudyConfig, base_dir: Path) -> tuple[list[str], list[tuple], list[tuple], Any, dict]:
    """(class names, item descriptions [(split, class index, source name)], items for the worker, the
    worker, the source files {relative path: sha256})."""
    points, seed = config.points, config.seed
    spec = SamplingSpec(points.num_points, points.noise_std, points.partial)
    described: list[tuple] = []
    items: list[tuple] = []
    if points.source == "procedural":
        classes = list(points.classes)
        counts = {"train": points.train_per_class, "test": points.test_per_class}
        for split_id, split in enumerate(SPLITS):
            for class_id, name in enumerate(classes):
                for i in range(counts[split]):
                    described.append((split, class_id, f"{name}#{i}"))
                    key = (0, split_id, class_id, i)
                    items.append((name, points.anisotropy, points.deformation, spec, seed, key))
        return classes, described, items, _procedural_item, {}
    root = resolve_path(points.root, base_dir)
    by_class: dict[tuple[int, int], list[tuple]] = {}  # (split, class) -> [(source name, payload)]
    files: list[Path] = []
    if points.source == "folder":
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for split_id, split in enumerate(SPLITS):
            for class_id, name in enumerate(classes):
                found = list_mesh_files(root / name / split)
                files += [p for p in found if p.suffix.lower() in GEOMETRY_SUFFIXES]
                by_class[split_id, class_id] = [(str(p.relative_to(root)), p) for p in found]
        worker = _file_item
    else:
        if points.source == "modelnet40_h5":
            classes, split_files = benchmarks.modelnet40_files(root)
        else:
            classes = list(benchmarks.SCANOBJECTNN_CLASSES)
            split_files = {s: [f] for s, f in benchmarks.scanobjectnn_files(root, points.variant).items()}
        files = [f for split in SPLITS for f in split_files[split]]
        drop = points.source == "scanobjectnn" and points.drop_background
        for split_id, split in enumerate(SPLITS):
            read = benchmarks.read_split(split_files[split], len(classes), drop)
            for class_id in range(len(classes)):
                chosen = np.flatnonzero(read.labels == class_id)
                by_class[split_id, class_id] = [(read.sources[i], read.clouds[i]) for i in chosen]
        worker = _cloud_item
    for split_id, split in enumerate(SPLITS):
        for class_id in range(len(classes)):
            # Each instance keeps its index among its class's files (or clouds) as its seed key, so a slice
            # draws the same points for an instance as the whole dataset does.
            indexed = list(enumerate(by_class[split_id, class_id]))
            for i, (source, payload) in _sliced(indexed, points.max_per_class, seed, split_id, class_id):
                described.append((split, class_id, source))
                items.append((payload, points.up_axis, spec, seed, (0, split_id, class_id, i)))
    digests = {str(f.relative_to(root)): sha256_file(f) for f in files}
    return classes, described, items, worker, digests


def prepare_points(config: StudyConfig, out: Path, base_dir: Path = Path(".")) -> dict[str, Any]:
    """Make the point dataset described by `config.points` in `out`; returns the manifest written."""
    started = time.perf_counter()
    classes, described, items, worker, digests = _work_items(config, base_dir)
    results = list(
        parallel_map(worker, items, config.runtime.workers, "prepare-points", config.runtime.progress)
    )

    kept: dict[str, list[tuple[int, Instance, str]]] = {split: [] for split in SPLITS}
    skipped = []
    for (split, class_id, source), result in zip(described, results, strict=True):
        if isinstance(result, str):
            skipped.append({"file": source, "reason": result})
        else:
            kept[split].append((class_id, result, source))
    for entry in skipped:
        print(f"skipped {entry['file']}: {entry['reason']}")

    usable = {
        name: sum(1 for split in SPLITS for c, _, _ in kept[split] if c == i)
        for i, name in enumerate(classes)
    }
    empty = [name for name, count in usable.items() if count == 0]
    if empty:
        reasons = "; ".join(
            f"{e['file']}: {e['reason']}" for e in skipped if e["file"].split("/")[0] in empty
        )
        what = "mesh" if config.points.source == "procedural" else "file or cloud"
        raise DataError(
            f"class {', '.join(map(repr, empty))} of points.root = {config.points.root!r} has no usable "
            f"{what} ({reasons or 'none there'})"
        )

    # Images come from meshes where every instance has one; otherwise every instance is rendered from
    # points, so that no class is told apart by how it was rendered.
    from_meshes = all(inst.faces is not None for split in SPLITS for _, inst, _ in kept[split])
    arrays: dict[str, np.ndarray] = {}
    splits: dict[str, Any] = {}
    for split_id, split in enumerate(SPLITS):
        rows = kept[split]
        arrays[f"{split}_points"] = np.stack([inst.points for _, inst, _ in rows]).astype(np.float32)
        arrays[f"{split}_labels"] = np.array([c for c, _, _ in rows], dtype=np.int64)
        if from_meshes:
            meshes = [inst.mesh() for _, inst, _ in rows]
            arrays.update(pack_meshes(meshes, f"{split}_mesh"))
        else:
            dense = [
                (
                    inst if inst.dense is not None else dense_from_mesh(inst, config.seed, (0, split_id, i))
                ).dense_points()
                for i, (_, inst, _) in enumerate(rows)
            ]
            arrays[f"{split}_dense"] = np.stack(dense).astype(np.float32)
        per_class = {name: int((arrays[f"{split}_labels"] == i).sum()) for i, name in enumerate(classes)}
        splits[split] = {
            "count": len(rows),
            "per_class": per_class,
            "repeated": sum(inst.repeated for _, inst, _ in rows),
            "sources": [s for _, _, s in rows],
        }
        for name, count in per_class.items():
            if count == 0:
                print(f"warning: class {name!r} has no usable instance in {split}/")

    manifest = {
        "kind": "points",
        "format_version": FORMAT_VERSION,
        "seed": config.seed,
        "params": config.points.plain(),
        "classes": classes,
        "up_axis": "+z",
        "normalisation": "each cloud centred on its mean, farthest point at radius 1",
        "render_from": "meshes" if from_meshes else "points",
        "splits": splits,
        "skipped": skipped,
        "source_files": digests,
        # One digest of them all: what changes when any source file does (MLflow's dataset.points tags).
        "source_sha256": hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest(),
        "generator": library_versions(),
    }
    with atomic_output_dir(out) as folder:
        manifest = write_dataset(folder, arrays, manifest)
    elapsed = time.perf_counter() - started
    repeated = sum(splits[s]["repeated"] for s in SPLITS)
    print(
        f"prepare-points: {splits['train']['count']} train + {splits['test']['count']} test clouds of "
        f"{config.points.num_points} points ({config.points.source}), {len(classes)} classes, "
        f"{len(skipped)} skipped, {repeated} with points repeated, images from {manifest['render_from']}, "
        f"in {elapsed:.1f} s -> {out}"
    )
    return manifest
