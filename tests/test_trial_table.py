"""pipeline.training.table: a trial's row from its Tune result (a stand-in for Ray's `Result`, with its
checkpoint choice as Ray makes it)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest

from pipeline.training.session import CHECKPOINTS_KEPT, METRIC, MODE
from pipeline.training.table import exported_epoch, trial_rows
from pipeline.training.trainable import CHECKPOINT_FILE


@dataclass(frozen=True)
class _Checkpoint:
    path: str


@dataclass
class _Result:
    """What `trial_rows` reads of a `ray.tune.Result`."""

    curve: list[float]
    kept_epochs: list[int]  # the epochs whose checkpoints Ray still holds, in the order it kept them
    path: str = "/runs/train/e3nn-s2_00034"
    error: Exception | None = None
    config: dict = field(
        default_factory=lambda: {
            "trial": {"name": "e3nn", "model": "e3nn", "family": "e3nn"},
            "trial_seed": 2,
        }
    )

    @property
    def metrics_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame({"epoch": range(1, len(self.curve) + 1), "val_accuracy": self.curve})

    @property
    def metrics(self) -> dict:
        return {"epoch": len(self.curve), "val_accuracy": self.curve[-1], "trial_id": "00034"}

    @property
    def checkpoint(self) -> _Checkpoint:
        return _Checkpoint(f"{self.path}/checkpoint_{self.kept_epochs[-1] - 1:06d}")

    @property
    def best_checkpoints(self) -> list[tuple[_Checkpoint, dict]]:
        return [
            (
                _Checkpoint(f"{self.path}/checkpoint_{e - 1:06d}"),
                {"epoch": e, "val_accuracy": self.curve[e - 1]},
            )
            for e in self.kept_epochs
        ]

    def get_best_checkpoint(self, metric: str, mode: str) -> _Checkpoint:
        # Ray's own rule: the first of the kept checkpoints with the best value.
        return max(self.best_checkpoints, key=lambda kept: kept[1][metric])[0]


class _Callback:
    run_ids: dict[str, str] = {}


def test_the_best_epoch_is_the_one_whose_checkpoint_ray_kept_when_epochs_tie():
    # e3nn seed 2 of a default study: epochs 17, 18 and 19 tie at 85.2%; Ray kept 18, 19 and the latest, 20.
    curve = [0.8] * 16 + [0.852, 0.852, 0.852, 0.846]
    (row,) = trial_rows([_Result(curve, kept_epochs=[18, 19, 20])], _Callback())
    assert row["best_epoch"] == 18  # not 17, the history's first of the tie: its weights are gone
    assert row["val_accuracy"] == 0.852
    assert row["checkpoint_path"] == f"/runs/train/e3nn-s2_00034/checkpoint_000017/{CHECKPOINT_FILE}"


def test_without_a_tie_the_best_epoch_is_the_best_of_the_curve():
    curve = [0.5, 0.7, 0.9, 0.8]
    (row,) = trial_rows([_Result(curve, kept_epochs=[3, 4])], _Callback())
    assert (row["best_epoch"], row["val_accuracy"]) == (3, 0.9)


def _ray_exported_epoch(curve: list[float], folder) -> int:
    """The epoch Ray's own checkpoint manager and `Result.get_best_checkpoint` export for this curve, with
    the study's CheckpointConfig: every epoch reports a checkpoint, as a trial does."""
    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult
    from ray.tune import Result

    manager = _CheckpointManager(
        CheckpointConfig(
            num_to_keep=CHECKPOINTS_KEPT, checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE
        )
    )
    for epoch, accuracy in enumerate(curve, start=1):
        path = folder / f"checkpoint_{epoch - 1:06d}"
        path.mkdir()
        checkpoint = Checkpoint.from_directory(str(path))
        manager.register_checkpoint(_TrainingResult(checkpoint, {"epoch": epoch, METRIC: accuracy}))
    latest = manager.latest_checkpoint_result
    assert latest is not None
    result = Result(
        metrics=latest.metrics,
        checkpoint=latest.checkpoint,
        error=None,
        path=str(folder),
        best_checkpoints=[(r.checkpoint, r.metrics) for r in manager.best_checkpoint_results],
    )
    best = result.get_best_checkpoint(METRIC, MODE)
    (epoch,) = [m["epoch"] for c, m in result.best_checkpoints if c.path == best.path]
    return epoch


def test_exported_epoch_is_the_one_ray_exports(tmp_path):
    # The screen tests the weights of `exported_epoch`; the study, of what Ray's checkpoint manager kept.
    curves = [
        [0.8] * 16 + [0.852, 0.852, 0.852, 0.846],  # e3nn seed 2: epoch 18
        [0.5, 0.7, 0.9, 0.8],
        [1.0] * 12,  # a proximity model at 100% from its first epoch
        [0.5] * 10,  # one at chance
        [0.6, 0.9, 0.9, 0.7, 0.9, 0.95, 0.95],
    ]
    rng = np.random.default_rng(0)
    curves += [list(rng.choice([0.6, 0.7, 0.8], size=int(rng.integers(1, 12)))) for _ in range(40)]
    for index, curve in enumerate(curves):
        folder = tmp_path / f"trial-{index}"
        folder.mkdir()
        assert exported_epoch(curve) == _ray_exported_epoch(curve, folder), curve
    assert exported_epoch(curves[0]) == 18  # not 17, the first of the tie
    assert exported_epoch(curves[2]) == 11
    assert exported_epoch([0.5, 0.9, 0.9]) == 2  # two tied, both kept: the first


def test_exported_epoch_refuses_an_empty_curve():
    with pytest.raises(ValueError, match="empty validation curve"):
        exported_epoch([])
