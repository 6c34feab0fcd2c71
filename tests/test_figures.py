"""The report's latency axes: plain labels that do not run into each other, whatever span the models take."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from pipeline.reporting.figures import latency_axis  # noqa: E402


def _labelled_ticks(latencies: list[float]) -> list[float]:
    fig, ax = plt.subplots()
    ax.errorbar(latencies, [0.5] * len(latencies), xerr=[0.02 * v for v in latencies], fmt="o")
    latency_axis(ax)
    fig.canvas.draw()
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    plt.close(fig)
    return ticks


def test_a_wide_span_is_labelled_at_1_2_5_steps() -> None:
    ticks = _labelled_ticks([0.44, 0.45, 6.26, 8.52])
    assert ticks[:4] == pytest.approx([0.5, 1, 2, 5])
    assert ticks[4:] in ([], pytest.approx([10.0]))  # 10 where the margin reaches it


@pytest.mark.parametrize("latencies", [[1.54, 1.68, 2.17, 2.96, 3.33], [1.05, 1.2, 1.47], [0.272, 0.31]])
def test_a_span_within_one_step_gets_a_few_round_labels_not_one_every_quarter(latencies) -> None:
    # LogLocator alone falls back to linear ticks every 0.25 here: 1.5 to 3.5 took nine labels.
    ticks = _labelled_ticks(latencies)
    assert 2 <= len(ticks) <= 5, ticks
    assert all(round(t * 100) == pytest.approx(t * 100) for t in ticks), ticks  # round values
