"""The names every model's test metrics go under (`test_accuracy`, `test_accuracy_so3`, ...), so that
MLflow's chart view draws one chart per quantity with one bar per model; and one trained model's values."""

from __future__ import annotations

import numpy as np

# Test-set names of the evaluation arrays -> the metric name's suffix, the same for every model.
IN_DISTRIBUTION = "in"


def test_metric_name(dataset: str, test_set: str) -> str:
    """`test_accuracy` (the model's own test set), `test_accuracy_so3`, `test_accuracy_fov_64`, ...; the
    proximity task, a different task on other images, is `test_accuracy_proximity`."""
    if dataset == "proximity":
        return "test_accuracy_proximity"
    return "test_accuracy" if test_set in (IN_DISTRIBUTION, "none") else f"test_accuracy_{test_set}"


def trial_test_metrics(
    correct: dict[str, np.ndarray], dataset: str, seed_index: int, accuracy
) -> dict[str, float]:
    """One trained model's test accuracies with their intervals over test samples, in percent.

    correct: test set -> bool[S, N] or bool[S, N, D] of the variant (S seeds); `accuracy(correct)` is the
    study's bootstrap estimate (`pipeline.evaluation.evidence.accuracy`), here of one seed's slice
    [1, N(, D)]."""
    metrics = {}
    for test_set, by_seed in correct.items():
        estimate = accuracy(by_seed[seed_index : seed_index + 1]).scaled(100)
        name = test_metric_name(dataset, test_set)
        metrics.update({name: estimate.value, f"{name}_lo": estimate.lo, f"{name}_hi": estimate.hi})
    return metrics
