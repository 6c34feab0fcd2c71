"""Exponents of cost ~ tokens^k in log-log, with bootstrap intervals."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# ------------------------------------------------------------------------------ exponents and intervals


def loglog_slopes(xs: Sequence[float], ys: Sequence[float]) -> list[float]:
    """Slope of log(y) against log(x) between neighbouring points (n - 1 values): the local exponent."""
    _check_positive(xs, ys)
    return [
        (math.log(ys[i + 1]) - math.log(ys[i])) / (math.log(xs[i + 1]) - math.log(xs[i]))
        for i in range(len(xs) - 1)
    ]


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log(y) on log(x) over all points: k in y ~ x^k."""
    _check_positive(xs, ys)
    return float(_slopes(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)[None, :])[0])


def _check_positive(xs: Sequence[float], ys: Sequence[float]) -> None:
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"need two equally long sequences of >= 2 points; got {len(xs)} and {len(ys)}")
    if min(xs) <= 0 or min(ys) <= 0:
        raise ValueError("log-log slopes need positive values")
    if len(set(xs)) < 2:
        raise ValueError("fit_exponent needs at least two distinct x values")


def _slopes(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Least-squares slope of log(ys[r]) on log(xs) for every row r: xs float[k], ys float[R, k] -> [R]."""
    lx, ly = np.log(xs), np.log(ys)  # [k], [R, k]
    dx = lx - lx.mean()  # [k]
    return (ly - ly.mean(axis=1, keepdims=True)) @ dx / (dx @ dx)  # [R]


def resample_quantiles(
    groups: Sequence[Sequence[float] | np.ndarray], q: float, resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """Bootstrap quantiles: float[resamples, len(groups)], column j the q-quantiles of `resamples`
    resamples of groups[j], each drawn with replacement to the group's own size.

    The groups (the block times at each token count) are resampled independently: repeats within a token
    count are exchangeable, the token counts are the fixed design. Seeded by the caller's generator.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1; got {resamples}")
    out = np.empty((resamples, len(groups)))
    for j, group in enumerate(groups):
        values = np.asarray(group, dtype=float)
        if values.size == 0:
            raise ValueError(f"group {j} has no measurements to resample")
        draws = rng.integers(0, values.size, size=(resamples, values.size))  # [R, n_j]
        out[:, j] = np.quantile(values[draws], q, axis=1)
    return out


def resample_medians(
    groups: Sequence[Sequence[float] | np.ndarray], resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """`resample_quantiles` at the median."""
    return resample_quantiles(groups, 0.5, resamples, rng)


@dataclass(frozen=True)
class Exponent:
    """k in cost ~ tokens^k (or a difference of two such k), with an interval [lo, hi]."""

    value: float
    lo: float
    hi: float
    tokens: tuple[int, ...]  # the token counts fitted
    interval: str  # how [lo, hi] was obtained

    @classmethod
    def from_samples(
        cls, value: float, samples: np.ndarray, level: float, tokens: Sequence[int], interval: str
    ) -> Exponent:
        """The point estimate with the percentile interval of bootstrap `samples` at `level`."""
        lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2]).tolist()
        return cls(float(value), lo, hi, tuple(int(t) for t in tokens), interval)

    @classmethod
    def point(cls, value: float, tokens: Sequence[int], interval: str) -> Exponent:
        return cls(float(value), float(value), float(value), tuple(int(t) for t in tokens), interval)


def _bootstrap_interval(level: float, resamples: int) -> str:
    return (
        f"{level:.0%} percentile bootstrap, {resamples} resamples of the block times within each token count"
    )


DETERMINISTIC = "none: one measurement per token count, deterministic (the same forward, the same bytes)"
COUNTED = "none: counted, not measured"


def latency_exponent(
    tokens: Sequence[int],
    times: Sequence[Sequence[float]],
    min_tokens: int = 0,
    resamples: int = 2000,
    rng: np.random.Generator | None = None,
    level: float = 0.95,
    q: float = 0.5,
) -> tuple[Exponent, np.ndarray]:
    """Fit k in latency ~ tokens^k over tokens >= min_tokens, the latency at each count being the
    q-quantile of its repeated timings (the median by default), with a bootstrap interval.

    tokens: the swept counts; times: the repeated timings at each. Returns the Exponent and its bootstrap
    samples (float[resamples]) so two models' exponents can be differenced resample by resample.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    resampled = resample_quantiles(times, q, resamples, rng)  # [R, k]
    return _fit_resampled(tokens, times, resampled, min_tokens, level, q)


def _fit_resampled(
    tokens: Sequence[int],
    times: Sequence[Sequence[float]],
    resampled: np.ndarray,
    min_tokens: int,
    level: float,
    q: float = 0.5,
    interval: str | None = None,
) -> tuple[Exponent, np.ndarray]:
    """The log-log slope of the q-quantile of `times` against `tokens` >= min_tokens, and of every row of
    `resampled` (the bootstrap's q-quantiles, float[R, len(tokens)]), with its percentile interval."""
    keep = [j for j, t in enumerate(tokens) if t >= min_tokens]
    if len({tokens[j] for j in keep}) < 2:
        raise ValueError(
            f"fitting over tokens >= {min_tokens} needs two distinct token counts there; the sweep has "
            f"{sorted(tokens)} (lower fit_min_tokens or add resolutions)"
        )
    xs = np.array([tokens[j] for j in keep], dtype=float)
    observed = np.array([[float(np.quantile(times[j], q)) for j in keep]])  # [1, k]
    samples = _slopes(xs, resampled[:, keep])  # [R]
    interval = interval or _bootstrap_interval(level, resampled.shape[0])
    fitted = [tokens[j] for j in keep]
    return Exponent.from_samples(_slopes(xs, observed)[0], samples, level, fitted, interval), samples
