"""The hierarchical, paired bootstrap: coverage, pairing, the seed level, shapes and determinism."""

from __future__ import annotations

import numpy as np
import pytest

from perception.evaluation.intervals import (
    BootstrapSettings,
    Estimate,
    bootstrap_statistic,
    linear_effect,
    percentile_interval,
)

FAST = BootstrapSettings(resamples=500, seed=1)


def correctness(rng: np.random.Generator, seeds: int, samples: int, p: float, seed_sd: float) -> np.ndarray:
    """float[S, N] of 0/1: each training seed's model has its own accuracy around p (seed-level variation)."""
    per_seed = np.clip(p + seed_sd * rng.standard_normal(seeds), 0.0, 1.0)  # (S,)
    return (rng.random((seeds, samples)) < per_seed[:, None]).astype(np.float64)  # (S, N)


def width(e: Estimate) -> float:
    return e.hi - e.lo


def test_the_interval_covers_a_known_accuracy_about_95_percent_of_the_time():
    rng = np.random.default_rng(123)
    truth = 0.7
    trials = 200
    hits = 0
    for _ in range(trials):
        e = linear_effect([correctness(rng, 5, 200, truth, seed_sd=0.03)], [1.0], FAST)
        hits += e.lo <= truth <= e.hi
    assert 0.90 <= hits / trials <= 0.99


def test_accuracy_is_the_mean_and_the_interval_contains_it():
    c = correctness(np.random.default_rng(0), 4, 300, 0.6, 0.02)
    e = linear_effect([c], [1.0], FAST)
    assert e.value == pytest.approx(c.mean())
    assert e.lo < e.value < e.hi


def test_a_paired_difference_of_identical_arrays_is_exactly_zero():
    c = correctness(np.random.default_rng(0), 5, 200, 0.6, 0.05)
    assert linear_effect([c, c], [1.0, -1.0], FAST) == Estimate(0.0, 0.0, 0.0)


def test_the_statistic_is_the_weighted_sum_of_means():
    rng = np.random.default_rng(2)
    arrays = [correctness(rng, 3, 100, p, 0.0) for p in (0.9, 0.6, 0.8, 0.7)]
    weights = [1.0, -1.0, -1.0, 1.0]  # a difference of drops
    e = linear_effect(arrays, weights, FAST)
    assert e.value == pytest.approx(sum(w * a.mean() for w, a in zip(weights, arrays, strict=True)))


def test_pairing_narrows_the_interval_for_correlated_models():
    rng = np.random.default_rng(3)
    a = correctness(rng, 5, 400, 0.7, 0.0)
    flips = rng.random(a.shape) < 0.05
    b = np.where(flips, 1.0 - a, a)  # the same model on the same samples, 5% of answers changed
    paired = linear_effect([a, b], [1.0, -1.0], FAST)
    # The same marginal accuracies with the pairing broken: b's samples shuffled within each seed.
    unpaired_b = np.stack([rng.permutation(row) for row in b])
    unpaired = linear_effect([a, unpaired_b], [1.0, -1.0], FAST)
    assert paired.value == pytest.approx(unpaired.value)
    assert width(paired) < 0.5 * width(unpaired)


@pytest.mark.parametrize("few, many", [((2, 200), (8, 200)), ((5, 100), (5, 1000))])
def test_more_seeds_or_samples_narrow_the_interval(few, many):
    widths = []
    for seeds, samples in (few, many):
        rng = np.random.default_rng(4)
        widths.append(width(linear_effect([correctness(rng, seeds, samples, 0.7, 0.03)], [1.0], FAST)))
    assert widths[1] < widths[0]


def test_seed_level_variance_widens_the_interval_compared_to_pooling():
    c = correctness(np.random.default_rng(5), 5, 400, 0.7, seed_sd=0.08)
    hierarchical = linear_effect([c], [1.0], FAST)
    pooled = linear_effect([c.reshape(1, -1)], [1.0], FAST)  # every sample as if from one seed
    assert hierarchical.value == pytest.approx(pooled.value)
    assert width(hierarchical) > 1.5 * width(pooled)


def test_one_seed_resamples_samples_only():
    c = correctness(np.random.default_rng(6), 1, 300, 0.7, 0.0)
    e = linear_effect([c], [1.0], FAST)
    assert e.lo < e.value < e.hi


def test_draws_per_sample_are_averaged_not_resampled():
    rng = np.random.default_rng(7)
    draws = (rng.random((3, 150, 4)) < 0.6).astype(np.float64)  # (S, N, D)
    assert linear_effect([draws], [1.0], FAST) == linear_effect([draws.mean(axis=2)], [1.0], FAST)


