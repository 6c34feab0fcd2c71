"""The report's training table and figure: each variant's plateau call from the per-sample validation
records the train stage keeps (study.json), with its interval over seeds and validation samples, and the
curves drawn with the line whose gain the call reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from perception.data.arrays import DatasetError
from perception.evaluation.intervals import BootstrapSettings, Estimate
from perception.training import pack_correct
from pipeline.evaluation.results import FitRecord
from pipeline.reporting.blocks import _training_blocks, check_validation_records
from pipeline.reporting.plateaus import draw_plateaus, plateaus


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


def _study(rng) -> dict:
    """A study.json summary: a variant still climbing, one that settled, one at chance (too few samples
    to call) and one from a study.json before the per-sample records."""
    rising = np.linspace(0.3, 0.9, 12)
    flat = np.r_[np.linspace(0.3, 0.85, 8), [0.85] * 4]
    return {
        "variants": {
            "climber": {str(s): _seed_row(_learning(rng, rising, 1000)) for s in range(3)},
            "settled": {str(s): _seed_row(_learning(rng, flat, 1000)) for s in range(3)},
            "coin": {str(s): _seed_row(rng.random((12, 30)) < 0.8) for s in range(3)},
            "old": {"0": {"val_accuracy": 0.8, "val_curve": [0.5, 0.8]}},  # a study.json from before
        },
        "slot_utilisation": 0.93,
    }


FITS = {  # the evaluate stage's adequacy inputs: "coin" is below its floor
    name: FitRecord(name=name, accuracy=Estimate(acc, acc, acc), chance=0.5, floor=0.75)
    for name, acc in (("climber", 0.9), ("settled", 0.85), ("coin", 0.5))
}


def test_the_training_table_calls_each_variant_flat_rising_or_undecided():
    summary = _study(np.random.default_rng(0))
    blocks = _training_blocks(plateaus(summary, BootstrapSettings(500, 0), FITS), summary["slot_utilisation"])
    (_, text), (_, header, rows) = blocks
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


def test_the_training_figure_draws_each_variant_with_the_line_whose_gain_the_call_reads():
    rows = plateaus(_study(np.random.default_rng(0)), BootstrapSettings(500, 0), FITS)
    fig = draw_plateaus(rows)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert [ax.get_title().split("\n")[0] for ax in panels] == [row.variant for row in rows]
    for ax, row in zip(panels, rows, strict=True):
        assert ax.get_title().split("\n")[1].startswith(row.call)
        lines = {line.get_label(): line for line in ax.get_lines()}
        if row.gain is None:  # "old": its curve, but no interval to state
            assert "no per-sample record" in ax.get_title() and "seed 0" in lines
            continue
        assert {"seed 0", "seed 1", "seed 2", "mean"} <= set(lines)
        # The dashed line spans the last quarter (3 of 12 epochs) and rises by the gain in the title.
        fit = lines["last-quarter line"]
        assert list(fit.get_xdata()) == [10, 12]
        assert fit.get_ydata()[1] - fit.get_ydata()[0] == pytest.approx(row.gain.value, abs=1e-3)
    rise = {row.variant: row.gain.value for row in rows if row.gain is not None}
    assert rise["climber"] > 10 and abs(rise["settled"]) < 1e-9
    assert "below floor" in panels[[r.variant for r in rows].index("coin")].get_title()


@pytest.mark.parametrize(
    ("row_change", "expected"),
    [
        (
            {"val_correct": ["ff", "not hex"]},
            "variants.climber.1.val_correct[epoch 2]: a packed correctness record must be a hex string, "
            "found 'not hex'",
        ),
        (
            {"val_correct": ["ff", "ff"], "val_samples": 9},
            "variants.climber.1.val_correct[epoch 1]: a packed correctness record of 8 bits cannot hold 9 "
            "samples",
        ),
        ({"val_samples": "169"}, "variants.climber.1.val_samples is '169', expected a whole number >= 1"),
        ({"val_correct": "ff"}, "variants.climber.1.val_correct is not a list of hex strings"),
    ],
)
def test_a_corrupted_validation_record_names_the_file_variant_seed_and_epoch(row_change, expected):
    good = _seed_row(np.ones((2, 8), dtype=bool))
    summary = {"variants": {"climber": {"0": good, "1": {**good, **row_change}}}}
    with pytest.raises(DatasetError) as raised:
        check_validation_records(summary, Path("data/train/study.json"))
    message = str(raised.value)
    assert message.startswith(f"data/train/study.json: {expected}") and "\n" not in message
    assert message.endswith("; rerun the train stage")


def test_well_formed_and_older_validation_records_pass_the_check():
    good = _seed_row(np.ones((3, 169), dtype=bool))
    summary = {
        "variants": {"climber": {"0": good}, "old": {"0": {"val_accuracy": 0.8, "val_curve": [0.5, 0.8]}}}
    }
    check_validation_records(summary, Path("study.json"))  # raises nothing


def test_the_training_figure_draws_what_a_ragged_or_short_study_has():
    # Seeds that trained for different epochs (a retried trial cut short, an older run) have no mean and
    # no line, and a one-epoch curve has nothing to draw; neither stops the figure.
    summary = {
        "variants": {
            "ragged": {
                "0": {"val_accuracy": 0.8, "val_curve": [0.5, 0.7, 0.8]},
                "1": {"val_accuracy": 0.6, "val_curve": [0.4, 0.6]},
            },
            "single": {"0": {"val_accuracy": 0.5, "val_curve": [0.5]}},
        }
    }
    rows = plateaus(summary, BootstrapSettings(100, 0), {})
    fig = draw_plateaus(rows)
    panels = {ax.get_title().split("\n")[0]: ax for ax in fig.axes if ax.get_visible() and ax.get_title()}
    assert set(panels) == {"ragged", "single"}
    assert {line.get_label() for line in panels["ragged"].get_lines()} == {"seed 0", "seed 1"}
    assert not panels["single"].get_lines()
    assert draw_plateaus([]).axes  # no variants: an empty sheet, not an error
