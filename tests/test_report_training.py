"""The report's training table: each variant's plateau call from the per-sample validation records the
train stage keeps (study.json), with its interval over seeds and validation samples."""

from __future__ import annotations

import numpy as np

from perception.evaluation.intervals import BootstrapSettings, Estimate
from perception.training import pack_correct
from pipeline.evaluation.results import FitRecord
from pipeline.reporting.blocks import _training_blocks


def _seed_row(correct: np.ndarray) -> dict:
    """A study.json row from bool[E, N]."""
    curve = correct.mean(axis=1)
    return {
        "val_accuracy": float(curve.max()),
        "val_curve": [round(float(v), 6) for v in curve],
        "val_samples": correct.shape[1],
        "val_correct": [pack_correct(epoch) for epoch in correct],
    }


def _learning(rng, accuracies, samples):
    learned = rng.random(samples)
    return np.stack([learned < a for a in accuracies])


def test_the_training_table_calls_each_variant_flat_rising_or_undecided():
    rng = np.random.default_rng(0)
    rising = np.linspace(0.3, 0.9, 12)
    flat = np.r_[np.linspace(0.3, 0.85, 8), [0.85] * 4]
    summary = {
        "variants": {
            "climber": {str(s): _seed_row(_learning(rng, rising, 1000)) for s in range(3)},
            "settled": {str(s): _seed_row(_learning(rng, flat, 1000)) for s in range(3)},
            "coin": {str(s): _seed_row(rng.random((12, 30)) < 0.8) for s in range(3)},
            "old": {"0": {"val_accuracy": 0.8, "val_curve": [0.5, 0.8]}},  # a study.json from before
        },
        "slot_utilisation": 0.93,
    }
    fits = {  # the evaluate stage's adequacy inputs: "coin" is below its floor
        name: FitRecord(name=name, accuracy=Estimate(acc, acc, acc), chance=0.5, floor=0.75)
        for name, acc in (("climber", 0.9), ("settled", 0.85), ("coin", 0.5))
    }
    (_, text), (_, header, rows) = _training_blocks(summary, BootstrapSettings(500, 0), fits)
    calls = {row[0]: row[header.index("plateau")] for row in rows}
    assert calls == {
        "climber": "rising",
        "settled": "flat",
        "coin": "undecided; below the adequacy floor (50.0% < 75.0%)",
        "old": "undecided",
    }
    assert "Below the adequacy floor, where a call says little" in text and text.endswith(
        "busy (their own time over wall time x concurrent slots)."
    )
    gains = {row[0]: row[header.index("last-quarter gain, points [95% CI]")] for row in rows}
    assert gains["settled"] == "+0.0 [+0.0, +0.0]" and gains["old"] == "no per-sample record"
    lo, hi = (float(x) for x in gains["climber"].split("[")[1].rstrip("]").split(", "))
    assert 1.0 <= lo < hi
    assert "Still rising, the interval above zero and reaching 1 point: climber" in text
    assert "Undecided, the interval from zero or below to 1 point or more: coin, old" in text
    assert "93%" in text
