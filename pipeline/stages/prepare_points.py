"""Stage `prepare-points`: the point-cloud dataset, and the normalised meshes it was sampled from.

Outputs in one folder (see perception.data.arrays): `{train,test}_points` float32[N, P, 3],
`{train,test}_labels` int64[N], `{train,test}_mesh_*` (the meshes, for the image stage), `manifest.json`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from perception.data.arrays import pack_meshes, write_dataset
from perception.data.meshio import UnusableMesh, list_mesh_files
from perception.data.points import Instance, SamplingSpec, file_instance, procedural_instance
from pipeline.config import StudyConfig, resolve_path
from pipeline.errors import DataError
from pipeline.outputs import FORMAT_VERSION, SPLITS, atomic_output_dir, library_versions
from pipeline.parallel import parallel_map


def _procedural_item(item: tuple) -> Instance:
    class_name, anisotropy, deformation, spec, seed, key = item
    return procedural_instance(class_name, anisotropy, spec, seed, key, deformation=deformation)


def _file_item(item: tuple) -> Instance | str:
    path, up_axis, spec, seed, key = item
    try:
        return file_instance(path, up_axis, spec, seed, key)
    except UnusableMesh as err:
        return str(err)


def _work_items(config: StudyConfig, base_dir: Path) -> tuple[list[str], list[tuple], list[tuple]]:
    """(class names, item descriptions [(split, class index, source name)], items for the worker)."""
    points, seed = config.points, config.seed
    spec = SamplingSpec(points.num_points, points.noise_std, points.partial)
    described, items = [], []
    if points.source == "procedural":
        classes = list(points.classes)
        counts = {"train": points.train_per_class, "test": points.test_per_class}
        for split_id, split in enumerate(SPLITS):
            for class_id, name in enumerate(classes):
                for i in range(counts[split]):
                    described.append((split, class_id, f"{name}#{i}"))
                    key = (0, split_id, class_id, i)
                    items.append((name, points.anisotropy, points.deformation, spec, seed, key))
        return classes, described, items
    root = resolve_path(points.root, base_dir)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for split_id, split in enumerate(SPLITS):
        for class_id, name in enumerate(classes):
            for i, path in enumerate(list_mesh_files(root / name / split)):
                described.append((split, class_id, str(path.relative_to(root))))
                items.append((path, points.up_axis, spec, seed, (0, split_id, class_id, i)))
    return classes, described, items


def prepare_points(config: StudyConfig, out: Path, base_dir: Path = Path(".")) -> dict[str, Any]:
    """Make the point dataset described by `config.points` in `out`; returns the manifest written."""
    started = time.perf_counter()
    classes, described, items = _work_items(config, base_dir)
    worker = _procedural_item if config.points.source == "procedural" else _file_item
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
        raise DataError(f"class {', '.join(map(repr, empty))} has no usable mesh ({reasons or 'no files'})")

    arrays: dict[str, np.ndarray] = {}
    splits: dict[str, Any] = {}
    for split in SPLITS:
        rows = kept[split]
        arrays[f"{split}_points"] = np.stack([inst.points for _, inst, _ in rows]).astype(np.float32)
        arrays[f"{split}_labels"] = np.array([c for c, _, _ in rows], dtype=np.int64)
        arrays.update(pack_meshes([(inst.vertices, inst.faces) for _, inst, _ in rows], f"{split}_mesh"))
        per_class = {name: int((arrays[f"{split}_labels"] == i).sum()) for i, name in enumerate(classes)}
        splits[split] = {"count": len(rows), "per_class": per_class, "sources": [s for _, _, s in rows]}
        for name, count in per_class.items():
            if count == 0:
                print(f"warning: class {name!r} has no usable mesh in {split}/")

    params = config.points.plain()
    manifest = {
        "kind": "points",
        "format_version": FORMAT_VERSION,
        "seed": config.seed,
        "params": params,
        "classes": classes,
        "up_axis": "+z",
        "normalisation": "each cloud centred on its mean, farthest point at radius 1",
        "splits": splits,
        "skipped": skipped,
        "generator": library_versions(),
    }
    with atomic_output_dir(out) as folder:
        manifest = write_dataset(folder, arrays, manifest)
    elapsed = time.perf_counter() - started
    print(
        f"prepare-points: {splits['train']['count']} train + {splits['test']['count']} test clouds of "
        f"{config.points.num_points} points, {len(classes)} classes, {len(skipped)} files skipped, "
        f"in {elapsed:.1f} s -> {out}"
    )
    return manifest
