"""Estimates with intervals: a hierarchical, paired bootstrap over training seeds and test samples.

A study's accuracy varies for two reasons: which training seed made the model, and which test samples it
met. `linear_effect` resamples both levels: each resample draws S training seeds with replacement, then N
test samples with replacement within each drawn seed, and recomputes the statistic. The same indices are
applied to every array of one call, so a difference between models tested on the same seeds and samples is
paired: what the models share cancels, and the interval is that of the difference, not of two accuracies.

Glossary (shapes in every docstring):
  R  resamples            S  training seeds
  N  test samples         D  draws per sample (e.g. rotations), averaged, never resampled: the draws of one
                             sample are not independent units

`bootstrap_statistic` is the plain (one-level) bootstrap for a non-linear statistic of independent repeated
measurements, such as a log-log exponent fitted to repeated latency timings.

numpy only: no orchestration, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# Gathered cells per chunk of resamples (R_chunk * S * N), about 16 MB of float64: bounds memory for large N.
_CHUNK_CELLS = 2_000_000


@dataclass(frozen=True)
class Estimate:
    """A statistic on the original data and its percentile interval over bootstrap resamples."""

    value: float
    lo: float
    hi: float

    def as_dict(self) -> dict[str, float]:
        return {"value": float(self.value), "lo": float(self.lo), "hi": float(self.hi)}

    def scaled(self, factor: float) -> Estimate:
        """The same estimate in other units (e.g. factor 100: fraction to percentage points)."""
        lo, hi = sorted((self.lo * factor, self.hi * factor))  # a negative factor swaps the ends
        return Estimate(self.value * factor, lo, hi)


@dataclass(frozen=True)
class BootstrapSettings:
    """How many resamples, the resampler's seed and the interval's level: the same settings and inputs
    give the same Estimate, byte for byte."""

    resamples: int = 2000
    seed: int = 0
    level: float = 0.95

    def __post_init__(self) -> None:
        if not isinstance(self.resamples, int) or self.resamples < 1:
            raise ValueError(f"bootstrap resamples must be an integer >= 1, got {self.resamples!r}")
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"bootstrap level must lie strictly between 0 and 1, got {self.level!r}")

    def describe(self) -> str:
        """One sentence for the report: the method, resamples, resampler seed and level."""
        return (
            f"{round(self.level * 100, 6):g}% percentile intervals from a hierarchical, paired bootstrap "
            f"with {self.resamples} resamples (resampler seed {self.seed}): each resample draws training "
            "seeds with replacement, then test samples with replacement within each drawn seed, with the "
            "same draws for every model in a comparison; several draws of one sample (e.g. rotations) are "
            "averaged, never resampled; with a single training seed only test samples are resampled, so "
            "the interval then omits seed-to-seed variation."
        )


def percentile_interval(samples: np.ndarray, value: float, level: float) -> Estimate:
    """`value` with the central `level` percentile interval of `samples` (float[R], the resampled
    statistic)."""
    samples = np.asarray(samples, dtype=np.float64).reshape(-1)
    if samples.size == 0:
        raise ValueError("percentile_interval needs at least one resampled value, got none")
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(samples, [tail, 1.0 - tail])
    return Estimate(float(value), float(lo), float(hi))


def _per_sample(array: np.ndarray, index: int) -> np.ndarray:
    """float[S, N] or float[S, N, D] -> float64[S, N]: a sample's mean over its draws."""
    array = np.asarray(array, dtype=np.float64)
    if array.ndim == 3:
        return array.mean(axis=2)
    if array.ndim == 2:
        return array
    raise ValueError(
        f"array {index} has shape {array.shape}: expected (seeds, samples) or (seeds, samples, draws)"
    )


