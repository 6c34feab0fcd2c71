"""What the evaluate stage measures on the trained checkpoints, kept per test sample and training seed.

Every measurement keeps the raw correctness of each test sample under each trained model (one per
training seed), so that `pipeline.evidence` can put intervals on accuracies and on the differences the
verdicts judge (a hierarchical bootstrap over seeds, then samples). Nothing here aggregates across seeds.

Arrays (numpy, bool or float):
  rotation[variant][mode]: bool[S, N, D]  S seeds, N test clouds, D rotation draws (1 for `none`)
  rotation_angles[mode]:   float64[N, D]  the geodesic angle of every (cloud, draw); the same for all models
  images[variant][set]:    bool[S, N]     correct on test set `set` of the model's image dataset: the shape
                                          canvases' `in`, `fov_<R>`, `centre_<R>`, `corner_<R>`,
                                          `scaled_<R>` (claim 2), or the proximity task's `in` (claim 1)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perception.data.arrays import DatasetError
from perception.models.checkpoint import CheckpointError, ModelCheckpoint, build_float64, load_checkpoint
from perception.training import predict, subsample_points


@dataclass
class Checkpoint:
    """One trained model: a variant at one training seed, rebuilt and in eval mode."""

    variant: str
    seed: int
    saved: ModelCheckpoint  # family, model config, weights, training settings
    model: torch.nn.Module

    @property
    def family(self) -> str:
        return self.saved.family

    @property
    def config(self) -> dict[str, Any]:
        return self.saved.config

    @property
    def training(self) -> dict[str, Any]:
        return self.saved.training

    @property
    def input_kind(self) -> str:
        return self.saved.input_kind

    @property
    def dataset(self) -> str:
        """What the variant trained and is tested on: points, images (the shape renders) or proximity."""
        return self.training["dataset"]


def load_checkpoints(train_dir: Path) -> dict[str, dict[int, Checkpoint]]:
    """variant -> seed -> Checkpoint, from `<train_dir>/models/<variant>/seed-<seed>.pt`."""
    folder = train_dir / "models"
    if not folder.is_dir():
        raise DatasetError(f"{folder}: missing; run the train stage first (dvc repro train)")
    found: dict[str, dict[int, Checkpoint]] = {}
    for path in sorted(folder.glob("*/*.pt")):
        try:
            saved = load_checkpoint(path, retrain_hint="retrain: `dvc repro -f train`")
            model = saved.build()
            training = saved.training
            variant, seed, _dataset = training["variant"], int(training["seed"]), training["dataset"]
        except CheckpointError as err:
            raise DatasetError(str(err)) from None
        except (
            RuntimeError,
            KeyError,
            TypeError,
            ValueError,  # hparams the family's config refuses (ModelConfigError), e.g. an unknown size
        ) as err:
            # load_state_dict puts the first mismatch ("size mismatch for head.weight: ...") on line two.
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            reason = " ".join(lines[:2])[:300] if lines else type(err).__name__
            raise DatasetError(
                f"{path}: not a usable checkpoint ({reason}); retrain: `dvc repro -f train`"
            ) from None
        found.setdefault(variant, {})[seed] = Checkpoint(variant, seed, saved, model)
    if not found:
        raise DatasetError(
            f"{folder}: holds no checkpoints (<variant>/seed-<seed>.pt); rerun the train stage"
        )
    return {variant: dict(sorted(by_seed.items())) for variant, by_seed in sorted(found.items())}


def with_unhelped_tables(checkpoints: dict[str, dict[int, Checkpoint]]) -> dict[str, dict[int, Checkpoint]]:
    """The checkpoints, plus every ViT trained with a learned table (`pos_embed: learned`) read a second way:
    as `learned_fixed`, the same trained weights with the table kept at its own grid positions instead of
    bicubic-resampled (claim 2's "learned, without help"). The two readings differ only where the grid
    differs from the training grid, so one training serves both and their comparison is paired down to the
    weights. The derived variant is `<variant>` with `learned` replaced by `learned_fixed`, and its training
    record names the variant it reads (`read_from`); a variant trained as `learned_fixed` is kept as it is."""
    out = dict(checkpoints)
    for variant, by_seed in checkpoints.items():
        first = next(iter(by_seed.values()))
        if first.family != "vit" or first.config["pos_embed"] != "learned" or first.dataset != "images":
            continue  # claim 2's renders only
        name = variant.replace("learned", "learned_fixed") if "learned" in variant else f"{variant}-fixed"
        if name in out:
            continue
        derived = {}
        for seed, ckpt in by_seed.items():
            saved = dataclasses.replace(
                ckpt.saved,
                config={**ckpt.config, "pos_embed": "learned_fixed"},
                training={**ckpt.training, "variant": name, "read_from": variant},
            )
            derived[seed] = Checkpoint(name, seed, saved, saved.build())
        out[name] = derived
    return dict(sorted(out.items()))


def stratified_subset(labels: np.ndarray, count: int) -> np.ndarray:
    """`count` test indices that cover every class, round-robin over classes in index order."""
    by_class = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    chosen: list[int] = []
    while len(chosen) < min(count, len(labels)):
        for members in by_class:
            if members and len(chosen) < count:
                chosen.append(members.pop(0))
    return np.sort(np.asarray(chosen, dtype=np.int64))


def test_clouds(points: np.ndarray, trained_points: int, seed: int) -> torch.Tensor:
    """The test clouds at the point count the models trained on (a seeded random subset of each cloud)."""
    clouds = torch.from_numpy(points)
    generator = torch.Generator().manual_seed(seed)
    return subsample_points(clouds, trained_points, generator).contiguous()


@dataclass
class RotationMeasurements:
    correct: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # variant -> mode -> [S, N, D]
    angles: dict[str, np.ndarray] = field(default_factory=dict)  # mode -> float64[N, D]
    invariance_error: dict[str, float] = field(default_factory=dict)  # variant -> worst over seeds
    seeds: dict[str, list[int]] = field(default_factory=dict)
    points_per_cloud: int = 0


def measure_rotation(
    checkpoints: dict[str, dict[int, Checkpoint]],
    points: np.ndarray,
    labels: np.ndarray,
    *,
    draws: int,
    data_seed: int,
    batch_size: int,
    invariance_clouds: int,
    trained_points: int,
    progress=print,
) -> RotationMeasurements:
    """Every point model at every seed on the test clouds under none / z / SO(3) rotations, and the float64
    invariance error on a class-stratified subset. Rotations depend on the data seed only, so every model
    sees the same rotated clouds (paired comparisons)."""
    from perception.evaluation.rotation import evaluate_rotations, invariance_error

    clouds = test_clouds(points, trained_points, data_seed)
    targets = torch.from_numpy(labels)
    subset = torch.from_numpy(stratified_subset(labels, invariance_clouds))
    out = RotationMeasurements(points_per_cloud=clouds.shape[1])
    for variant, by_seed in checkpoints.items():
        if next(iter(by_seed.values())).input_kind != "points":
            continue
        per_mode: dict[str, list[np.ndarray]] = {}
        worst = 0.0
        for seed, ckpt in by_seed.items():
            results = evaluate_rotations(
                ckpt.model, clouds, targets, draws=draws, seed=data_seed, batch_size=batch_size
            )
            for mode, result in results.items():
                per_mode.setdefault(mode, []).append(result.correct.numpy())
                out.angles.setdefault(mode, result.angles_deg.numpy())
            error = invariance_error(build_float64(ckpt.saved), clouds[subset], rotations=2, seed=data_seed)
            worst = max(worst, error)
            shown = "  ".join(f"{m} {float(r.correct.double().mean()):.3f}" for m, r in results.items())
            progress(f"evaluate: {variant:22s} seed {seed}  {shown}  invariance error {error:.1e}")
        out.correct[variant] = {mode: np.stack(arrays) for mode, arrays in per_mode.items()}
        out.invariance_error[variant] = worst
        out.seeds[variant] = list(by_seed)
    return out


@dataclass
class ImageMeasurements:
    correct: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # variant -> test set -> [S, N]
    seeds: dict[str, list[int]] = field(default_factory=dict)


def measure_images(
    checkpoints: dict[str, dict[int, Checkpoint]],
    test_sets: dict[str, np.ndarray],
    labels: np.ndarray,
    *,
    dataset: str,
    batch_size: int,
    progress=print,
) -> ImageMeasurements:
    """Every image model trained on `dataset` ("images" or "proximity"), at every seed, on every test set
    (name -> float32[N, C, H, W], all of the same N instances). Models run on any canvas as they are: ViT's
    position encoding decides what happens at a grid it did not train on (its `pos_embed`)."""
    targets = torch.from_numpy(labels)
    out = ImageMeasurements()
    for variant, by_seed in checkpoints.items():
        if next(iter(by_seed.values())).dataset != dataset:
            continue
        per_set: dict[str, list[np.ndarray]] = {}
        for seed, ckpt in by_seed.items():
            shown = []
            for name, images in test_sets.items():
                predicted = predict(ckpt.model, torch.from_numpy(images), batch_size, torch.device("cpu"))
                correct = (predicted == targets).numpy()
                per_set.setdefault(name, []).append(correct)
                shown.append(f"{name} {correct.mean():.3f}")
            progress(f"evaluate: {variant:26s} seed {seed}  " + "  ".join(shown))
        out.correct[variant] = {name: np.stack(arrays) for name, arrays in per_set.items()}
        out.seeds[variant] = list(by_seed)
    return out


def save_arrays(
    path: Path, rotation: RotationMeasurements, canvas: ImageMeasurements, proximity: ImageMeasurements
) -> None:
    """Every per-sample array in one `.npz`, for re-analysis (`np.load(path)`; keys `kind/variant/...`)."""
    arrays: dict[str, np.ndarray] = {}
    for variant, modes in rotation.correct.items():
        for mode, array in modes.items():
            arrays[f"rotation/{variant}/{mode}"] = array
    for mode, angles in rotation.angles.items():
        arrays[f"rotation_angles/{mode}"] = angles
    for kind, measured in (("resolution", canvas), ("serialisation", proximity)):
        for variant, by_set in measured.correct.items():
            for name, array in by_set.items():
                arrays[f"{kind}/{variant}/{name}"] = array
    with open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)