def test_a_shape_mismatch_names_the_shapes():
    a, b = np.zeros((5, 100)), np.zeros((4, 100))
    with pytest.raises(ValueError, match=r"\(5, 100\), \(4, 100\)"):
        linear_effect([a, b], [1.0, -1.0], FAST)
    with pytest.raises(ValueError, match=r"\(5, 100\), \(5, 90, 3\)"):
        linear_effect([a, np.zeros((5, 90, 3))], [1.0, -1.0], FAST)
    with pytest.raises(ValueError, match=r"shape \(100,\)"):
        linear_effect([np.zeros(100)], [1.0], FAST)
    with pytest.raises(ValueError, match="2 arrays but 1 weights"):
        linear_effect([a, a], [1.0], FAST)


def test_the_same_inputs_and_settings_give_the_same_estimate():
    c = correctness(np.random.default_rng(8), 5, 200, 0.7, 0.03)
    first = linear_effect([c], [1.0], BootstrapSettings(resamples=300, seed=9))
    assert linear_effect([c.copy()], [1.0], BootstrapSettings(resamples=300, seed=9)) == first
    assert linear_effect([c], [1.0], BootstrapSettings(resamples=300, seed=10)) != first


def test_chunked_resampling_matches_the_level_and_stays_deterministic(monkeypatch):
    import perception.evaluation.intervals as intervals

    monkeypatch.setattr(intervals, "_CHUNK_CELLS", 1000)  # many chunks
    c = correctness(np.random.default_rng(11), 2, 300, 0.7, 0.0)
    e = linear_effect([c], [1.0], FAST)
    assert e == linear_effect([c], [1.0], FAST) and e.lo < e.value < e.hi


def test_estimate_scaling_and_dict():
    e = Estimate(0.073, 0.041, 0.102)
    assert e.scaled(100).as_dict() == pytest.approx({"value": 7.3, "lo": 4.1, "hi": 10.2})
    assert e.scaled(-1) == Estimate(-0.073, -0.102, -0.041)  # ends swap
    assert e.as_dict() == {"value": 0.073, "lo": 0.041, "hi": 0.102}
    assert Estimate(**e.as_dict()) == e


def test_percentile_interval():
    e = percentile_interval(np.arange(101.0), value=50.0, level=0.9)
    assert e.as_dict() == pytest.approx({"value": 50.0, "lo": 5.0, "hi": 95.0})
    with pytest.raises(ValueError, match="at least one"):
        percentile_interval(np.array([]), 0.0, 0.95)


def test_settings_are_checked_and_described():
    with pytest.raises(ValueError, match="resamples"):
        BootstrapSettings(resamples=0)
    with pytest.raises(ValueError, match="level"):
        BootstrapSettings(level=1.0)
    text = BootstrapSettings(resamples=1234, seed=7, level=0.9).describe()
    assert "1234 resamples" in text and "seed 7" in text and "90%" in text
    assert "single training seed" in text


TOKENS = np.array([196, 576, 1024, 4096])


def loglog_exponent(groups: list[np.ndarray]) -> float:
    """The slope of log(median latency) against log(tokens)."""
    medians = np.array([np.median(g) for g in groups])
    return float(np.polyfit(np.log(TOKENS), np.log(medians), 1)[0])


def test_bootstrap_statistic_of_a_loglog_exponent():
    rng = np.random.default_rng(12)
    timings = [1e-6 * n**2 * np.exp(0.05 * rng.standard_normal(15)) for n in TOKENS]  # quadratic, noisy
    settings = BootstrapSettings(resamples=300, seed=3)
    e = bootstrap_statistic(timings, loglog_exponent, settings)
    assert e.lo <= 2.0 <= e.hi and e.hi - e.lo < 0.1
    assert e.value == pytest.approx(loglog_exponent(timings))
    assert bootstrap_statistic(timings, loglog_exponent, settings) == e


def test_bootstrap_statistic_resamples_within_each_group():
    groups = [np.full(5, 1.0), np.full(7, 3.0)]
    e = bootstrap_statistic(groups, lambda gs: float(gs[1].mean() - gs[0].mean()), FAST)
    assert e == Estimate(2.0, 2.0, 2.0)  # constant groups: no resample can move the statistic
    with pytest.raises(ValueError, match="group 1"):
        bootstrap_statistic([np.ones(3), np.array([])], lambda gs: 0.0, FAST)