def linear_effect(
    arrays: Sequence[np.ndarray], weights: Sequence[float], settings: BootstrapSettings
) -> Estimate:
    """`sum_k weights[k] * mean(arrays[k])` with a hierarchical, paired bootstrap interval.

    Each array is float[S, N] or float[S, N, D] (per-sample correctness, 0/1, of one model under one
    condition); all must share S and N, because one resample's indices apply to all of them (paired).
    Accuracy is `([c], [1])`, a paired difference `([a, b], [1, -1])`, a difference of drops
    `([a_in, a_out, b_in, b_out], [1, -1, -1, 1])`.

    Because the statistic is linear and every array is resampled with the same indices, it equals the mean
    of the per-cell weighted sum `sum_k w_k a_k[s, n]` over the resampled cells: one float[S, N] array is
    gathered per resample, however many arrays there are. The indices depend only on (settings, S, N), so
    every call with the same S and N sees the same resamples. With S == 1 the seed level cannot vary and
    only test samples are resampled.
    """
    if len(arrays) == 0:
        raise ValueError("linear_effect needs at least one array, got none")
    if len(arrays) != len(weights):
        raise ValueError(f"linear_effect got {len(arrays)} arrays but {len(weights)} weights: one each")
    cells = [_per_sample(a, k) for k, a in enumerate(arrays)]
    shapes = [c.shape for c in cells]
    if len(set(shapes)) != 1:
        listed = ", ".join(str(np.shape(a)) for a in arrays)
        raise ValueError(
            f"paired arrays must share (seeds, samples), got shapes {listed}: each model must be tested "
            "on the same seeds and samples"
        )
    seeds, samples = shapes[0]
    if seeds == 0 or samples == 0:
        raise ValueError(f"linear_effect needs at least one seed and one sample, got shape {shapes[0]}")

    combined = np.zeros(shapes[0])  # (S, N), summed in the weights' order
    for weight, cell in zip(weights, cells, strict=True):
        combined = combined + float(weight) * cell
    value = float(combined.mean())
    flat = combined.reshape(-1)  # (S*N,)

    rng = np.random.default_rng(settings.seed)
    chunk = max(1, _CHUNK_CELLS // (seeds * samples))
    resampled = np.empty(settings.resamples, dtype=np.float64)  # (R,)
    for start in range(0, settings.resamples, chunk):
        size = min(chunk, settings.resamples - start)
        seed_idx = rng.integers(0, seeds, size=(size, seeds), dtype=np.int64)  # (r, S)
        sample_idx = rng.integers(0, samples, size=(size, seeds, samples), dtype=np.int64)  # (r, S, N)
        cell_idx = seed_idx[:, :, None] * samples + sample_idx  # (r, S, N), into flat
        resampled[start : start + size] = flat[cell_idx].mean(axis=(1, 2))

    estimate = percentile_interval(resampled, value, settings.level)
    # The resampled means of a linear statistic centre on `value`; clamping only guards against the last
    # bit of rounding (a constant array's resampled mean can differ from its mean in the last ulp).
    return Estimate(value, min(estimate.lo, value), max(estimate.hi, value))


def bootstrap_statistic(
    groups: Sequence[np.ndarray],
    statistic: Callable[[list[np.ndarray]], float],
    settings: BootstrapSettings,
) -> Estimate:
    """A non-linear `statistic` of independent groups of repeated measurements, with a percentile interval.

    Group k holds the repeated measurements of one condition (e.g. latency timings at one token count),
    float[n_k] or float[n_k, ...], resampled along the first axis with replacement and independently of the
    other groups; each resample calls `statistic` on the resampled groups. One level only: the repeats are
    taken to be independent units.
    """
    data = [np.asarray(g, dtype=np.float64) for g in groups]
    if not data:
        raise ValueError("bootstrap_statistic needs at least one group, got none")
    for k, g in enumerate(data):
        if g.ndim == 0 or len(g) == 0:
            raise ValueError(f"group {k} has shape {g.shape}: it needs at least one measurement")
    value = float(statistic(data))
    rng = np.random.default_rng(settings.seed)
    indices = [rng.integers(0, len(g), size=(settings.resamples, len(g))) for g in data]  # (R, n_k) each
    resampled = np.array(
        [
            float(statistic([g[idx[r]] for g, idx in zip(data, indices, strict=True)]))
            for r in range(settings.resamples)
        ]
    )  # (R,)
    return percentile_interval(resampled, value, settings.level)
