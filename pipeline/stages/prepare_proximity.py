"""Stage `prepare-proximity`: claim 1's image task, whose label depends on 2D adjacency alone.

Outputs in one folder (an `images` dataset, see perception.data.arrays):
- `{train,test}_r<S>` float32[N, 1, S, S];
- `{train,test}_labels` int64[N]: 0 = every segment broken by a gap, 1 = every one solid;
- `{train,test}_orientation` int64[N]: 0 = the segments are horizontal, 1 = vertical (the evaluation splits
  accuracy by it: row-major order keeps only horizontal neighbours together);
- `manifest.json`.
Every instance is a pure function of (params, seed, split, index), so the files are byte-identical however
many workers draw them.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from perception.data.arrays import write_dataset
from perception.data.proximity import (
    CHANNELS,
    SPLIT_KEYS,
    ProximityParams,
    proximity_instance,
    segment_orientation,
)
from pipeline.config import StudyConfig, proximity_params
from pipeline.outputs import FORMAT_VERSION, SPLITS, atomic_output_dir, library_versions
from pipeline.parallel import parallel_map

_CHUNK = 64  # instances per work item: one instance is ~0.1 ms, too little to send to a process alone


def _draw_chunk(item: tuple[ProximityParams, int, str, int, int]) -> tuple[np.ndarray, ...]:
    """(images, labels, orientations) of instances start..stop-1 of a split."""
    params, seed, split, start, stop = item
    keys = [(SPLIT_KEYS[split], i) for i in range(start, stop)]
    drawn = [proximity_instance(params, seed, key, label=key[1] % 2) for key in keys]
    # Orientation is read from the clean pixels: the generator draws the noise last, so without it the
    # same cells are lit. Noise-free images are clean already: no second draw.
    clean_images = [image for image, _ in drawn]
    if params.noise_std > 0:
        clean = dataclasses.replace(params, noise_std=0.0)
        clean_images = [proximity_instance(clean, seed, key, label=key[1] % 2)[0] for key in keys]
    orientation = [segment_orientation(image) for image in clean_images]
    images = np.stack([image for image, _ in drawn])
    labels = np.array([label for _, label in drawn], dtype=np.int64)
    return images, labels, np.array(orientation, dtype=np.int64)


def prepare_proximity(config: StudyConfig, out: Path) -> dict[str, Any]:
    """Draw both splits into `out`; returns the manifest written. Instance i has label i % 2 (balanced)."""
    started = time.perf_counter()
    prox, params = config.proximity, proximity_params(config.proximity)
    counts = {"train": prox.train_count, "test": prox.test_count}
    arrays: dict[str, np.ndarray] = {}
    for split in SPLITS:
        items = [
            (params, config.seed, split, start, min(start + _CHUNK, counts[split]))
            for start in range(0, counts[split], _CHUNK)
        ]
        chunks = list(
            parallel_map(
                _draw_chunk,
                items,
                config.runtime.workers,
                f"prepare-proximity {split}",
                config.runtime.progress,
            )
        )
        arrays[f"{split}_r{prox.size}"] = np.concatenate([c[0] for c in chunks]).astype(np.float32)
        arrays[f"{split}_labels"] = np.concatenate([c[1] for c in chunks])
        arrays[f"{split}_orientation"] = np.concatenate([c[2] for c in chunks])
    manifest = {
        "kind": "images",
        "task": "proximity",
        "format_version": FORMAT_VERSION,
        "seed": config.seed,
        "params": prox.plain(),
        "classes": ["broken", "solid"] if prox.task == "gap" else ["horizontal", "vertical"],
        "channels": list(CHANNELS),
        "train_resolution": prox.size,
        "resolutions": [prox.size],
        "lit_pixels": params.lit_pixels,
        "splits": {s: {"count": counts[s]} for s in SPLITS},
        "generator": library_versions(),
    }
    with atomic_output_dir(out) as folder:
        manifest = write_dataset(folder, arrays, manifest)
    elapsed = time.perf_counter() - started
    print(
        f"prepare-proximity: {counts['train']} train + {counts['test']} test images, task {prox.task!r}, "
        f"{prox.size}x{prox.size} px ({params.lit_pixels} lit each), in {elapsed:.1f} s -> {out}"
    )
    return manifest
