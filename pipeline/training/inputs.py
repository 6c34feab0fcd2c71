"""What the trials train on: each prepared dataset's train split, split again into train and validation,
with the datasets' hashes and their MLflow dataset inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from perception.data.arrays import open_dataset
from perception.data.canvas import CHANNELS
from perception.training import stratified_split
from pipeline.config import StudyConfig
from pipeline.training.trainable import TrialData


def split_data(config: StudyConfig, inputs: np.ndarray, labels: np.ndarray) -> TrialData:
    train_idx, val_idx = stratified_split(labels, config.train.val_fraction, config.seed)
    return TrialData(
        np.ascontiguousarray(inputs[train_idx]),
        labels[train_idx],
        np.ascontiguousarray(inputs[val_idx]),
        labels[val_idx],
    )


@dataclass(frozen=True)
class TrainingInputs:
    """The arrays each dataset's trials see, what they are (hashes), and their MLflow dataset inputs."""

    data: dict[str, TrialData | None]  # "points", "images", "proximity" -> its split (None: unused)
    hashes: dict[str, str]  # dataset -> its manifest's sha256 ("" where unused)
    mlflow_inputs: dict[str, list]  # dataset -> its train, validation and test inputs
    source_tags: dict[str, str]  # where the points came from, and the source files' digest, for MLflow


def source_tags(points_manifest: dict) -> dict[str, str]:
    """`dataset.points.source` (the source, its variant and root) and `dataset.points.source_sha256` (of
    its files' sha256s), for a points dataset read from files; {} for procedural shapes."""
    params = points_manifest.get("params", {})
    source = params.get("source", "procedural")
    if source == "procedural":
        return {}
    variant = f" {params['variant']}" if source == "scanobjectnn" else ""
    return {
        "dataset.points.source": f"{source}{variant}, {params.get('root')}",
        "dataset.points.source_sha256": points_manifest.get("source_sha256", ""),
    }


def open_inputs(config: StudyConfig, datasets: set[str], folders: dict[str, Path]) -> tuple[dict, int, int]:
    """The prepared datasets the variants need ({"points", ...} -> PreparedDataset or None), checked
    before any work, with the shape data's class and channel counts."""
    points = open_dataset(folders["points"], "points")
    images = open_dataset(folders["images"], "images") if "images" in datasets else None
    proximity = open_dataset(folders["proximity"], "images") if "proximity" in datasets else None
    in_channels = len(images.manifest["channels"]) if images else len(CHANNELS)
    prepared = {"points": points, "images": images, "proximity": proximity}
    return prepared, len(points.manifest["classes"]), in_channels


def array_stems(config: StudyConfig) -> dict[str, str]:
    """Each dataset's stem of the arrays the models train and are tested on in distribution
    (`train_<stem>`, `test_<stem>`): the points, the renders at the training canvas, the proximity task."""
    return {
        "points": "points",
        "images": f"r{config.images.train_resolution}",
        "proximity": f"r{config.proximity.size}",
    }


def training_inputs(
    config: StudyConfig,
    datasets: set[str],
    folders: dict[str, Path],
    prepared: dict,
    describe: Callable[..., Any],
) -> TrainingInputs:
    """Each needed dataset's train split, split into train and validation (stratified, seeded); `describe`
    makes a tracking store's dataset input of (dataset, context, inputs, labels, file, digest): the
    train stage hands in `pipeline.tracking.review.dataset_input`, so this side of training needs no
    MLflow."""
    data: dict[str, TrialData | None] = {}
    mlflow_inputs = {}
    for kind, stem in array_stems(config).items():
        dataset = prepared[kind]
        if dataset is None or kind not in datasets:
            data[kind] = None
            continue
        split = data[kind] = split_data(config, dataset.array(f"train_{stem}"), dataset.array("train_labels"))
        test = (dataset.array(f"test_{stem}", mmap=True), dataset.array("test_labels"))
        # What the runs trained and were validated and tested on, as MLflow dataset inputs.
        mlflow_inputs[kind] = [
            describe(kind, context, x, y, Path(folders[kind]) / f"{file}_{stem}.npy", dataset.manifest_sha256)
            for context, file, (x, y) in (
                ("train", "train", (split.train_inputs, split.train_labels)),
                ("validation", "train", (split.val_inputs, split.val_labels)),
                ("test", "test", test),
            )
        ]
    hashes = {kind: dataset.manifest_sha256 if dataset else "" for kind, dataset in prepared.items()}
    return TrainingInputs(data, hashes, mlflow_inputs, source_tags(prepared["points"].manifest))
