"""The decision table's rules (`pipeline.evaluation.decision`) on synthetic numbers: every outcome."""

from __future__ import annotations

import pytest

from perception.evaluation.intervals import Estimate
from pipeline.evaluation.decision import Candidate, decide, overlaps, pareto_front


def model(name: str, acc: float, half: float, ms: float, adequate: bool = True) -> Candidate:
    """A candidate with accuracy acc +- half and latency ms [0.9 ms, 1.1 ms]."""
    return Candidate(name, Estimate(acc, acc - half, acc + half), Estimate(ms, 0.9 * ms, 1.1 * ms), adequate)


def test_one_model_dominating_is_best_fastest_and_within_the_budget() -> None:
    found = [
        model("fast_good", 0.95, 0.01, 2.0),
        model("slow", 0.80, 0.02, 10.0),
        model("mid", 0.85, 0.02, 5.0),
    ]
    row = decide("points", "unrotated", found, budget_ms=20.0)
    assert row.best.name == row.fastest_within_interval.name == row.within_budget.name == "fast_good"
    assert row.tied_with_best == ("fast_good",)
    assert pareto_front(found) == ["fast_good"]


def test_a_tie_within_intervals_picks_the_faster_model_as_fastest_within_the_interval() -> None:
    found = [
        model("accurate_slow", 0.92, 0.03, 40.0),
        model("close_fast", 0.90, 0.03, 4.0),
        model("far", 0.70, 0.02, 1.0),
    ]
    row = decide("images", "in_distribution", found, budget_ms=100.0)
    assert row.best.name == "accurate_slow"
    assert row.fastest_within_interval.name == "close_fast"  # its interval overlaps the best's
    assert row.tied_with_best == ("accurate_slow", "close_fast")
    assert "far" not in row.tied_with_best  # faster still, but measurably less accurate
    assert pareto_front(found) == ["far", "close_fast", "accurate_slow"]


def test_a_tie_on_latency_too_picks_the_more_accurate_of_the_equally_fast() -> None:
    # Two models the measurement cannot tell from the best, nor from each other on latency: the pick must
    # not turn on which timed a few microseconds faster in this run.
    found = [
        model("best_slow", 0.87, 0.03, 2.0),
        model("quick_less", 0.835, 0.03, 1.076),
        model("quick_more", 0.854, 0.05, 1.078),
        model("quick_apart", 0.86, 0.03, 1.5),  # within the best's interval, its latency apart from theirs
    ]
    row = decide("images", "in_distribution", found, budget_ms=1.5)
    assert row.fastest_within_interval.name == "quick_more"
    assert row.as_fast == ("quick_less", "quick_more")
    # Apart on latency, the faster is the pick, however accurate the slower.
    apart = [
        model("best_slow", 0.87, 0.03, 2.0),
        model("quick", 0.835, 0.03, 1.0),
        model("less", 0.86, 0.03, 1.5),
    ]
    row = decide("images", "in_distribution", apart, budget_ms=1.5)
    assert row.fastest_within_interval.name == "quick" and row.as_fast == ("quick",)


def test_without_a_tie_the_best_is_also_the_fastest_within_its_interval() -> None:
    found = [model("best", 0.95, 0.01, 40.0), model("fast", 0.80, 0.01, 4.0)]
    row = decide("points", "so3", found, budget_ms=100.0)
    assert row.fastest_within_interval.name == "best"


def test_an_empty_budget_chooses_nothing_and_names_the_fastest() -> None:
    found = [model("a", 0.9, 0.01, 12.0), model("b", 0.8, 0.01, 30.0)]
    row = decide("points", "so3", found, budget_ms=5.0)
    assert row.within_budget is None
    assert "no model runs within 5 ms" in row.budget_note and "a, takes 12 ms" in row.budget_note
    assert row.best.name == "a"  # the other columns still answer


