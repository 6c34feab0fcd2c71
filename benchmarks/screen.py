"""Screen one variant of `train.models` with changed settings, outside the study: train it as a trial does
and print its training loss and validation accuracy per epoch, last-quarter gain (with its interval over
validation samples), test accuracy and most frequent confusions.

    python -m benchmarks.screen e3nn --seed 0 --set lmax=3 --set epochs=24     # about 2-5 minutes
    python -m benchmarks.screen vit-rope --seed 1 --set epochs=16 --data /tmp/screen-data

A variant is a name `python -m pipeline check-params` lists (`e3nn`, `dgcnn`, `pointnet-z`, `vit-rope`,
`proximity_mamba-hilbert`...); each `--set key=value` (the value read as YAML) replaces or adds one of its
entry's settings, as `train.models` would. The data are params.yaml's datasets, prepared into a temporary
folder, or into `--data` (its `points/`, `images/`, `proximity/`, each prepared there once and reused by
later screens, and by screens started beside it). Training is the trial's: one thread, the same split,
batches, schedule and seed; the test accuracy is the best validation epoch's on the in-distribution test
set (where epochs tie for the best, the one the study's checkpoints keep: `exported_epoch`), as the evaluate
stage measures it: the test clouds at the points the model trained on, the images at
the training canvas, the proximity task's test images. A point model is also tested under the evaluate
stage's own rotations of the test clouds (`evaluate.rotation_draws` draws about z and in SO(3), seeded by
`seed`), so that a baseline trained with rotation augmentation compares with e3nn where claim 4 does.
Two screens at a time use a 2-core machine fully. With `--json`, the result is appended to that file as
one line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

import perception.training as training
from perception.allocator import keep_freed_blocks
from perception.data.arrays import PreparedDataset, open_dataset
from perception.evaluation.intervals import BootstrapSettings
from perception.evaluation.plateau import plateau_gain
from perception.evaluation.rotation import evaluate_rotations
from pipeline.config import ConfigError, StudyConfig, load_config, parse_config, read_params
from pipeline.evaluation.measurements import test_clouds, tested_points
from pipeline.parallel import locked
from pipeline.stages.prepare_images import prepare_images
from pipeline.stages.prepare_points import prepare_points
from pipeline.stages.prepare_proximity import prepare_proximity
from pipeline.training import space
from pipeline.training.inputs import array_stems, split_data
from pipeline.training.session import CHECKPOINTS_KEPT
from pipeline.training.table import exported_epoch
from pipeline.training.trainable import TrialData, build_model, step_settings, trial_optimizer, trial_settings

REPO = Path(__file__).resolve().parents[1]


def parse_setting(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--set {text!r}: expected key=value, for example --set lmax=3")
    return key.strip(), yaml.safe_load(value)


def screened_config(params: Path, variant_name: str, settings: dict) -> tuple[StudyConfig, space.Variant]:
    """params.yaml with `settings` written into the variant's `train.models` entry, validated as the study
    validates it (one line naming the key and what is allowed, before any work), and the variant."""
    data = read_params(params)
    entries = data["train"]["models"]
    names = {v.name: v.model for v in space.expand(load_config(params))}
    if variant_name not in names:
        raise ConfigError(
            f"variant {variant_name!r} is not in train.models; expected one of {', '.join(names)}"
        )
    entry = entries.setdefault(names[variant_name], {})  # all_families: a family no entry names
    for key, value in settings.items():
        if isinstance(entry.get(key), dict):  # a grid or a search: its values name the variants
            raise ConfigError(f"--set {key}: train.models.{names[variant_name]}.{key} is a grid or a search")
        entry[key] = value
    config = parse_config(data, params.resolve().parent)
    variant = {v.name: v for v in space.expand(config)}[variant_name]
    space.check(config, [variant], max(2, len(config.points.classes)), IMAGE_CHANNELS)  # builds its config
    return config, variant


IMAGE_CHANNELS = 4  # the renders' depth and normal (perception.data.canvas)


@contextlib.contextmanager
def preparing(data: Path) -> Iterator[None]:
    """Hold `data`'s preparation lock. Two screens started together on one `--data` would otherwise both
    prepare a missing dataset, the same work twice: the second screen waits and reuses the first's."""

    def waiting() -> None:
        print(f"screen: another screen is preparing the data in {data}; waiting for it", flush=True)

    with locked(data / ".prepare.lock", waiting):
        yield


