"""pipeline.training.table: a trial's row from its Tune result (a stand-in for Ray's `Result`, with its
checkpoint choice as Ray makes it)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from pipeline.training.table import trial_rows
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
