"""Whether each variant trained to its plateau, from the train stage's `study.json`: one `Plateau` per
variant, which the report's training table lists and `plateau_figure` draws.

Pure but for the figure's file: the study's summary dict in (`variants` -> seed -> `val_curve`,
`val_correct`, `val_samples`, `val_accuracy`), typed rows out. The gain and its interval are
`perception.evaluation.plateau`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np

from perception.evaluation.intervals import BootstrapSettings, Estimate
from perception.evaluation.plateau import plateau_call, plateau_gain
from perception.training import last_quarter_gain, last_quarter_weights, unpack_correct
from pipeline.evaluation.results import FitRecord
from pipeline.reporting.figures import save_figure  # which sets matplotlib's file-only backend


@dataclass(frozen=True)
class Plateau:
    """One variant's validation curves and its plateau call."""

    variant: str
    curves: dict[str, list[float]]  # training seed -> validation accuracy (fraction) at each epoch
    best: dict[str, float]  # training seed -> best validation accuracy (fraction)
    gain: Estimate | None  # last-quarter gain in points, mean over seeds, with its interval; None: no record
    call: str  # flat | rising | undecided (perception.evaluation.plateau.plateau_call)
    below_floor: FitRecord | None  # the evaluate stage's adequacy input, where the model fell short of it

    @property
    def epochs(self) -> int:
        return max((len(c) for c in self.curves.values()), default=0)

    @property
    def seed_gains(self) -> list[float]:
        """Each seed's last-quarter gain, points (a seed of one epoch has none)."""
        return [100 * last_quarter_gain(c) for c in self.curves.values() if len(c) >= 2]


def _gain(by_seed: dict, settings: BootstrapSettings) -> Estimate | None:
    """A variant's last-quarter gain in points with its interval over seeds and validation samples (None
    where a seed has no per-sample record or the seeds trained for different epochs)."""
    rows = list(by_seed.values())
    curves = [row.get("val_curve") or [] for row in rows]
    records = [row.get("val_correct") or [] for row in rows]
    counts = {int(row.get("val_samples") or 0) for row in rows}
    lengths = {len(r) for r in records} | {len(c) for c in curves}
    if len(lengths) != 1 or len(counts) != 1 or min(lengths) < 2 or min(counts) < 1:
        return None
    count = counts.pop()
    correct = [np.stack([unpack_correct(epoch, count) for epoch in record]) for record in records]
    return plateau_gain(correct, settings).scaled(100)


def plateaus(
    train_summary: dict, settings: BootstrapSettings, fits: dict[str, FitRecord] | None = None
) -> list[Plateau]:
    """Every variant of the study, by name: its curves, last-quarter gain, call, and the adequacy floor it
    fell short of (`fits`, the evaluate stage's; a model at chance flips its answers between epochs, so
    its call says little)."""
    out = []
    for name, by_seed in sorted(train_summary.get("variants", {}).items()):
        gain = _gain(by_seed, settings)
        fit = (fits or {}).get(name)
        out.append(
            Plateau(
                variant=name,
                curves={seed: list(row.get("val_curve") or []) for seed, row in by_seed.items()},
                best={seed: row["val_accuracy"] for seed, row in by_seed.items()},
                gain=gain,
                call=plateau_call(gain) if gain is not None else "undecided",
                below_floor=fit if fit is not None and not fit.adequate else None,
            )
        )
    return out


CALL_COLOURS = {"flat": "tab:green", "rising": "tab:red", "undecided": "0.35"}


def plateau_figure(rows: list[Plateau], path: Path) -> Path:
    """`draw_plateaus`, saved."""
    return save_figure(draw_plateaus(rows), path)


def draw_plateaus(rows: list[Plateau], columns: int = 6):
    """One panel per variant: each seed's validation curve (thin), their mean (thick), the last quarter of
    epochs shaded and the least-squares line through the mean over it (dashed), whose rise is the gain the
    plateau call reads; the call and the gain's interval in the panel's title. The y axis spans the curves'
    second half, so that a point of gain is visible; the first epochs may lie below it."""
    columns = max(1, min(columns, len(rows)))
    lines = max(1, math.ceil(len(rows) / columns))
    fig, axes = plt.subplots(lines, columns, figsize=(2.7 * columns, 2.4 * lines), squeeze=False)
    for ax in axes.flat[len(rows) :]:
        ax.set_visible(False)
    for ax, row in zip(axes.flat, rows, strict=False):
        seeded = {seed: 100 * np.asarray(c, dtype=float) for seed, c in row.curves.items() if len(c) >= 2}
        for seed, curve in seeded.items():
            ax.plot(range(1, len(curve) + 1), curve, lw=0.8, alpha=0.7, label=f"seed {seed}")
        curves = list(seeded.values())
        if curves and len({len(c) for c in curves}) == 1:
            mean = np.mean(curves, axis=0)  # (epochs,)
            epochs = np.arange(1, len(mean) + 1)
            ax.plot(epochs, mean, color="black", lw=1.6, label="mean")
            tail = len(last_quarter_weights(len(mean)))
            ax.axvspan(len(mean) - tail + 0.5, len(mean) + 0.5, color="0.9", zorder=0)
            slope, intercept = np.polyfit(epochs[-tail:], mean[-tail:], 1)
            ends = epochs[[-tail, -1]]
            ax.plot(ends, slope * ends + intercept, "--", color="tab:purple", lw=2, label="last-quarter line")
            second_half = np.concatenate([c[len(c) // 2 :] for c in curves])
            lo, hi = float(second_half.min()), float(second_half.max())
            ax.set_ylim(max(0.0, lo - 4), min(100.0, hi + 2))
            ax.set_xlim(0.5, len(mean) + 0.5)
        if row.gain is not None:
            gain = row.gain
            call = f"{row.call} {gain.value:+.1f} [{gain.lo:+.1f}, {gain.hi:+.1f}]"
        else:
            call = f"{row.call}: no per-sample record"
        floor = ", below floor" if row.below_floor is not None else ""
        ax.set_title(f"{row.variant}\n{call}{floor}", fontsize=7.5, color=CALL_COLOURS.get(row.call, "black"))
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.set_xlabel("epoch", fontsize=7)
        ax.set_ylabel("validation accuracy, %", fontsize=7)
    # The key, from the panel that draws the most, in the first spare panel, where it hides no curve.
    keyed = max(axes.flat[: len(rows)], key=lambda ax: len(ax.get_lines()), default=None)
    if keyed is not None and keyed.get_lines():
        spare = axes.flat[len(rows)] if len(rows) < axes.size else None
        if spare is not None:
            spare.set_visible(True)
            spare.axis("off")
            spare.legend(*keyed.get_legend_handles_labels(), loc="center", fontsize=8)
        else:
            keyed.legend(fontsize=6, loc="lower right")
    fig.suptitle(
        "Validation curves: each seed (thin), their mean (thick); the last quarter shaded, with the "
        "least-squares line through the mean (dashed).\nTitles: the plateau call, and the line's gain in "
        "points with its 95% interval over seeds and validation samples (green flat, red rising, grey "
        "undecided).",
        fontsize=9,
    )
    return fig
