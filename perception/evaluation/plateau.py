"""Whether a validation curve has plateaued, with an interval: its last-quarter gain
(`perception.training.last_quarter_gain`) resampled over training seeds and validation samples by the
study's hierarchical bootstrap, and a three-way call on that interval.

No orchestration, no I/O: the per-sample records come from `perception.training.pack_correct`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from perception.evaluation.intervals import BootstrapSettings, Estimate, linear_effect
from perception.training import last_quarter_weights

PLATEAU_POINTS = 1.0  # a validation curve that gains less than this over its last quarter has plateaued
PLATEAU_CALLS = ("flat", "rising", "undecided")


def plateau_gain(correct_by_seed: Sequence[np.ndarray], settings: BootstrapSettings) -> Estimate:
    """The last-quarter gain (a fraction; mean over seeds) with its interval over training seeds and
    validation samples. Each array is bool[E, N]: seed s's per-sample validation correctness at each of its
    E epochs (every seed the same E and N). The same sample's correctness at every epoch is resampled
    together, so what a sample contributes to the gain is its own change over the quarter."""
    shapes = {np.shape(c) for c in correct_by_seed}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"plateau_gain needs bool[epochs, samples] per seed, all alike; got {shapes}")
    epochs = next(iter(shapes))[0]
    weights = last_quarter_weights(epochs)
    tail = len(weights)
    stacked = np.stack([np.asarray(c, dtype=np.float64) for c in correct_by_seed])  # (S, E, N)
    arrays = [stacked[:, epochs - tail + t, :] for t in range(tail)]  # T x (S, N)
    return linear_effect(arrays, list(weights), settings)


def plateau_call(gain_points: Estimate) -> str:
    """A last-quarter gain in points with its interval, called:
    flat: the interval lies under PLATEAU_POINTS (gains less than a point, interval and all);
    rising: the interval lies above zero and is not under PLATEAU_POINTS (still gaining, so more epochs
      would move the numbers, and by a point or more for all the interval says);
    undecided: the interval holds zero and reaches PLATEAU_POINTS (the validation split cannot tell)."""
    if gain_points.hi < PLATEAU_POINTS:
        return "flat"
    if gain_points.lo > 0:
        return "rising"
    return "undecided"