def test_the_budget_takes_the_most_accurate_model_at_or_under_it() -> None:
    found = [model("best", 0.95, 0.01, 50.0), model("ok", 0.88, 0.01, 8.0), model("cheap", 0.70, 0.01, 1.0)]
    assert decide("images", "in_distribution", found, budget_ms=8.0).within_budget.name == "ok"
    assert decide("images", "in_distribution", found, budget_ms=7.9).within_budget.name == "cheap"


def test_a_model_that_did_not_learn_is_never_chosen() -> None:
    found = [model("unlearned", 0.99, 0.01, 0.5, adequate=False), model("learned", 0.8, 0.01, 3.0)]
    row = decide("points", "unrotated", found, budget_ms=1.0)
    assert row.best.name == "learned" and row.excluded == ("unlearned",)
    assert row.within_budget is None  # the only model under 1 ms did not learn


def test_no_usable_model_gives_an_empty_row_that_says_why() -> None:
    row = decide("points", "so3", [model("x", 0.1, 0.01, 1.0, adequate=False)], budget_ms=10.0)
    assert (row.best, row.fastest_within_interval, row.within_budget) == (None, None, None)
    assert row.budget_note == "no model learned this task"
    assert decide("points", "so3", [], budget_ms=10.0).budget_note == "no model was measured"


@pytest.mark.parametrize(
    "a, b, expected",
    [((0.8, 0.9), (0.85, 0.95), True), ((0.8, 0.9), (0.9, 1.0), True), ((0.8, 0.89), (0.9, 1.0), False)],
)
def test_intervals_overlap_when_they_share_a_point(a, b, expected) -> None:
    assert overlaps(Estimate(sum(a) / 2, *a), Estimate(sum(b) / 2, *b)) is expected
    assert overlaps(Estimate(sum(b) / 2, *b), Estimate(sum(a) / 2, *a)) is expected


def test_the_front_does_not_depend_on_latencies_the_measurement_cannot_tell_apart() -> None:
    """Three models as fast as each other within their intervals: the measurably most accurate is on the
    front, the others are not, whichever of them has the lowest point estimate."""
    for order in ((0.200, 0.201, 0.202), (0.202, 0.201, 0.200)):
        found = [
            model("trained_rotated", 0.58, 0.02, order[0]),
            model("plain", 0.23, 0.02, order[1]),
            model("upright", 0.27, 0.02, order[2]),
            model("equivariant", 0.86, 0.03, 5.5),
        ]
        assert pareto_front(found) == ["trained_rotated", "equivariant"]


def test_models_that_cannot_be_told_apart_on_either_axis_are_all_on_the_front() -> None:
    found = [model("a", 0.80, 0.03, 1.00), model("b", 0.82, 0.03, 1.02), model("slow_bad", 0.5, 0.02, 9.0)]
    assert pareto_front(found) == ["a", "b"]


def test_the_most_accurate_stays_on_the_front_when_closeness_chains() -> None:
    """mid is as accurate as best within the intervals and faster; fast is as accurate as mid and faster
    still, but measurably less accurate than best: best keeps its place, and so does each faster step."""
    found = [
        model("best", 0.824, 0.04, 1.7),
        model("mid", 0.781, 0.04, 1.05),
        model("fast", 0.737, 0.04, 0.72),
    ]
    assert pareto_front(found) == ["fast", "mid", "best"]


def test_a_more_accurate_model_whose_latency_interval_reaches_the_budget_is_named() -> None:
    """Over the budget on its median (1.6 ms), under it at its interval's low end (1.44 ms)."""
    found = [model("hybrid", 0.82, 0.03, 1.6), model("rope", 0.78, 0.03, 1.0), model("slow", 0.9, 0.01, 9.0)]
    row = decide("images", "in_distribution", found, budget_ms=1.5)
    assert row.within_budget.name == "rope"
    assert row.budget_edge == "hybrid"  # slow is more accurate still, but its interval is far from 1.5 ms
    assert decide("images", "in_distribution", found, budget_ms=1.4).budget_edge is None  # 1.44 > 1.4
    assert decide("images", "in_distribution", found, budget_ms=1.7).budget_edge is None  # it fits