def prepared_folder(config: StudyConfig, dataset: str, data: Path, root: Path) -> Path:
    """`data / dataset`, prepared there as its stage would (images from the prepared points) unless it
    already holds a prepared dataset; one screen at a time (`preparing`)."""
    with preparing(data):
        return prepare_missing(config, dataset, data, root)


def prepare_missing(config: StudyConfig, dataset: str, data: Path, root: Path) -> Path:
    """`prepared_folder` without the lock: what `data` lacks of `dataset`, prepared."""
    folders = {kind: data / kind for kind in ("points", "images", "proximity")}
    for kind in ("points", dataset) if dataset == "images" else (dataset,):
        if (folders[kind] / "manifest.json").is_file():
            continue
        if kind == "points":
            prepare_points(config, folders["points"], root)
        elif kind == "images":
            prepare_images(config, folders["points"], folders["images"])
        else:
            prepare_proximity(config, folders["proximity"])
    return folders[dataset]


def trial_inputs(
    config: StudyConfig, variant: space.Variant, seed: int, folder: Path
) -> tuple[dict[str, Any], TrialData, PreparedDataset]:
    """What a trial of `variant` at training seed `seed` is handed: its resolved settings and the train /
    validation split of its prepared dataset in `folder`; and that dataset, for its test split."""
    dataset = open_dataset(folder, "points" if variant.dataset == "points" else "images")
    stem = array_stems(config)[variant.dataset]
    data = split_data(config, dataset.array(f"train_{stem}"), dataset.array("train_labels"))
    study = {k: v for k, v in config.flat().items() if not k.startswith("train.models.")}
    flat = space.resolved(
        {**study, "trial": variant.as_trial(), "trial_seed": seed,
         "data.num_classes": len(dataset.manifest["classes"]), "data.in_channels": IMAGE_CHANNELS}
    )  # fmt: skip
    return flat, data, dataset


def rotated_accuracy(
    model: torch.nn.Module, clouds: torch.Tensor, labels: torch.Tensor, config: StudyConfig
) -> dict[str, float]:
    """Test accuracy of a point model on clouds float[N, P, 3] under the evaluate stage's own rotations:
    `evaluate.rotation_draws` draws about z and in SO(3), seeded by the data seed. {mode: accuracy}."""
    ev = config.evaluate
    modes = ("z", "so3")
    results = evaluate_rotations(model, clouds, labels, modes, ev.rotation_draws, config.seed, ev.batch_size)
    return {mode: round(results[mode].accuracy, 4) for mode in modes}


