"""What the evaluate stage measures on the trained checkpoints, kept per test sample and training seed.

Every measurement keeps the raw correctness of each test sample under each trained model (one per training
seed), so that `pipeline.evaluation.evidence` can put intervals on accuracies and on the differences the
verdicts judge (a hierarchical bootstrap over seeds, then samples). Nothing here aggregates across seeds.

Arrays (numpy, bool or float):
  rotation[variant][mode]: bool[S, N, D]  S seeds, N test clouds, D rotation draws (1 for `none`)
  rotation_angles[mode]:   float64[N, D]  the geodesic angle of every (cloud, draw); the same for all models
  images[variant][set]:    bool[S, N]     correct on test set `set` of the model's image dataset: the shape
                                          canvases' `in`, `fov_<R>`, `centre_<R>`, `corner_<R>`,
                                          `scaled_<R>` (claim 2), or the proximity task's `in` (claim 1)
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perception.allocator import keep_freed_blocks
from perception.data.arrays import DatasetError
from perception.evaluation.cost import torch_threads
from perception.evaluation.deployment import (
    REFERENCE,
    DeploymentCost,
    Latency,
    LatencyRounds,
    machine_reference,
    measure_deployment,
)
from perception.models.checkpoint import CheckpointError, ModelCheckpoint, build_float64, load_checkpoint
from perception.training import predict, subsample_points
from pipeline.parallel import parallel_map


@dataclass
class Checkpoint:
    """One trained model: a variant at one training seed, rebuilt and in eval mode."""

    variant: str
    seed: int
    saved: ModelCheckpoint  # family, model config, weights, training settings
    model: torch.nn.Module
    path: Path | None = None  # the checkpoint file (a derived reading: the file it reads)

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
            saved = load_checkpoint(path, retrain_hint="retrain: `dvc repro -f -s train && dvc repro`")
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
                f"{path}: not a usable checkpoint ({reason}); retrain: `dvc repro -f -s train && dvc repro`"
            ) from None
        found.setdefault(variant, {})[seed] = Checkpoint(variant, seed, saved, model, path)
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
            derived[seed] = Checkpoint(name, seed, saved, saved.build(), ckpt.path)
        out[name] = derived
    return dict(sorted(out.items()))


def stratified_subset(labels: np.ndarray, count: int) -> np.ndarray:
    """`count` test indices that cover every class, round-robin over classes in index order."""
    by_class = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    chosen: list[int] = []
    while len(chosen) < min(count, len(labels)):
        for members in by_class:
            if members and len(chosen) < count:
                chosen.append(int(members.pop(0)))
    return np.sort(np.asarray(chosen, dtype=np.int64))


def tested_points(trained_points: int, points_in_file: int) -> int:
    """Points per cloud every point model is tested and timed on: as many as it trained on (0: all), at
    most what the test file holds."""
    return min(trained_points or 1 << 30, points_in_file)


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


def _rotation_item(item: tuple) -> tuple[dict[str, Any], float]:
    """One point model (a variant at one seed) under every rotation mode, and its float64 invariance
    error; in a worker process, on one thread, so results do not depend on how many workers there are."""
    from perception.evaluation.rotation import evaluate_rotations, invariance_error

    saved, points_file, labels_file, trained_points, subset, draws, data_seed, batch_size = item
    keep_freed_blocks()
    clouds = test_clouds(np.load(points_file), trained_points, data_seed)
    targets = torch.from_numpy(np.load(labels_file))
    with torch_threads(1):
        results = evaluate_rotations(
            saved.build().eval(), clouds, targets, draws=draws, seed=data_seed, batch_size=batch_size
        )
        error = invariance_error(
            build_float64(saved), clouds[torch.from_numpy(subset)], rotations=2, seed=data_seed
        )
    arrays = {}
    for mode, r in results.items():
        if r.correct is None or r.angles_deg is None:
            raise RuntimeError("evaluate_rotations returned no per-sample arrays")
        arrays[mode] = (r.correct.numpy(), r.angles_deg.numpy())
    return arrays, error


def measure_rotation(
    checkpoints: dict[str, dict[int, Checkpoint]],
    points_file: Path,
    labels_file: Path,
    *,
    draws: int,
    data_seed: int,
    batch_size: int,
    invariance_clouds: int,
    trained_points: int,
    workers: int = 0,
    pool: ProcessPoolExecutor | None = None,
    progress=print,
) -> RotationMeasurements:
    """Every point model at every seed on the test clouds (`points_file`, `.npy` float32[N, P, 3]) under
    none / z / SO(3) rotations, and the float64 invariance error on a class-stratified subset. Rotations
    depend on the data seed only, so every model sees the same rotated clouds (paired comparisons). The
    (variant, seed) pairs run over `workers` processes (0: one per core), or in `pool`, each on one thread."""
    labels = np.load(labels_file)
    subset = stratified_subset(labels, invariance_clouds)
    jobs = [
        (variant, seed, ckpt)
        for variant, by_seed in checkpoints.items()
        if next(iter(by_seed.values())).input_kind == "points"
        for seed, ckpt in by_seed.items()
    ]
    items = [
        (c.saved, points_file, labels_file, trained_points, subset, draws, data_seed, batch_size)
        for _, _, c in jobs
    ]
    out = RotationMeasurements(
        points_per_cloud=tested_points(trained_points, int(np.load(points_file, mmap_mode="r").shape[1]))
    )
    per_mode: dict[str, dict[str, list[np.ndarray]]] = {}
    for (variant, seed, _), (results, error) in zip(
        jobs, parallel_map(_rotation_item, items, workers, "evaluate: rotation", False, pool), strict=True
    ):
        for mode, (correct, angles) in results.items():
            per_mode.setdefault(variant, {}).setdefault(mode, []).append(correct)
            out.angles.setdefault(mode, angles)
        out.invariance_error[variant] = max(out.invariance_error.get(variant, 0.0), error)
        out.seeds.setdefault(variant, []).append(seed)
        shown = "  ".join(f"{m} {c.mean():.3f}" for m, (c, _) in results.items())
        progress(f"evaluate: {variant:22s} seed {seed}  {shown}  invariance error {error:.1e}")
    out.correct = {variant: {m: np.stack(a) for m, a in modes.items()} for variant, modes in per_mode.items()}
    return out


@dataclass
class ImageMeasurements:
    correct: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # variant -> test set -> [S, N]
    seeds: dict[str, list[int]] = field(default_factory=dict)


def _images_item(item: tuple) -> dict[str, np.ndarray]:
    """One image model (a variant at one seed) on every test set: test set -> bool[N] correct; in a worker
    process, on one thread."""
    saved, files, labels_file, batch_size = item
    keep_freed_blocks()
    model = saved.build().eval()
    targets = torch.from_numpy(np.load(labels_file))
    with torch_threads(1):
        return {
            name: (
                predict(model, torch.from_numpy(np.load(path)), batch_size, torch.device("cpu")) == targets
            ).numpy()
            for name, path in files.items()
        }


def measure_images(
    checkpoints: dict[str, dict[int, Checkpoint]],
    test_files: dict[str, Path],
    labels_file: Path,
    *,
    dataset: str,
    batch_size: int,
    workers: int = 0,
    pool: ProcessPoolExecutor | None = None,
    progress=print,
) -> ImageMeasurements:
    """Every image model trained on `dataset` ("images" or "proximity"), at every seed, on every test set
    (name -> `.npy` float32[N, C, H, W], all of the same N instances). Models run on any canvas as they
    are: ViT's position encoding decides what happens at a grid it did not train on (its `pos_embed`).
    The (variant, seed) pairs run over `workers` processes (0: one per core), or in `pool`, each on one
    thread."""
    jobs = [
        (variant, seed, ckpt)
        for variant, by_seed in checkpoints.items()
        if next(iter(by_seed.values())).dataset == dataset
        for seed, ckpt in by_seed.items()
    ]
    items = [(c.saved, test_files, labels_file, batch_size) for _, _, c in jobs]
    out = ImageMeasurements()
    per_set: dict[str, dict[str, list[np.ndarray]]] = {}
    results = parallel_map(_images_item, items, workers, f"evaluate: {dataset}", False, pool)
    for (variant, seed, _), correct in zip(jobs, results, strict=True):
        for name, array in correct.items():
            per_set.setdefault(variant, {}).setdefault(name, []).append(array)
        out.seeds.setdefault(variant, []).append(seed)
        shown = "  ".join(f"{name} {array.mean():.3f}" for name, array in correct.items())
        progress(f"evaluate: {variant:26s} seed {seed}  " + shown)
    out.correct = {variant: {n: np.stack(a) for n, a in sets.items()} for variant, sets in per_set.items()}
    return out


class DeploymentTiming:
    """Every trained variant's deployment cost (`perception.evaluation.deployment`), measured once per
    variant on its first seed's checkpoint: the seeds of a variant share an architecture, so they cost the
    same to run. `samples`: dataset -> one test input as the variant trained on it (batch of one).

    Batch-1 latency is timed in windows (`window`), all variants interleaved in rounds; the stage calls it
    where this process has the machine to itself (before and after its parallel parts). Each window runs in
    a fresh process that rebuilds the models: where weights and buffers land in memory moves a model's
    latency by a few percent from one process to the next, which one process would never show, and a
    second run would. `costs` adds throughput, memory and size, and the latency over every window."""

    def __init__(
        self,
        checkpoints: dict[str, dict[int, Checkpoint]],
        samples: dict[str, torch.Tensor],
        *,
        device: torch.device,
        block_ms: float,
        threads: int,
        seed: int,
    ) -> None:
        self.paths: dict[str, Path] = {}
        self.specs: dict[str, tuple[ModelCheckpoint, torch.Tensor]] = {}
        for variant, by_seed in checkpoints.items():
            ckpt = next(iter(by_seed.values()))
            if ckpt.path is None:
                raise ValueError(f"{variant}: its checkpoint has no file to size")
            self.paths[variant] = ckpt.path
            self.specs[variant] = (ckpt.saved, samples[ckpt.dataset])
        self.device = device
        self.threads = threads
        self.rounds = LatencyRounds(_timed_models(self.specs, device), block_ms, threads, seed)
        self.window_pids: list[int] = []  # the process each window ran in
        self.window_spans: list[tuple[float, float]] = []  # when each window timed (time.monotonic)

    def windows(self, count: int, rounds: int) -> None:
        """Time `count` more windows of `rounds` rounds each, each in its own fresh (spawned) process. The
        processes start together and build their models side by side, most of a window's time, then time one
        at a time (a barrier, then a lock): no window's timing shares the machine with another's."""
        r = self.rounds
        if not r.forwards:  # every window of the stage times blocks of the same length
            r.calibrate()
        first = len(self.window_pids)
        items = [
            (self.specs, self.device, r.block_ms, r.threads, r.seed, dict(r.forwards), rounds, first + i)
            for i in range(count)
        ]
        context = multiprocessing.get_context("spawn")
        sync = (context.Barrier(count), context.Lock())
        with ProcessPoolExecutor(count, mp_context=context, initializer=_window_sync, initargs=sync) as pool:
            results = [future.result() for future in [pool.submit(_timed_window, item) for item in items]]
        for times, pid, span in results:
            r.add_window(times)
            self.window_pids.append(pid)
            self.window_spans.append(span)

    def window(self, rounds: int) -> None:
        """Time one more window of `rounds` rounds, in a fresh (spawned) process."""
        self.windows(1, rounds)

    def costs(
        self, *, batch_size: int, min_run_time: float, resamples: int, progress=print
    ) -> dict[str, DeploymentCost]:
        out = {}
        for variant, (model, sample) in self.rounds.models.items():
            if variant == REFERENCE:
                continue
            latency = self.rounds.latency(variant, resamples)
            cost = measure_deployment(
                model,
                sample,
                latency,
                batch_size=batch_size,
                checkpoint=self.paths[variant],
                min_run_time=min_run_time,
                threads=self.threads,
            )
            out[variant] = cost
            progress(
                f"evaluate: deploy {variant:26s} {cost.latency_ms:8.3f} ms [{cost.latency_ms_lo:.3f}, "
                f"{cost.latency_ms_hi:.3f}] batch 1 ({cost.windows} windows, {cost.rounds} rounds), "
                f"{cost.throughput_per_s:8.0f}/s at batch {batch_size}, {cost.peak_memory_mb:6.1f} MiB, "
                f"{cost.parameters:,} parameters on {cost.device}"
            )
        return out

    def reference(self, resamples: int) -> Latency:
        """The machine reference's latency over the same rounds (`perception.evaluation.deployment`)."""
        return self.rounds.latency(REFERENCE, resamples)


def _timed_models(
    specs: dict[str, tuple[ModelCheckpoint, torch.Tensor]], device: torch.device
) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    """Every variant rebuilt in eval mode with its sample, and the machine reference, on `device`."""
    models = {v: (saved.build().to(device).eval(), sample.to(device)) for v, (saved, sample) in specs.items()}
    models[REFERENCE] = machine_reference(device)  # timed in the same rounds: the machine's speed
    return models


_WINDOW_SYNC: tuple[Any, Any] | None = None  # in a window's process: the barrier and the lock of its batch


def _window_sync(barrier: Any, lock: Any) -> None:
    global _WINDOW_SYNC
    _WINDOW_SYNC = (barrier, lock)


def _timed_window(item: tuple) -> tuple[dict[str, np.ndarray], int, tuple[float, float]]:
    """One latency window in this (fresh) process: its times per model, its pid, and when it timed. It
    builds its models, waits for the other windows of its batch to have built theirs, then times alone."""
    specs, device, block_ms, threads, seed, forwards, rounds, index = item
    timed = LatencyRounds(_timed_models(specs, device), block_ms, threads, seed, forwards=forwards)
    barrier, lock = _WINDOW_SYNC or (None, None)
    if barrier is not None:
        barrier.wait(timeout=600)  # a window that failed to build breaks it: the others raise, not hang
    with lock if lock is not None else contextlib.nullcontext():
        began = time.monotonic()
        times = timed.time_window(rounds, index)
        return times, os.getpid(), (began, time.monotonic())


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
        np.savez_compressed(handle, **arrays)  # type: ignore[arg-type]  # numpy's stub: a key could be allow_pickle