def screen(config: StudyConfig, variant: space.Variant, seed: int, folder: Path) -> dict:
    """Train `variant` at training seed `seed` on its prepared dataset in `folder`; its curve and test
    accuracy on the in-distribution test set (a point model's also under z and SO(3) rotations)."""
    flat, data, dataset = trial_inputs(config, variant, seed, folder)
    stem = array_stems(config)[variant.dataset]
    classes = [str(c) for c in dataset.manifest["classes"]]
    resolved = trial_settings(flat)
    keep_freed_blocks()  # as a trial does
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = build_model(flat)
    step = step_settings(flat)
    optimizer = trial_optimizer(model, flat)
    epochs = int(resolved["epochs"])
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, training.warmup_cosine(epochs, int(resolved["warmup_epochs"]))
    )
    generator = torch.Generator().manual_seed(seed)
    cpu = torch.device("cpu")
    train_x, train_y = torch.from_numpy(data.train_inputs), torch.from_numpy(data.train_labels)
    val_x, val_y = torch.from_numpy(data.val_inputs), torch.from_numpy(data.val_labels)
    if variant.dataset == "points":
        test_points = np.asarray(dataset.array("test_points"))
        points = tested_points(step.points_per_cloud, test_points.shape[1])
        test_x = test_clouds(test_points, points, config.seed)
    else:
        test_x = torch.from_numpy(np.asarray(dataset.array(f"test_{stem}")))
    test_y = torch.from_numpy(np.asarray(dataset.array("test_labels")))

    curve: list[float] = []
    losses: list[float] = []  # mean training loss per epoch: near 0 with a low curve is overfitting
    right: list[np.ndarray] = []  # bool[N] per epoch: which validation samples it got right
    tied_states: dict[int, dict[str, torch.Tensor]] = {}  # epoch -> weights: the last tied bests so far
    began = time.perf_counter()
    for epoch in range(epochs):
        losses.append(training.train_one_epoch(model, optimizer, train_x, train_y, step, generator, cpu))
        schedule.step()
        right.append(training.correct(model, val_x, val_y, step.batch_size, cpu).numpy())
        curve.append(float(right[-1].mean(dtype=np.float32)))  # as the trial reports it
        if curve[-1] == max(curve):  # as Ray keeps checkpoints: the last CHECKPOINTS_KEPT of equal bests
            if curve[-1] > max(curve[:-1], default=-1.0):
                tied_states = {}
            tied_states[epoch + 1] = {k: t.clone() for k, t in model.state_dict().items()}
            tied_states = dict(list(tied_states.items())[-CHECKPOINTS_KEPT:])
        print(
            f"screen: {variant.name} seed {seed} epoch {epoch + 1}/{epochs} "
            f"train loss {losses[-1]:.3f} val {curve[-1]:.3f}"
        )
    seconds = time.perf_counter() - began
    best_epoch = exported_epoch(curve)  # the epoch whose weights the study would export
    model.load_state_dict(tied_states[best_epoch])
    predicted = training.predict(model, test_x, config.evaluate.batch_size, cpu)
    rotated = rotated_accuracy(model, test_x, test_y, config) if variant.dataset == "points" else {}
    wrong = Counter(
        f"{classes[truth]} -> {classes[guess]}"
        for truth, guess in zip(test_y.tolist(), predicted.tolist(), strict=True)
        if truth != guess
    )
    # One seed: the interval is over validation samples only.
    gain = plateau_gain([np.stack(right)], BootstrapSettings()).scaled(100) if epochs > 1 else None
    return {
        "variant": variant.name,
        "seed": seed,
        "test_accuracy": round(float((predicted == test_y).float().mean()), 4),
        "rotated_test_accuracy": rotated,
        "best_val_accuracy": round(max(curve), 4),
        "best_epoch": best_epoch,
        "last_quarter_gain_points": round(100 * training.last_quarter_gain(curve), 2),
        "last_quarter_gain_interval": [round(gain.lo, 2), round(gain.hi, 2)] if gain else None,
        "train_seconds": round(seconds, 1),
        "val_curve": [round(v, 4) for v in curve],
        "train_loss": [round(v, 4) for v in losses],
        "confusions": dict(wrong.most_common(8)),
    }


def _interval(result: dict) -> str:
    """The gain's interval over validation samples, as printed."""
    ends = result["last_quarter_gain_interval"]
    return f"[{ends[0]:+.2f}, {ends[1]:+.2f}] over validation samples" if ends else ""


def _rotated(result: dict) -> str:
    """A point model's test accuracy under rotation, as printed."""
    names = {"z": "about z", "so3": "under SO(3)"}
    rotated = result["rotated_test_accuracy"]
    return "".join(f", {100 * accuracy:.1f}% {names[mode]}" for mode, accuracy in rotated.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.screen", description=__doc__.splitlines()[0])
    parser.add_argument("variant")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument(
        "--data", type=Path, help="a folder to prepare the datasets in once, and reuse (default: temporary)"
    )
    parser.add_argument("--json", type=Path, help="append the result to this file, one JSON line")
    args = parser.parse_args(argv)
    settings = dict(parse_setting(text) for text in args.settings)
    try:
        config, variant = screened_config(args.params, args.variant, settings)
    except ConfigError as err:
        raise SystemExit(f"screen: {err}") from None
    with tempfile.TemporaryDirectory(prefix="screen-") as tmp:
        data = args.data or Path(tmp)
        folder = prepared_folder(config, variant.dataset, data, args.params.resolve().parent)
        result = screen(config, variant, args.seed, folder)
    result["settings"] = settings
    print(
        f"screen: {args.variant} seed {args.seed} {settings or 'as in params'}: test "
        f"{100 * result['test_accuracy']:.1f}%{_rotated(result)}, "
        f"best val {100 * result['best_val_accuracy']:.1f}% (epoch {result['best_epoch']}), "
        f"last-quarter gain {result['last_quarter_gain_points']:+.2f} points {_interval(result)}, "
        f"{result['train_seconds']:.0f} s"
    )
    print("screen: most confused: " + ", ".join(f"{k} {v}" for k, v in result["confusions"].items()))
    if args.json:
        with args.json.open("a") as out:
            out.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
